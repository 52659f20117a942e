"""``transformer_lens.components.mlps.mlp``: TransformerLens' stand-alone MLP (see ``can_be_used_as_mlp``).

``pre = x W_in + b_in`` (hook_pre), ``post = act(pre)`` (hook_post; ``solu_ln`` goes through
hook_mid and ``ln``), ``out = post W_out + b_out``. Weights ``W_in [d_model d_mlp]``,
``W_out [d_mlp d_model]`` start normal with std ``cfg.initializer_range``, biases at zero.
"""

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.compat.transformer_lens.components.mlps.can_be_used_as_mlp import CanBeUsedAsMLP
from hooked_attn.hook_points import HookPoint


def _weight(cfg: HookedTransformerConfig, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, dtype=cfg.dtype) * cfg.initializer_range)


class MLP(CanBeUsedAsMLP):
    def __init__(self, cfg: HookedTransformerConfig | dict[str, Any]) -> None:
        super().__init__(cfg)
        self.select_activation_function()
        self.W_in = _weight(self.cfg, self.cfg.d_model, self.d_mlp)
        self.b_in = nn.Parameter(torch.zeros(self.d_mlp, dtype=self.cfg.dtype))
        self.W_out = _weight(self.cfg, self.d_mlp, self.cfg.d_model)
        self.b_out = nn.Parameter(torch.zeros(self.cfg.d_model, dtype=self.cfg.dtype))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        post = self.hook_post(self.apply_activation(pre))
        return post @ self.W_out + self.b_out


__all__ = ["MLP"]
