"""The attention scoring functions of teaching material, as hookable single-head modules.

``DotProductAttention`` scores a query against a key with their scaled dot product (Vaswani et al.);
``AdditiveAttention`` with a one-hidden-layer tanh network (Bahdanau et al.). Both take
``queries, keys, values`` and optional ``valid_lens`` or ``mask``, as in the d2l.ai chapters, and
expose ``hook_attn_scores``, ``hook_pattern`` and ``hook_z``. They are single-head, so the score
and pattern tensors are ``[batch q_pos k_pos]``: no ``head`` axis. Wrap a model that uses them
with ``hooked_attn.wrap`` to get ``run_with_cache`` and ``run_with_hooks``.
"""

import math

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from hooked_attn.components.masked_softmax import ValidLens, masked_softmax, valid_lens_mask
from hooked_attn.hook_points import HookPoint

KeyMask = Bool[Tensor, "#batch #q_pos k_pos"]


def _keep(
    scores: Float[Tensor, "batch q_pos k_pos"], valid_lens: ValidLens | None, mask: KeyMask | None
) -> Bool[Tensor, "#batch #q_pos k_pos"] | None:
    """True where a query may attend a key, from valid lengths and/or a boolean mask (None: all)."""
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    keep = mask
    if valid_lens is not None:
        if valid_lens.shape[0] != scores.shape[0]:
            raise ValueError(
                f"valid_lens has batch size {valid_lens.shape[0]} but the queries have batch size {scores.shape[0]}"
            )
        by_length = valid_lens_mask(valid_lens, scores.shape[1], scores.shape[2])
        keep = by_length if keep is None else keep & by_length
    return keep


class _Scoring(nn.Module):
    """The part both scoring modules share: mask, softmax, dropout, weighted sum of values."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = nn.Dropout(dropout)
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def _attend(
        self, scores: Float[Tensor, "batch q_pos k_pos"], values: Float[Tensor, "batch k_pos d_value"],
        valid_lens: ValidLens | None, mask: KeyMask | None,
    ) -> Float[Tensor, "batch q_pos d_value"]:
        keep = _keep(scores, valid_lens, mask)
        if keep is not None:
            # -inf at masked keys, like nn.MultiheadAttention's boolean masks: what the hook shows.
            scores = scores.masked_fill(~keep, float("-inf"))
        scores = self.hook_attn_scores(scores)
        # The mask is applied again after the hook: editing a masked score cannot unmask it.
        pattern = self.hook_pattern(masked_softmax(scores, mask=keep))
        return self.hook_z(
            einops.einsum(self.dropout(pattern), values, "batch q_pos k_pos, batch k_pos d_value -> batch q_pos d_value")
        )


class DotProductAttention(_Scoring):
    """Scaled dot-product attention: ``softmax(q k^T / sqrt(d_key)) v`` over the valid keys.

    Args:
        dropout: dropout on the pattern (active in training mode only).
    """

    def forward(
        self, queries: Float[Tensor, "batch q_pos d_key"], keys: Float[Tensor, "batch k_pos d_key"],
        values: Float[Tensor, "batch k_pos d_value"], valid_lens: ValidLens | None = None,
        mask: KeyMask | None = None,
    ) -> Float[Tensor, "batch q_pos d_value"]:
        """Attend each query over the keys.

        Args:
            valid_lens: ``[batch]`` or ``[batch q_pos]``: only the first ``n`` keys count.
            mask: True where a query may attend a key; combines with ``valid_lens``.
        """
        scale = 1.0 / math.sqrt(queries.shape[-1])
        scores = einops.einsum(queries, keys, "batch q_pos d_key, batch k_pos d_key -> batch q_pos k_pos") * scale
        return self._attend(scores, values, valid_lens, mask)


class AdditiveAttention(_Scoring):
    """Additive (Bahdanau) attention: ``score(q, k) = w_v . tanh(W_q q + W_k k)``.

    ``hook_q`` and ``hook_k`` show the projected queries ``[batch q_pos d_hidden]`` and keys
    ``[batch k_pos d_hidden]`` before they are added.

    Args:
        d_query: width of a query.
        d_key: width of a key.
        d_hidden: width of the hidden tanh layer.
        dropout: dropout on the pattern (active in training mode only).
    """

    def __init__(self, d_query: int, d_key: int, d_hidden: int, dropout: float = 0.0) -> None:
        super().__init__(dropout)
        for name, size in (("d_query", d_query), ("d_key", d_key), ("d_hidden", d_hidden)):
            if size <= 0:
                raise ValueError(f"{name} must be positive, got {size}")
        self.W_q = nn.Linear(d_query, d_hidden, bias=False)
        self.W_k = nn.Linear(d_key, d_hidden, bias=False)
        self.w_v = nn.Linear(d_hidden, 1, bias=False)
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()

    def forward(
        self, queries: Float[Tensor, "batch q_pos d_query"], keys: Float[Tensor, "batch k_pos d_key"],
        values: Float[Tensor, "batch k_pos d_value"], valid_lens: ValidLens | None = None,
        mask: KeyMask | None = None,
    ) -> Float[Tensor, "batch q_pos d_value"]:
        """Attend each query over the keys.

        Args:
            valid_lens: ``[batch]`` or ``[batch q_pos]``: only the first ``n`` keys count.
            mask: True where a query may attend a key; combines with ``valid_lens``.
        """
        q = self.hook_q(self.W_q(queries))
        k = self.hook_k(self.W_k(keys))
        # [batch q_pos k_pos d_hidden]: every query beside every key, then one score each.
        features = torch.tanh(q[:, :, None, :] + k[:, None, :, :])
        scores = self.w_v(features).squeeze(-1)
        return self._attend(scores, values, valid_lens, mask)
