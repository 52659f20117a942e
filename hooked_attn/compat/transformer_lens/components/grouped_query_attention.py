"""``transformer_lens.components.grouped_query_attention``: TransformerLens' grouped-query attention.

Its state dict is TransformerLens': the key/value weights are stored per key/value head as
``_W_K``/``_W_V`` ``[kv_head d_model d_head]`` (and ``_b_K``/``_b_V``); ``W_K``/``W_V`` are those
repeated to the query heads they serve.
"""

from typing import Any

import torch
from torch import Tensor, nn

from hooked_attn.compat.transformer_lens.components.abstract_attention import AbstractAttention
from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig


class GroupedQueryAttention(AbstractAttention):
    """Attention whose ``n_key_value_heads`` key/value heads each serve ``n_heads / n_key_value_heads``
    query heads. ``hook_k``/``hook_v`` see the key/value heads, or (with
    ``cfg.ungroup_grouped_query_attention``) them repeated to every query head; the output is the same."""

    def __init__(self, cfg: HookedTransformerConfig | dict[str, Any], attn_type: str = "global",
                 layer_id: int | None = None) -> None:
        super().__init__(cfg, attn_type, layer_id)
        c = self.cfg
        n_kv = c.n_key_value_heads
        if n_kv is None or n_kv <= 0 or c.n_heads % n_kv:
            raise ValueError(f"n_key_value_heads={n_kv} must divide n_heads={c.n_heads}")
        self.repeat_kv_heads = c.n_heads // n_kv
        self._W_K = nn.Parameter(torch.zeros(n_kv, c.d_model, c.d_head, dtype=c.dtype))
        self._W_V = nn.Parameter(torch.zeros(n_kv, c.d_model, c.d_head, dtype=c.dtype))
        self._b_K = nn.Parameter(torch.zeros(n_kv, c.d_head, dtype=c.dtype))
        self._b_V = nn.Parameter(torch.zeros(n_kv, c.d_head, dtype=c.dtype))

    W_K = property(lambda self: self._W_K.repeat_interleave(self.repeat_kv_heads, dim=0))
    W_V = property(lambda self: self._W_V.repeat_interleave(self.repeat_kv_heads, dim=0))
    b_K = property(lambda self: self._b_K.repeat_interleave(self.repeat_kv_heads, dim=0))
    b_V = property(lambda self: self._b_V.repeat_interleave(self.repeat_kv_heads, dim=0))

    def _key_value_weights(self) -> tuple[Any, Tensor, Any, Tensor]:
        return self._W_K, self._b_K, self._W_V, self._b_V

    def calculate_qkv_matrices(self, query_input: Tensor, key_input: Tensor, value_input: Tensor,
                               ) -> tuple[Tensor, Tensor, Tensor]:
        """``q`` ``[batch pos head d_head]``; ``k, v`` per key/value head (per query head when ungrouped).
        With ``use_split_qkv_input`` the key/value inputs are ``[batch pos kv_head d_model]``."""
        q, k, v = super().calculate_qkv_matrices(query_input, key_input, value_input)
        if self.cfg.ungroup_grouped_query_attention:
            k, v = self._expand_kv(k, v)
        return q, k, v

    def _expand_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if k.shape[2] == self.cfg.n_heads:
            return k, v
        return k.repeat_interleave(self.repeat_kv_heads, dim=2), v.repeat_interleave(self.repeat_kv_heads, dim=2)


__all__ = ["GroupedQueryAttention"]
