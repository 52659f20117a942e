"""``transformer_lens.config.transformer_lens_config``: the core shape fields of a TransformerLens model.

TransformerLens 3.x uses ``TransformerLensConfig`` for what every model shares (the key/value cache
builds its entries from it). Here it is a small standalone dataclass; unlike TransformerLens,
``HookedTransformerConfig`` is not a subclass of it (it has every field these helpers read).
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class TransformerLensConfig:
    d_model: int
    d_head: int
    n_layers: int
    n_ctx: int
    n_heads: int = -1
    d_vocab: int = -1
    d_mlp: int | None = None
    n_key_value_heads: int | None = None
    device: str | None = None
    dtype: torch.dtype = torch.float32
    use_attn_scale: bool = True
    attn_scale: float = -1.0

    def __post_init__(self) -> None:
        if self.n_heads == -1:
            if self.d_model % self.d_head:
                raise ValueError(f"d_model={self.d_model} is not a multiple of d_head={self.d_head}: give n_heads")
            self.n_heads = self.d_model // self.d_head
        if self.n_key_value_heads is not None and self.n_heads % self.n_key_value_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_key_value_heads={self.n_key_value_heads}")
        if self.use_attn_scale and self.attn_scale == -1.0:
            self.attn_scale = math.sqrt(self.d_head)
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["TransformerLensConfig"]
