"""LayerNorm and RMSNorm with hooks on the scale and the output; the same norms on queries and keys.

Mirrors HF ``nn.LayerNorm`` and the RMSNorm variants of transformers: gain applied after the cast
back, or in float32 with an offset (``1 + w``), and per-head ``q_norm``/``k_norm``.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.config import NormConfig, QKNorm
from hooked_attn.hook_points import HookPoint, is_hooked


def normalize(
    x: Tensor, cfg: NormConfig, w: Tensor | None, b: Tensor | None, hook_scale: nn.Module
) -> Tensor:
    """Normalise over the last axis in float32 (float64 for float64 input), then apply ``weight_offset + w`` and ``b``.

    ``hook_scale`` sees the divisor ``[... 1]``: ``sqrt(var + eps)`` or ``sqrt(mean(x^2) + eps)``. It is a
    HookPoint, or a module put in its place (called like a hooked point).
    """
    per_channel = w is None or w.shape == x.shape[-1:]  # per-head gains [head d_head] take the general path
    if (cfg.kind == "layernorm" and not is_hooked(hook_scale) and cfg.weight_offset == 0
            and cfg.gain_dtype == "input" and per_channel):
        return F.layer_norm(x, x.shape[-1:], w, b, cfg.eps)
    x32 = x if x.dtype == torch.float64 else x.float()  # at least float32, never narrower than the input
    if cfg.kind == "layernorm":
        x32 = x32 - x32.mean(-1, keepdim=True)
    # Multiply by rsqrt, as HF does, so reduced-precision outputs round identically; the scale
    # is materialised for hook_scale only when something is attached there.
    inv_scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.eps)
    if is_hooked(hook_scale):
        scale = inv_scale.reciprocal()
        original = scale.clone()  # [... 1]: cheap; tells whether a hook edited it in place
        hooked = hook_scale(scale)
        if torch.equal(hooked, original):
            # Same value as the fast path (multiply by rsqrt), but the gradient flows through the hooked
            # scale, so backward hooks on hook_scale fire and a hook's detach() cuts that path.
            inv = hooked.reciprocal()
            out32 = x32 * (inv_scale.detach() + (inv - inv.detach()))
        else:
            out32 = x32 / hooked
    else:
        out32 = x32 * inv_scale
    gain = None if w is None else (w.to(x32.dtype) + cfg.weight_offset if cfg.weight_offset else w)
    if cfg.gain_dtype == "float32":
        out = out32 if gain is None else out32 * gain.to(out32.dtype)
        out = out.to(x.dtype)
    else:
        out = out32.to(x.dtype)
        if gain is not None:
            out = gain.to(x.dtype) * out
    if b is not None:
        out = out + b
    return out


class Norm(nn.Module):
    """Normalise over ``d_model``, then apply the gain ``w`` and bias ``b`` where the config has them.

    Hooks: ``hook_scale [batch pos 1]`` and ``hook_normalized [batch pos d_model]`` (the norm's
    output, after gain and bias). Statistics are computed in float32 whatever the input dtype, as HF does.
    """

    def __init__(self, cfg: NormConfig, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.w = nn.Parameter(torch.empty(d_model)) if cfg.weight else None
        self.b = nn.Parameter(torch.empty(d_model)) if cfg.bias else None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        return self.hook_normalized(normalize(x, self.cfg, self.w, self.b, self.hook_scale))


class HeadNorm(nn.Module):
    """A norm on queries or keys ``[batch pos head d_head]``, with per-head gains ``w [head d_head]``.

    Hooks: ``hook_scale`` (``[batch pos head 1]``, or ``[batch pos 1]`` over all heads) and
    ``hook_normalized [batch pos head d_head]``.
    """

    def __init__(self, cfg: QKNorm, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.w = nn.Parameter(torch.empty(n_heads, d_head)) if cfg.norm.weight else None
        self.b = nn.Parameter(torch.empty(n_heads, d_head)) if cfg.norm.bias else None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        w, b = self.w, self.b
        gains = w if w is not None else b
        if gains is not None and x.shape[-2] != gains.shape[0]:  # ungrouped keys: each K/V head's gains repeated
            w, b = (None if t is None else t.repeat_interleave(x.shape[-2] // gains.shape[0], dim=0) for t in (w, b))
        if self.cfg.over == "head":
            return self.hook_normalized(normalize(x, self.cfg.norm, w, b, self.hook_scale))
        flat = lambda t: None if t is None else t.flatten()  # noqa: E731
        out = normalize(x.flatten(-2), self.cfg.norm, flat(w), flat(b), self.hook_scale)
        return self.hook_normalized(out.unflatten(-1, x.shape[-2:]))
