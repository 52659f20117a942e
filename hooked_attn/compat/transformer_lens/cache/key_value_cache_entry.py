"""``transformer_lens.cache.key_value_cache_entry``: one layer's cached keys and values.

A ``TransformerLensKeyValueCacheEntry`` is a hooked_attn ``LayerKV`` (so the model appends to it
directly) with TransformerLens' names: ``past_keys`` / ``past_values`` ``[batch pos kv_head d_head]``,
``frozen`` (a frozen entry returns the extended keys and values but keeps its own unchanged) and
``init_cache_entry(cfg, device, batch_size)``.
"""

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_attn.components.kv_cache import LayerKV


class TransformerLensKeyValueCacheEntry(LayerKV):
    def __init__(self, past_keys: Float[Tensor, "batch pos kv_head d_head"],
                 past_values: Float[Tensor, "batch pos kv_head d_head"], frozen: bool = False) -> None:
        if past_keys.shape != past_values.shape:
            raise ValueError(f"past_keys {tuple(past_keys.shape)} and past_values {tuple(past_values.shape)} "
                             "must have the same shape [batch pos kv_head d_head]")
        super().__init__(k=past_keys, v=past_values)
        self.frozen = frozen

    @classmethod
    def init_cache_entry(cls, cfg: Any, device: torch.device | str | None = None,
                         batch_size: int = 1) -> "TransformerLensKeyValueCacheEntry":
        """An empty entry ``[batch_size 0 kv_head d_head]`` in ``cfg.dtype`` (``n_key_value_heads`` when set)."""
        n_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        shape = (batch_size, 0, n_heads, cfg.d_head)
        dtype = getattr(cfg, "dtype", None) or torch.float32
        device = device if device is not None else getattr(cfg, "device", None)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @property
    def past_keys(self) -> Tensor:
        assert self.k is not None
        return self.k

    @past_keys.setter
    def past_keys(self, value: Tensor) -> None:
        self.k = value

    @property
    def past_values(self) -> Tensor:
        assert self.v is not None
        return self.v

    @past_values.setter
    def past_values(self, value: Tensor) -> None:
        self.v = value

    def append(self, new_keys: Float[Tensor, "batch new_pos kv_head d_head"],
               new_values: Float[Tensor, "batch new_pos kv_head d_head"]) -> tuple[Tensor, Tensor]:
        """Cached then new keys and values; stored unless the entry is frozen."""
        keys = torch.cat([self.past_keys, new_keys.to(self.past_keys.dtype)], dim=1)
        values = torch.cat([self.past_values, new_values.to(self.past_values.dtype)], dim=1)
        if not self.frozen:
            self.k, self.v = keys, values
        return keys, values


__all__ = ["TransformerLensKeyValueCacheEntry"]
