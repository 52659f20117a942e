"""``transformer_lens.components.attention``: TransformerLens' attention, one key/value head per query head."""

from typing import Any

import torch
from torch import Tensor, nn

from hooked_attn.compat.transformer_lens.components.abstract_attention import AbstractAttention
from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig


class Attention(AbstractAttention):
    """Multi-head attention with ``W_K``/``W_V`` ``[head d_model d_head]`` (see ``AbstractAttention``)."""

    def __init__(self, cfg: HookedTransformerConfig | dict[str, Any], attn_type: str = "global",
                 layer_id: int | None = None) -> None:
        super().__init__(cfg, attn_type, layer_id)
        c = self.cfg
        self.W_K = nn.Parameter(torch.zeros(c.n_heads, c.d_model, c.d_head, dtype=c.dtype))
        self.W_V = nn.Parameter(torch.zeros(c.n_heads, c.d_model, c.d_head, dtype=c.dtype))
        self.b_K = nn.Parameter(torch.zeros(c.n_heads, c.d_head, dtype=c.dtype))
        self.b_V = nn.Parameter(torch.zeros(c.n_heads, c.d_head, dtype=c.dtype))

    def _key_value_weights(self) -> tuple[Any, Tensor, Any, Tensor]:
        return self.W_K, self.b_K, self.W_V, self.b_V


__all__ = ["Attention"]
