"""Granite family (IBM Granite 3.x dense models). Mirrors transformers/models/granite/modeling_granite.py
(``GraniteForCausalLM``): LLaMA plus four scalar multipliers, folded exactly into the weights here."""

import torch
from torch import Tensor
from transformers import GraniteConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, activation, bias_rule, convert_decoder, decoder_sizes, head_dim, pop_llama_layer,
    rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, rope_parameters, rotary_from_hf
from hooked_attn.config import ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "GraniteForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "attention_bias",
    "mlp_bias",
    "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
    # GraniteAttention reads getattr(config, "head_dim", hidden_size // num_attention_heads): not a declared
    # field, but a config that carries one gets it.
    "head_dim",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
})
# Rotary frequencies are a non-persistent buffer; old checkpoints may still carry them.
IGNORED_HF_KEYS = rotary_buffer_keys()


def config_from_hf(hf: GraniteConfig) -> ModelConfig:
    d_head = head_dim(hf)
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=NormConfig(kind="rmsnorm", eps=hf.rms_norm_eps, bias=False),
        act_fn=activation(hf, ARCH),
        positions=rotary_from_hf(rope_parameters(hf, ARCH, 10_000.0), d_head, ARCH),
        # GraniteAttention.__init__: `self.scaling = config.attention_multiplier` (replaces head_dim**-0.5).
        attn_scale=float(hf.attention_multiplier), gated_mlp=True,
    )


def _scaled(t: Tensor, factor: float) -> Tensor:
    """``t * factor`` computed in at least float32 (the loader casts to the target dtype afterwards)."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) * factor


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: GraniteConfig) -> dict[str, Tensor]:
    residual = float(hf.residual_multiplier)

    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # GraniteAttention: all four projections have bias=config.attention_bias; zeros otherwise. When
        # the config has none, a stray bias key is left over and finish() refuses it.
        # GraniteMLP: down_proj(act(gate_proj(x)) * up_proj(x)), all three with bias=config.mlp_bias.
        out = pop_llama_layer(src, hf_i, ours, cfg, w_e, attn_bias=bias_rule(hf.attention_bias),
                              mlp_bias=bias_rule(hf.mlp_bias))
        # GraniteDecoderLayer.forward: `hidden_states = residual + hidden_states * self.residual_multiplier`
        # after self_attn, whose output is o_proj(...) bias included: scale W_O and b_O; the same line
        # after the MLP scales down_proj's output, bias included.
        for key in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out"):
            out[f"{ours}.{key}"] = _scaled(out[f"{ours}.{key}"], residual)
        return out

    # GraniteForCausalLM._tied_weights_keys: a tied checkpoint may omit lm_head.weight; it is then the
    # raw embedding matrix, before embedding_multiplier (that multiplies activations, not the weight).
    out = convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)
    # GraniteModel.forward: `inputs_embeds = inputs_embeds * self.embedding_multiplier`.
    out["embed.W_E"] = _scaled(out["embed.W_E"], float(hf.embedding_multiplier))
    # GraniteForCausalLM.forward: `logits = logits / self.config.logits_scaling` (lm_head has no bias).
    out["unembed.W_U"] = _scaled(out["unembed.W_U"], 1.0 / float(hf.logits_scaling))
    return out


def tiny_hf_configs() -> dict[str, GraniteConfig]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0)
    # Granite-3.x-like multipliers (granite-3.0-2b: 12.0, 0.22, 0.015625, 8.0), with the attention
    # multiplier kept distinct from this tiny model's head_dim**-0.5.
    multipliers = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.25,
                       logits_scaling=8.0)
    return {
        "default": GraniteConfig(**base, **multipliers, num_key_value_heads=2),                  # GQA, untied
        "tied": GraniteConfig(**base, **multipliers, num_key_value_heads=2, tie_word_embeddings=True),
        "mha_attention_bias": GraniteConfig(**base, **multipliers, num_key_value_heads=4, attention_bias=True),
        # Biases on gate_proj, up_proj and down_proj; down_proj's is scaled by residual_multiplier too.
        "mlp_bias": GraniteConfig(**base, **multipliers, num_key_value_heads=2, mlp_bias=True),
        "mqa": GraniteConfig(**base, **multipliers, num_key_value_heads=1),
        "unit_multipliers": GraniteConfig(**base, num_key_value_heads=2),  # HF defaults: all 1.0
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="granite", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
