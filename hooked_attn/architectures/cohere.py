"""Cohere family (Command-R, Command-R+, Aya-23). Mirrors transformers/models/cohere/modeling_cohere.py
(``CohereForCausalLM``): a parallel block with one bias-free LayerNorm, interleaved rotary, an optional
per-head LayerNorm on q and k, and a constant logit scale."""

import dataclasses

import torch
from torch import Tensor
from transformers import CohereConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, SHARED_NORM, activation, bias_rule, convert_decoder, decoder_sizes, head_dim,
    pop_llama_layer, rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, rope_config, rope_parameters, rotary_from_hf
from hooked_attn.config import ModelConfig, NormConfig, QKNorm
from hooked_attn.shapes import StateDict

ARCH = "CohereForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "hidden_act", "layer_norm_eps", "tie_word_embeddings",
    "rope_parameters", "attention_bias", "logit_scale", "use_qk_norm",
    # CohereAttention reads getattr(config, "head_dim", hidden_size // num_attention_heads): not a declared
    # field, but a config that carries one gets it.
    "head_dim",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
})
IGNORED_HF_KEYS = rotary_buffer_keys()


def config_from_hf(hf: CohereConfig) -> ModelConfig:
    if hf.logit_scale is None:
        # CohereForCausalLM.forward multiplies by it unconditionally; HF's own forward fails on None.
        raise UnsupportedConfigError(f"{ARCH}: config field logit_scale=None is not supported")
    d_head = head_dim(hf)
    rope = rope_parameters(hf, ARCH, 500_000.0)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        # CohereRotaryEmbedding.compute_default_rope_parameters uses the whole head_dim, while HF's
        # scaled rope types would honour the factor: refuse rather than guess.
        raise UnsupportedConfigError(f"{ARCH}: rope_parameters partial_rotary_factor="
                                     f"{rope['partial_rotary_factor']!r} is not supported")
    # CohereLayerNorm: centre and scale in float32 (x.float(); mean; var of the centred x; rsqrt), then
    # weight.float() * x BEFORE the cast back, and no bias: gain_dtype="float32", bias=False.
    norm = NormConfig(kind="layernorm", eps=hf.layer_norm_eps, bias=False, gain_dtype="float32")
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=norm, act_fn=activation(hf, ARCH),
        # Interleaved rotary: CohereRotaryEmbedding repeat_interleaves the frequencies (not cat) and
        # rotate_half pairs dimensions (2i, 2i+1) (x[..., ::2], x[..., 1::2]). apply_rotary_pos_emb
        # upcasts q and k to float32, multiplies by cos/sin (cast to the activation dtype), and casts
        # back; our rotary computes in the activation dtype: the same in fp32, one rounding more in bf16.
        positions=dataclasses.replace(rotary_from_hf(rope, d_head, ARCH), pairing="interleaved"),
        # CohereAttention (use_qk_norm): q_norm/k_norm are CohereLayerNorm((heads, head_dim)) applied to
        # q/k viewed [batch pos head d_head], before rotary: per-head statistics over d_head, per-head gains.
        qk_norm=QKNorm(norm=norm, over="head") if hf.use_qk_norm else None,
        attn_scale=d_head**-0.5,  # CohereAttention: self.scaling = self.head_dim**-0.5
        gated_mlp=True,           # CohereMLP: down_proj(act(gate_proj(x)) * up_proj(x)), no biases
        # CohereDecoderLayer.forward: x + attn(input_layernorm(x)) + mlp(input_layernorm(x)), summed in
        # that order (ours: resid_pre + attn_out + mlp_out).
        parallel_attn_mlp=True,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: CohereConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # ONE norm per block, input_layernorm, read by both attention and MLP. Our parallel block gives
        # attention ln1 and the MLP ln2, both reading resid_pre, so the same weight goes into both:
        # identical outputs, and weight processing folds each copy into its own reader (as gptj.py).
        # The interleaved rotary pairs act within each head's d_head, so no row permutation is needed.
        # All four projections have bias=config.attention_bias; with none, a stray bias key is refused.
        out = pop_llama_layer(src, hf_i, ours, cfg, w_e, norms=SHARED_NORM,
                              attn_bias=bias_rule(hf.attention_bias))
        if hf.use_qk_norm:
            # CohereLayerNorm(hidden_size=(heads, head_dim)): the gains are already [head d_head].
            for name, n in (("q_norm", cfg.n_heads), ("k_norm", cfg.n_kv_heads)):
                out[f"{ours}.attn.{name}.w"] = src.pop(f"{hf_i}.self_attn.{name}.weight", (n, cfg.d_head))
        return out

    # CohereLayerNorm (the final norm too): weight only. CohereForCausalLM._tied_weights_keys: a tied
    # checkpoint (the default) may omit lm_head.weight.
    out = convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)
    # CohereForCausalLM.forward: logits = lm_head(h) * logit_scale. Folded into W_U (in at least fp32,
    # then cast by the loader), so (h W) s becomes h (W s): bit-identical when logit_scale is a power of
    # two (Command-R's 0.0625) and a few ulps apart otherwise (Command-R+'s 0.8333). W_U is then a scaled copy,
    # no longer tied to W_E.
    w_u = out["unembed.W_U"]
    out["unembed.W_U"] = w_u.to(torch.promote_types(w_u.dtype, torch.float32)) * float(hf.logit_scale)
    return out


def tiny_hf_configs() -> dict[str, CohereConfig]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, layer_norm_eps=1e-5, **rope_config(rope_type="default", rope_theta=10000.0))
    return {
        "default": CohereConfig(**base),                                  # MHA, tied, logit_scale 1/16 (Command-R)
        "gqa_qk_norm": CohereConfig(**base, num_key_value_heads=2, use_qk_norm=True),      # Command-R+
        "mqa_untied": CohereConfig(**base, num_key_value_heads=1, tie_word_embeddings=False),
        "attention_bias": CohereConfig(**base, num_key_value_heads=2, attention_bias=True),
        # A scale that is not a power of two (the fold is then exact only to rounding), large enough to give
        # peaked next-token distributions.
        "logit_scale_2.5": CohereConfig(**base, num_key_value_heads=2, logit_scale=2.5),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="cohere", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
