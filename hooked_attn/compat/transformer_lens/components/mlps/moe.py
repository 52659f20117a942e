"""``transformer_lens.components.mlps.moe``: TransformerLens' stand-alone mixture-of-experts MLP.

``num_experts`` experts (each TransformerLens' ``GatedMLP`` when ``gated_mlp``, else its ``MLP``) and a
router ``W_gate [d_model expert]``: each token runs through the ``experts_per_token`` experts with the
largest router logits, mixed by the softmax of those logits (the same weights as Mixtral's softmax,
top-k, renormalise). hooked_attn's own models use ``hooked_attn.components.moe``.
"""

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.compat.transformer_lens.components.mlps.can_be_used_as_mlp import CanBeUsedAsMLP
from hooked_attn.compat.transformer_lens.components.mlps.gated_mlp import GatedMLP
from hooked_attn.compat.transformer_lens.components.mlps.mlp import MLP, _weight
from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.hook_points import HookPoint


class MoE(CanBeUsedAsMLP):
    """Hooks: ``hook_expert_weights [batch pos experts_per_token]`` (the mixing weights) and
    ``hook_expert_indices [batch pos experts_per_token]`` (the chosen experts, largest logit first)."""

    def __init__(self, cfg: HookedTransformerConfig | dict[str, Any]) -> None:
        super().__init__(cfg)
        c = self.cfg
        if not c.num_experts or not c.experts_per_token or not 0 < c.experts_per_token <= c.num_experts:
            raise ValueError(f"MoE needs num_experts >= experts_per_token >= 1, got num_experts={c.num_experts}, "
                             f"experts_per_token={c.experts_per_token}")
        self.num_experts, self.experts_per_token = c.num_experts, c.experts_per_token
        expert = GatedMLP if c.gated_mlp else MLP
        self.experts = nn.ModuleList([expert(c) for _ in range(c.num_experts)])
        self.W_gate = _weight(c, c.d_model, c.num_experts)
        self.hook_expert_weights = HookPoint()
        self.hook_expert_indices = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        logits = x @ self.W_gate
        top_logits, indices = logits.topk(self.experts_per_token, dim=-1)
        weights = self.hook_expert_weights(top_logits.softmax(dim=-1, dtype=torch.float32).to(x.dtype))
        indices = self.hook_expert_indices(indices)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = indices == e  # [batch pos k]
            rows = chosen.any(-1)
            if rows.any():  # each expert runs on its own tokens only
                mix = (weights * chosen).sum(-1)[rows][:, None]
                out[rows] += mix * expert(x[rows][None])[0]
        return out


__all__ = ["MoE"]
