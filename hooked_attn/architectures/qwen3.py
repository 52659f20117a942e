"""Qwen3 family (Qwen3 dense models, 0.6B-32B). Mirrors transformers/models/qwen3/modeling_qwen3.py
(``Qwen3ForCausalLM``). Not the mixture-of-experts Qwen3-MoE (``Qwen3MoeForCausalLM``)."""

import einops
from torch import Tensor
from transformers import Qwen3Config

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, activation, bias_rule, convert_decoder, decoder_sizes, head_dim, pop_llama_layer,
    rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, full_head_rotary, rope_config, rope_parameters, windows_from_layer_types
from hooked_attn.config import ModelConfig, NormConfig, QKNorm
from hooked_attn.shapes import StateDict

ARCH = "Qwen3ForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "head_dim", "hidden_act", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "attention_bias",
    # Sliding-window attention is decided per layer by layer_types and sliding_window. Qwen3Config's
    # __post_init__ derives both from use_sliding_window and max_window_layers (sliding_window is None
    # unless use_sliding_window; layers i >= max_window_layers slide), so those two are read through them.
    "layer_types", "sliding_window", "use_sliding_window", "max_window_layers",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
})
# Rotary frequencies are a non-persistent buffer; old checkpoints may still carry them.
IGNORED_HF_KEYS = rotary_buffer_keys()


def config_from_hf(hf: Qwen3Config) -> ModelConfig:
    # Qwen3Attention: head_dim = getattr(config, "head_dim", hidden_size // num_attention_heads); Qwen3Config
    # declares head_dim (128 by default), so it is independent of hidden_size.
    d_head = head_dim(hf)
    windows = windows_from_layer_types(hf.layer_types, hf.sliding_window, hf.num_hidden_layers, ARCH)
    rms = NormConfig(kind="rmsnorm", eps=hf.rms_norm_eps, bias=False)  # Qwen3RMSNorm: gain in the input dtype
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=rms,
        act_fn=activation(hf, ARCH),
        positions=full_head_rotary(rope_parameters(hf, ARCH), d_head, ARCH),
        attn_scale=d_head**-0.5, gated_mlp=True,  # Qwen3Attention: self.scaling = self.head_dim**-0.5
        # Qwen3Attention.forward: q_norm(q_proj(x).view(..., head_dim)), likewise k; both Qwen3RMSNorm over
        # head_dim with rms_norm_eps, applied before rotary ("unlike olmo, only on the head dim!").
        qk_norm=QKNorm(norm=rms, over="head"),
        attn_windows=windows,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: Qwen3Config) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # Qwen3Attention: all four projections have bias=config.attention_bias; zeros otherwise. When the
        # config has none, a stray bias key is left over and finish() refuses it.
        # Qwen3MLP: down_proj(act(gate_proj(x)) * up_proj(x)), no biases.
        out = pop_llama_layer(src, hf_i, ours, cfg, w_e, attn_bias=bias_rule(hf.attention_bias))
        # q_norm / k_norm hold ONE gain [head_dim] shared by every head (Qwen3RMSNorm(self.head_dim));
        # our per-head layout stores [head d_head], so the gain is repeated over heads.
        for norm, n in (("q_norm", cfg.n_heads), ("k_norm", cfg.n_kv_heads)):
            gain = src.pop(f"{hf_i}.self_attn.{norm}.weight", (cfg.d_head,))
            out[f"{ours}.attn.{norm}.w"] = einops.repeat(gain, "d_head -> head d_head", head=n).contiguous()
        return out

    # Qwen3ForCausalLM._tied_weights_keys: a tied checkpoint may omit lm_head.weight (bias=False).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, Qwen3Config]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, head_dim=8, rms_norm_eps=1e-6,
                **rope_config(rope_type="default", rope_theta=1000000.0))
    return {
        "default": Qwen3Config(**base, num_key_value_heads=2),                            # GQA, untied (Qwen3-8B)
        "mha_tied": Qwen3Config(**base, num_key_value_heads=4, tie_word_embeddings=True),  # Qwen3-0.6B style
        "mqa_head_dim_16": Qwen3Config(**{**base, "head_dim": 16}, num_key_value_heads=1),
        "attention_bias": Qwen3Config(**base, num_key_value_heads=2, attention_bias=True),
        # use_sliding_window with max_window_layers=1: layer 0 full, layers 1-2 slide over 4 tokens.
        "sliding_upper_layers": Qwen3Config(**{**base, "num_hidden_layers": 3}, num_key_value_heads=2,
                                            use_sliding_window=True, sliding_window=4, max_window_layers=1),
        # Explicit layer_types, alternating, with a window of 3.
        "sliding_alternating": Qwen3Config(**{**base, "num_hidden_layers": 3}, num_key_value_heads=2,
                                           use_sliding_window=True, sliding_window=3,
                                           layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "rope_linear": Qwen3Config(**{**base, **rope_config(rope_type="linear", rope_theta=500.0, factor=4.0)},
                                   num_key_value_heads=2),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="qwen3", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
