"""Feed-forward blocks: plain (GPT-2 ``c_fc``/``c_proj``) and gated (LLaMA ``gate_proj``/``up_proj``/``down_proj``)."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.components.activations import ACTIVATIONS
from hooked_attn.components.params import strided_parameter
from hooked_attn.config import ModelConfig
from hooked_attn.hook_points import HookPoint


class MLP(nn.Module):
    """``W_in [d_model d_mlp]`` (and ``W_gate``/``b_gate`` when gated), ``W_out [d_mlp d_model]``.

    Plain: ``post = act(pre)`` with ``pre = x W_in + b_in``. Gated: ``pre = x W_gate + b_gate``
    (hook_pre), ``pre_linear = x W_in + b_in`` (hook_pre_linear), ``post = act(pre) * pre_linear``.
    Biases are always present, zeros where the family has none.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.act_fn]
        self.W_in = strided_parameter((cfg.d_mlp, cfg.d_model), (1, 0))
        self.b_in = nn.Parameter(torch.empty(cfg.d_mlp))
        self.W_gate = strided_parameter((cfg.d_mlp, cfg.d_model), (1, 0)) if cfg.gated_mlp else None
        self.b_gate = nn.Parameter(torch.empty(cfg.d_mlp)) if cfg.gated_mlp else None
        self.W_out = strided_parameter((cfg.d_model, cfg.d_mlp), (1, 0))
        self.b_out = nn.Parameter(torch.empty(cfg.d_model))
        self.hook_pre = HookPoint()
        if cfg.gated_mlp:
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.W_gate is None:
            post = self.hook_post(self.act(self.hook_pre(F.linear(x, self.W_in.T, self.b_in))))
        else:
            pre = self.hook_pre(F.linear(x, self.W_gate.T, self.b_gate))
            pre_linear = self.hook_pre_linear(F.linear(x, self.W_in.T, self.b_in))
            post = self.hook_post(self.act(pre) * pre_linear)
        return F.linear(post, self.W_out.T, self.b_out)
