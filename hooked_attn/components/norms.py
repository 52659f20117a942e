"""LayerNorm and RMSNorm with hooks on the scale and the output. Mirrors HF ``nn.LayerNorm`` / ``LlamaRMSNorm``."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.config import NormConfig
from hooked_attn.hook_points import HookPoint


class Norm(nn.Module):
    """Normalise over ``d_model``, then apply the gain ``w`` and bias ``b`` where the config has them.

    Hooks: ``hook_scale [batch pos 1]`` (the divisor: ``sqrt(var + eps)`` or ``sqrt(mean(x^2) + eps)``)
    and ``hook_normalized [batch pos d_model]`` (the norm's output, after gain and bias).
    Statistics are computed in float32 whatever the input dtype, as HF does.
    """

    def __init__(self, cfg: NormConfig, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.w = nn.Parameter(torch.empty(d_model)) if cfg.weight else None
        self.b = nn.Parameter(torch.empty(d_model)) if cfg.bias else None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.cfg.kind == "layernorm" and not self.hook_scale.has_hooks:
            return self.hook_normalized(F.layer_norm(x, (self.d_model,), self.w, self.b, self.cfg.eps))
        x32 = x.float()
        if self.cfg.kind == "layernorm":
            x32 = x32 - x32.mean(-1, keepdim=True)
        # Multiply by rsqrt, as HF does, so reduced-precision outputs round identically; the scale
        # is materialised for hook_scale only when something is attached there.
        inv_scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.eps)
        if self.hook_scale.has_hooks:
            scale = inv_scale.reciprocal()
            original = scale.clone()  # [batch pos 1]: cheap; tells whether a hook edited it in place
            hooked = self.hook_scale(scale)
            out32 = x32 * inv_scale if torch.equal(hooked, original) else x32 / hooked
        else:
            out32 = x32 * inv_scale
        out = out32.to(x.dtype)
        if self.w is not None:
            out = self.w * out
        if self.b is not None:
            out = out + self.b
        return self.hook_normalized(out)
