"""ALiBi slopes and biases. Mirrors HF ``build_alibi_tensor`` (transformers/models/bloom/modeling_bloom.py)."""

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_attn.config import Alibi


def alibi_slopes(n_heads: int) -> Float[Tensor, " head"]:
    """The geometric slopes of the ALiBi paper; head counts that are not powers of two interleave
    the slopes of the next power of two."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != n_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        n_extra = min(closest, n_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * n_extra, 2, dtype=torch.int32))])
    return slopes


def alibi_bias(
    n_heads: int, key_positions: Int[Tensor, "batch k_pos"], dtype: torch.dtype, alibi: Alibi
) -> Float[Tensor, "batch head 1 k_pos"]:
    """``slope[head] * k_pos``, added to the scores; equal to ``-slope * (q_pos - k_pos)`` up to a
    per-row constant, which softmax ignores.

    With ``alibi.bias_dtype="bfloat16"`` the slopes are rounded to bfloat16 and so is each product
    (as the bfloat16 variant of HF ``build_alibi_tensor`` does); the result is then cast to ``dtype``.
    """
    slopes = alibi_slopes(n_heads).to(key_positions.device)
    if alibi.bias_dtype == "bfloat16":
        bias = slopes.bfloat16()[None, :, None, None] * key_positions[:, None, None, :]
    else:
        bias = slopes[None, :, None, None] * key_positions[:, None, None, :].float()
    return bias.to(dtype)
