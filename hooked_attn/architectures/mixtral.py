"""Mixtral family (Mixtral-8x7B, 8x22B): LLaMA-style attention with a sparse mixture-of-experts MLP.
Mirrors transformers/models/mixtral/modeling_mixtral.py (``MixtralForCausalLM``)."""

import einops
import torch
from torch import Tensor
from transformers import MixtralConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, activation, convert_decoder, decoder_sizes, head_dim, pop_attention, pop_norms,
    rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, rope_parameters, rotary_from_hf
from hooked_attn.config import ModelConfig, MoE, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "MixtralForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "head_dim", "hidden_act", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "sliding_window", "num_local_experts", "num_experts_per_tok",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
    # MixtralSparseMoeBlock multiplies the MLP input by uniform noise only `if self.training`.
    "router_jitter_noise",
    # Both only feed the auxiliary load-balancing loss, which HF adds to the loss when labels are given
    # and output_router_logits is set; logits never depend on them. The router logits themselves are
    # at blocks.{i}.mlp.hook_router_logits.
    "output_router_logits", "router_aux_loss_coef",
})
IGNORED_HF_KEYS = rotary_buffer_keys()


def config_from_hf(hf: MixtralConfig) -> ModelConfig:
    # MixtralAttention: head_dim = getattr(config, "head_dim", None) or hidden_size // num_attention_heads.
    d_head = head_dim(hf)
    # MixtralModel uses create_sliding_window_causal_mask for every layer when sliding_window is set
    # (keys with q_pos - k_pos < sliding_window), create_causal_mask otherwise.
    windows = None if hf.sliding_window is None else (hf.sliding_window,) * hf.num_hidden_layers
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=NormConfig(kind="rmsnorm", eps=hf.rms_norm_eps, bias=False),
        act_fn=activation(hf, ARCH),
        positions=rotary_from_hf(rope_parameters(hf, ARCH, 1e6), d_head, ARCH),
        attn_scale=d_head**-0.5, attn_windows=windows,
        gated_mlp=True, moe=MoE(n_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok),
    )


def _experts(src: KeyLedger, hf_i: str, cfg: ModelConfig) -> dict[str, Tensor]:
    """One layer's router and experts in our layout, from either HF layout:

    - transformers >= 5 modules (a live model's ``state_dict()``): ``mlp.gate.weight [expert d_model]``,
      ``mlp.experts.gate_up_proj [expert 2*d_mlp d_model]`` (gate rows first: ``_default_apply_gate``
      chunks it as ``gate, up``) and ``mlp.experts.down_proj [expert d_model d_mlp]``;
    - checkpoints (Mistral's releases, and what ``save_pretrained`` writes back through
      conversion_mapping.py): ``block_sparse_moe.gate.weight`` and per-expert ``nn.Linear``s
      ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down).
    """
    assert cfg.moe is not None
    e, m, f = cfg.moe.n_experts, cfg.d_model, cfg.d_mlp
    if f"{hf_i}.mlp.gate.weight" in src:
        router = src.pop(f"{hf_i}.mlp.gate.weight", (e, m))
        gate, up = src.pop(f"{hf_i}.mlp.experts.gate_up_proj", (e, 2 * f, m)).split(f, dim=1)
        down = src.pop(f"{hf_i}.mlp.experts.down_proj", (e, m, f))
    else:
        moe = f"{hf_i}.block_sparse_moe"
        router = src.pop(f"{moe}.gate.weight", (e, m))
        gate, up, down = (torch.stack([src.pop(f"{moe}.experts.{j}.{w}.weight", shape) for j in range(e)])
                          for w, shape in (("w1", (f, m)), ("w3", (f, m)), ("w2", (m, f))))
    return {
        "W_router": einops.rearrange(router, "expert d_model -> d_model expert"),
        "W_gate": einops.rearrange(gate, "expert d_mlp d_model -> expert d_model d_mlp"),
        "W_in": einops.rearrange(up, "expert d_mlp d_model -> expert d_model d_mlp"),
        "W_out": einops.rearrange(down, "expert d_model d_mlp -> expert d_mlp d_model"),
    }


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: MixtralConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # MixtralAttention: q/k/v/o_proj have no bias.
        out = pop_norms(src, hf_i, ours, cfg.d_model)
        out |= pop_attention(src, f"{hf_i}.self_attn", ours, cfg, w_e)
        return out | {f"{ours}.mlp.{k}": t for k, t in _experts(src, hf_i, cfg).items()}

    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, MixtralConfig]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, num_local_experts=4)
    return {
        "default": MixtralConfig(**base, num_experts_per_tok=2),  # GQA, top-2 of 4 (Mixtral-8x7B's routing)
        "top_1": MixtralConfig(**base, num_experts_per_tok=1),
        # Shorter than the test sequences, so the window binds.
        "sliding_window": MixtralConfig(**base, num_experts_per_tok=2, sliding_window=4),
        "tied_head_dim_16": MixtralConfig(**base, num_experts_per_tok=2, tie_word_embeddings=True, head_dim=16),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="mixtral", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
