"""LLaMA family (Llama 1-3, SmolLM2, TinyLlama...). Mirrors transformers/models/llama/modeling_llama.py."""

from torch import Tensor
from transformers import LlamaConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.parsers import ROPE_FIELDS, rope_config, rope_parameters, rotary_from_hf
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, activation, bias_rule, convert_decoder, decoder_sizes, head_dim, pop_llama_layer,
    rotary_buffer_keys,
)
from hooked_attn.config import ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "LlamaForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "attention_bias", "mlp_bias", "head_dim",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
    "pretraining_tp",     # transformers 5 no longer splits the matmuls; the result does not depend on it
})
def config_from_hf(hf: LlamaConfig) -> ModelConfig:
    d_head = head_dim(hf)
    return ModelConfig(
        hf_architecture="LlamaForCausalLM",
        **decoder_sizes(hf, d_head),
        norm=NormConfig(kind="rmsnorm", eps=hf.rms_norm_eps, bias=False),
        act_fn=activation(hf, ARCH),
        positions=rotary_from_hf(rope_parameters(hf, ARCH, 10_000.0), d_head, "LlamaForCausalLM"),
        attn_scale=d_head**-0.5, gated_mlp=True,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: LlamaConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # Biases are present only with attention_bias; zeros otherwise (our layout always has biases).
        # LlamaMLP: down_proj(act(gate_proj(x)) * up_proj(x)); all three have bias=config.mlp_bias.
        return pop_llama_layer(src, hf_i, ours, cfg, w_e, attn_bias="optional",
                               mlp_bias=bias_rule(hf.mlp_bias))

    # A tied checkpoint may omit lm_head.weight (bias=False): W_U is then the token embedding.
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=rotary_buffer_keys())


def tiny_hf_configs() -> dict[str, LlamaConfig]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, rms_norm_eps=1e-6)
    return {
        "mha": LlamaConfig(**base, num_key_value_heads=4),
        "gqa": LlamaConfig(**base, num_key_value_heads=2),
        "mqa": LlamaConfig(**base, num_key_value_heads=1),
        "tied": LlamaConfig(**base, num_key_value_heads=2, tie_word_embeddings=True),
        "attention_bias": LlamaConfig(**base, num_key_value_heads=2, attention_bias=True),
        # Biases on gate_proj, up_proj and down_proj (b_gate, b_in, b_out), with attention biases too.
        "mlp_bias": LlamaConfig(**base, num_key_value_heads=2, mlp_bias=True, attention_bias=True),
        "head_dim_16": LlamaConfig(**base, num_key_value_heads=2, head_dim=16),
        "rope_linear": LlamaConfig(**base, num_key_value_heads=2,
                                   **rope_config(rope_type="linear", rope_theta=500.0, factor=4.0)),
        "rope_llama3": LlamaConfig(**base, num_key_value_heads=2, **rope_config(
            rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture="LlamaForCausalLM", model_type="llama", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
