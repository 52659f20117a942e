"""``transformer_lens.utilities.attention``: per-head linear maps of attention inputs."""

import einops
from jaxtyping import Float
from torch import Tensor


def simple_attn_linear(input: Float[Tensor, "batch pos d_model"], w: Float[Tensor, "head d_model d_head"],
                       b: Float[Tensor, "head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
    """One input shared by every head: ``input @ w[head] + b[head]``."""
    return einops.einsum(input, w, "batch pos d_model, head d_model d_head -> batch pos head d_head") + b


def complex_attn_linear(input: Float[Tensor, "batch pos head d_model"], w: Float[Tensor, "head d_model d_head"],
                        b: Float[Tensor, "head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
    """A separate input per head (split q/k/v inputs): ``input[..., head, :] @ w[head] + b[head]``."""
    return einops.einsum(input, w, "batch pos head d_model, head d_model d_head -> batch pos head d_head") + b


__all__ = ["complex_attn_linear", "simple_attn_linear"]
