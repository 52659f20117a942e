"""Rotary position embeddings. Mirrors HF ``LlamaRotaryEmbedding`` / ``apply_rotary_pos_emb``."""

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_attn.config import Rotary

RopeTables = dict[Rotary, tuple[Tensor, Tensor]]


def inverse_frequencies(rotary: Rotary) -> Float[Tensor, " half_rot"]:
    """The rotation frequency of each dimension pair, with any long-context scaling applied (float32)."""
    n = rotary.n_rotary_dims
    inv_freq = 1.0 / (rotary.base ** (torch.arange(0, n, 2, dtype=torch.int64).float() / n))
    scaling = rotary.scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    assert scaling.original_n_ctx and scaling.low_freq_factor and scaling.high_freq_factor
    low_wavelen = scaling.original_n_ctx / scaling.low_freq_factor
    high_wavelen = scaling.original_n_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_n_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(
    rotary: Rotary, positions: Int[Tensor, "batch pos"], dtype: torch.dtype, cache: RopeTables
) -> tuple[Float[Tensor, "batch pos n_rot"], Float[Tensor, "batch pos n_rot"]]:
    """cos and sin for every position, computed once per forward pass and shared by the layers."""
    if rotary not in cache:
        inv_freq = inverse_frequencies(rotary).to(positions.device)
        angles = positions[..., None].float() * inv_freq
        if rotary.pairing == "halves":
            angles = torch.cat((angles, angles), dim=-1)
        else:
            angles = angles.repeat_interleave(2, dim=-1)
        cache[rotary] = (angles.cos().to(dtype), angles.sin().to(dtype))
    return cache[rotary]


def _rotate(x: Tensor, pairing: str) -> Tensor:
    if pairing == "halves":
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], cos: Float[Tensor, "batch pos n_rot"],
    sin: Float[Tensor, "batch pos n_rot"], rotary: Rotary,
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the first ``n_rotary_dims`` of every head; the rest pass through (partial rotary)."""
    n = rotary.n_rotary_dims
    rot, rest = x[..., :n], x[..., n:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot = rot * cos + _rotate(rot, rotary.pairing) * sin
    return rot if rest.shape[-1] == 0 else torch.cat((rot, rest), dim=-1)
