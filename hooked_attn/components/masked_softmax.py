"""A softmax over the last axis that ignores masked keys, given a boolean mask or valid lengths.

Masked positions get probability exactly 0. A row with no valid key at all (a query that may see
nothing) gets all zeros rather than NaN: nothing flows from it, and its gradients stay finite.
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

# valid_lens: one length per sequence (every query sees the same keys) or one per query.
ValidLens = Int[Tensor, " batch"] | Int[Tensor, "batch q_pos"]


def valid_lens_mask(
    valid_lens: ValidLens, n_queries: int, n_keys: int, n_middle: int = 0
) -> Bool[Tensor, "batch *middle q_pos k_pos"]:
    """True where a key position is below its row's valid length.

    Args:
        valid_lens: ``[batch]`` (the first ``valid_lens[b]`` keys are valid for every query of
            sequence ``b``) or ``[batch q_pos]`` (one length per query).
        n_queries: the query axis length (checked against a per-query ``valid_lens``).
        n_keys: the key axis length.
        n_middle: how many axes (heads, say) sit between ``batch`` and ``q_pos``; they get size 1
            (the result broadcasts against scores ``[batch *middle q_pos k_pos]``).

    Raises:
        ValueError: ``valid_lens`` has the wrong shape, or a length is negative or above ``n_keys``.
    """
    if valid_lens.ndim not in (1, 2) or (valid_lens.ndim == 2 and valid_lens.shape[1] != n_queries):
        raise ValueError(
            f"valid_lens must be [batch] or [batch q_pos] with q_pos={n_queries}, got shape {tuple(valid_lens.shape)}"
        )
    if torch.is_floating_point(valid_lens) or valid_lens.dtype == torch.bool:
        raise ValueError(f"valid_lens must hold integers, got dtype {valid_lens.dtype}")
    if valid_lens.numel() and (bool((valid_lens < 0).any()) or bool((valid_lens > n_keys).any())):
        raise ValueError(f"valid_lens must lie in 0..{n_keys} (the number of keys), got {valid_lens.tolist()}")
    per_query = valid_lens if valid_lens.ndim == 2 else valid_lens[:, None]
    keep = (torch.arange(n_keys, device=valid_lens.device) < per_query[..., None]).expand(-1, n_queries, -1)
    return keep.reshape(keep.shape[0], *([1] * n_middle), n_queries, n_keys)


def masked_softmax(
    scores: Float[Tensor, "batch *middle q_pos k_pos"], *,
    mask: Bool[Tensor, "*#mask_batch #q_pos #k_pos"] | None = None,
    valid_lens: ValidLens | None = None,
) -> Float[Tensor, "batch *middle q_pos k_pos"]:
    """Softmax over ``k_pos`` that gives masked keys probability exactly 0.

    Args:
        scores: pre-softmax attention scores; any axes (heads, say) may sit between ``batch`` and
            ``q_pos``.
        mask: True where a query may attend a key (the convention of
            ``scaled_dot_product_attention`` and of ``hooked_attn``'s own attention; note that
            ``nn.MultiheadAttention`` uses the opposite one). Broadcasts against ``scores``.
        valid_lens: ``[batch]``: the first ``valid_lens[b]`` keys are valid for every query of
            sequence ``b``; or ``[batch q_pos]``: one length per query. Combines with ``mask``
            (a key must pass both).

    Returns:
        Probabilities over keys; 0 at masked keys. A query with no valid key gets a row of zeros
        (not NaN, and not a uniform row), so its output is zero and its gradients are finite.

    Raises:
        ValueError: a mask that does not broadcast, or bad ``valid_lens`` (see ``valid_lens_mask``).
    """
    if scores.ndim < 3:
        raise ValueError(f"scores must be [batch ... q_pos k_pos] (3 or more axes), got shape {tuple(scores.shape)}")
    keep: Tensor | None = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
        try:
            broadcast = torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != scores.shape:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to scores of shape {tuple(scores.shape)}"
            )
        keep = mask
    if valid_lens is not None:
        if valid_lens.shape[0] != scores.shape[0]:
            raise ValueError(
                f"valid_lens has batch size {valid_lens.shape[0]} but scores have batch size {scores.shape[0]}"
            )
        by_length = valid_lens_mask(valid_lens, scores.shape[-2], scores.shape[-1], n_middle=scores.ndim - 3)
        keep = by_length if keep is None else keep & by_length
    wide = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else None
    if keep is None:
        return scores.softmax(dim=-1, dtype=wide).to(scores.dtype)
    # The most negative finite value, not -inf: a row with every key masked then stays finite
    # (uniform) through the softmax, and the masked_fill below turns it into zeros.
    filled = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return filled.softmax(dim=-1, dtype=wide).to(scores.dtype).masked_fill(~keep, 0.0)
