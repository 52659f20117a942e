"""OLMo (1) family (OLMo-1B/7B -hf, OLMo-1.7). Mirrors transformers/models/olmo/modeling_olmo.py
(``OlmoForCausalLM``). Not OLMo-2 (``Olmo2ForCausalLM``: QK-norm, norms after the sublayers)."""

from torch import Tensor
from transformers import OlmoConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, activation, bias_rule, convert_decoder, decoder_sizes, head_dim, pop_llama_layer,
    rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, ROPE_PARAMETERS_LAYOUT, rope_config, rope_parameters, rotary_from_hf
from hooked_attn.config import ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "OlmoForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "hidden_act", "tie_word_embeddings", "rope_parameters",
    "attention_bias",
    "clip_qkv",
    # OlmoAttention reads getattr(config, "head_dim", hidden_size // num_attention_heads): not a declared
    # field, but a config that carries one gets it.
    "head_dim",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
})
# Rotary frequencies are a non-persistent buffer; old checkpoints may still carry them.
IGNORED_HF_KEYS = rotary_buffer_keys()
# OlmoLayerNorm.forward: F.layer_norm(x.float(), ..., None, None, eps=1e-5), a constant, not a config field.
_NORM_EPS = 1e-5


def config_from_hf(hf: OlmoConfig) -> ModelConfig:
    if hf.clip_qkv is not None and not hf.clip_qkv > 0:
        # HF would clamp every q, k, v to [-c, c] with c <= 0: refuse rather than reproduce that.
        raise UnsupportedConfigError(f"{ARCH}: config field clip_qkv={hf.clip_qkv!r} must be positive or "
                                     "None")
    d_head = head_dim(hf)
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        # OlmoLayerNorm: "LayerNorm but with no learnable weight or bias".
        norm=NormConfig(kind="layernorm", eps=_NORM_EPS, weight=False, bias=False),
        act_fn=activation(hf, ARCH),
        positions=rotary_from_hf(rope_parameters(hf, ARCH, 10_000.0), d_head, ARCH),
        attn_scale=d_head**-0.5, gated_mlp=True,  # OlmoAttention: self.scaling = self.head_dim**-0.5
        # OlmoAttention.forward: q, k and v clamped to [-clip_qkv, clip_qkv] right after q/k/v_proj
        # (biases included), before rotary. Weight processing skips the steps that would change what is
        # clamped (processing.why_not).
        clip_qkv=None if hf.clip_qkv is None else float(hf.clip_qkv),
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: OlmoConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # input_layernorm / post_attention_layernorm / norm are OlmoLayerNorm: no parameters, no keys.
        # OlmoAttention: all four projections have bias=config.attention_bias; zeros otherwise. When the
        # config has none, a stray bias key is left over and finish() refuses it.
        # OlmoMLP: down_proj(act(gate_proj(x)) * up_proj(x)), no biases.
        return pop_llama_layer(src, hf_i, ours, cfg, w_e, norms={}, attn_bias=bias_rule(hf.attention_bias))

    # OlmoForCausalLM._tied_weights_keys: a tied checkpoint may omit lm_head.weight (bias=False).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, final_norm=None,
                           ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, OlmoConfig]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, pad_token_id=1, eos_token_id=0)
    return {
        "default": OlmoConfig(**base),                                            # MHA, untied (OLMo-7B)
        "tied": OlmoConfig(**base, tie_word_embeddings=True),                     # OLMo-1B
        "gqa": OlmoConfig(**base, num_key_value_heads=2),
        "mqa": OlmoConfig(**base, num_key_value_heads=1),
        "attention_bias": OlmoConfig(**base, num_key_value_heads=2, attention_bias=True),
        # 4.57's OlmoConfig._rope_scaling_validation accepts exactly the legacy {"type", "factor"}.
        "rope_linear": OlmoConfig(**base, **(rope_config(rope_type="linear", rope_theta=500.0, factor=4.0)
                                             if ROPE_PARAMETERS_LAYOUT else
                                             {"rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 4.0}})),
        # OLMo-1B/7B clamp q, k, v at 8; 0.5 clamps a good share of this tiny model's values (with random
        # biases, so fold_value_biases, which would move b_V past the clamp, must be skipped).
        "clip_qkv_attention_bias": OlmoConfig(**base, num_key_value_heads=2, attention_bias=True,
                                              clip_qkv=0.5),
        "clip_qkv_mha": OlmoConfig(**base, clip_qkv=1.0),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="olmo", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
