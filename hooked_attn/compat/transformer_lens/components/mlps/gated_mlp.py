"""``transformer_lens.components.mlps.gated_mlp``: TransformerLens' stand-alone gated MLP.

TransformerLens' equation, which adds ``b_in`` after the gate product (hooked_attn's own gated MLP,
like HF's, has the bias inside): ``pre = x W_gate`` (hook_pre), ``pre_linear = x W_in``
(hook_pre_linear), ``post = act(pre) * pre_linear + b_in`` (hook_post), ``out = post W_out + b_out``.
"""

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.compat.transformer_lens.components.mlps.mlp import _weight
from hooked_attn.compat.transformer_lens.components.mlps.can_be_used_as_mlp import CanBeUsedAsMLP
from hooked_attn.hook_points import HookPoint


class GatedMLP(CanBeUsedAsMLP):
    def __init__(self, cfg: HookedTransformerConfig | dict[str, Any]) -> None:
        super().__init__(cfg)
        self.select_activation_function()
        self.W_in = _weight(self.cfg, self.cfg.d_model, self.d_mlp)
        self.W_gate = _weight(self.cfg, self.cfg.d_model, self.d_mlp)
        self.b_in = nn.Parameter(torch.zeros(self.d_mlp, dtype=self.cfg.dtype))
        self.W_out = _weight(self.cfg, self.d_mlp, self.cfg.d_model)
        self.b_out = nn.Parameter(torch.zeros(self.cfg.d_model, dtype=self.cfg.dtype))
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(x @ self.W_gate)
        pre_linear = self.hook_pre_linear(x @ self.W_in)
        post = self.hook_post(self.apply_activation(pre) * pre_linear + self.b_in)
        return post @ self.W_out + self.b_out


__all__ = ["GatedMLP"]
