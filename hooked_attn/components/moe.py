"""A sparse mixture-of-experts MLP: a router picks ``top_k`` gated experts per token and mixes them.

Mirrors HF ``MixtralSparseMoeBlock`` with ``MixtralTopKRouter`` (transformers/models/mixtral/
modeling_mixtral.py) and the default ``grouped_mm`` experts function (transformers/integrations/moe.py).
"""

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_attn.components.activations import ACTIVATIONS
from hooked_attn.components.params import strided_parameter
from hooked_attn.config import ModelConfig
from hooked_attn.hook_points import HookPoint, is_hooked


class MoEMLP(nn.Module):
    """``n_experts`` gated MLPs and a linear router; each token runs through its ``top_k`` experts.

    Weights (per expert, in the same layout as the dense gated MLP, with a leading ``expert`` axis):
    ``W_router [d_model expert]`` (no bias), ``W_gate [expert d_model d_mlp]``, ``W_in [expert d_model
    d_mlp]``, ``W_out [expert d_mlp d_model]``; no MLP biases. They are stored in ``nn.Linear``
    layout (``[expert d_mlp d_model]``...), so each expert is one ``F.linear`` over a free view.

    Each token's output is ``sum_k weight_k * expert_{index_k}(x)`` with
    ``expert_e(x) = (act(x W_gate[e]) * (x W_in[e])) W_out[e]``.

    Hooks:
        ``hook_router_logits [batch pos expert]``: ``x W_router``, in the model's dtype.
        ``hook_expert_indices [batch pos top_k]`` (int64): the chosen experts, ``topk`` of the
            float32 softmax of the logits, most probable first. A hook may replace them to force the
            routing; the weights are then the renormalised router probabilities of the experts given
            (an index may repeat; each must be in ``0..n_experts-1``).
        ``hook_expert_weights [batch pos top_k]`` (float32, as in HF): the mixing weights, the
            chosen probabilities renormalised to sum to 1. A hook may replace them (e.g. ``[1, 0]``
            to run one expert alone); they are not renormalised again.
    The block's ``hook_mlp_out`` holds the mixed output. There are no per-expert activation hooks
    (``hook_pre``/``hook_pre_linear``/``hook_post``): each expert sees only its own tokens, so no
    ``[batch pos d_mlp]`` tensor exists to hook.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        e, m, f = cfg.moe.n_experts, cfg.d_model, cfg.d_mlp
        self.n_experts, self.top_k = e, cfg.moe.top_k
        self.act = ACTIVATIONS[cfg.act_fn]
        self.W_router = strided_parameter((e, m), (1, 0))
        self.W_gate = strided_parameter((e, f, m), (0, 2, 1))
        self.W_in = strided_parameter((e, f, m), (0, 2, 1))
        self.W_out = strided_parameter((e, m, f), (0, 2, 1))
        self.hook_router_logits = HookPoint()
        self.hook_expert_indices = HookPoint()
        self.hook_expert_weights = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        indices, weights = self.route(x)
        return self.experts(x, indices, weights)

    def route(
        self, x: Float[Tensor, "batch pos d_model"]
    ) -> tuple[Int[Tensor, "batch pos top_k"], Float[Tensor, "batch pos top_k"]]:
        """The chosen experts and their mixing weights (HF ``MixtralTopKRouter``)."""
        logits = self.hook_router_logits(F.linear(x, self.W_router.T))
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        _, indices = probs.topk(self.top_k, dim=-1)
        if is_hooked(self.hook_expert_indices):
            indices = self.hook_expert_indices(indices)
            if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < self.n_experts:
                raise ValueError(f"a hook on {self.hook_expert_indices.name} chose experts in "
                                 f"{int(indices.min())}..{int(indices.max())}; they must be in 0..{self.n_experts - 1}")
        # The gathered probabilities are exactly HF's topk values unless a hook changed the indices.
        chosen = probs.gather(-1, indices)
        weights = self.hook_expert_weights(chosen / chosen.sum(dim=-1, keepdim=True))
        return indices, weights

    def experts(
        self, x: Float[Tensor, "batch pos d_model"], indices: Int[Tensor, "batch pos top_k"],
        weights: Float[Tensor, "batch pos top_k"],
    ) -> Float[Tensor, "batch pos d_model"]:
        """Mix the chosen experts' outputs. Token-expert pairs are sorted by expert so that each expert
        runs once on the tokens routed to it; products and the sum over ``top_k`` are float32, then
        cast to ``x``'s dtype (HF's ``grouped_mm`` experts function)."""
        flat_x = einops.rearrange(x, "batch pos d_model -> (batch pos) d_model")
        flat_indices = einops.rearrange(indices, "batch pos top_k -> (batch pos top_k)")
        order = flat_indices.argsort(stable=True)
        counts = torch.bincount(flat_indices, minlength=self.n_experts).tolist()  # one host sync
        assert len(counts) == self.n_experts, "route() checks hooked indices"
        routed = flat_x[order // self.top_k]
        out = torch.empty_like(routed)
        start = 0
        for e, n in enumerate(counts):
            if n:
                h = routed[start:start + n]
                post = self.act(F.linear(h, self.W_gate[e].T)) * F.linear(h, self.W_in[e].T)
                out[start:start + n] = F.linear(post, self.W_out[e].T)
                start += n
        flat_weights = einops.rearrange(weights, "batch pos top_k -> (batch pos top_k) 1")
        weighted = out * flat_weights[order]  # float32, as the weights are
        unsorted = torch.empty_like(weighted).index_copy_(0, order, weighted)
        mixed = einops.reduce(unsorted, "(batch pos top_k) d_model -> batch pos d_model", "sum",
                              batch=x.shape[0], pos=x.shape[1])
        return mixed.to(x.dtype)
