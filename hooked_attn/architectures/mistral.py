"""Mistral family (Mistral-7B v0.1-v0.3 and their fine-tunes). Mirrors
transformers/models/mistral/modeling_mistral.py (``MistralForCausalLM``).
"""

from torch import Tensor
from transformers import MistralConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, activation, convert_decoder, decoder_sizes, head_dim, pop_llama_layer,
    rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import (  # full_head_rotary, windows_from_layer_types: re-exported
    ROPE_FIELDS, full_head_rotary, rope_config, rope_parameters, windows_from_layer_types,
)
from hooked_attn.config import ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "MistralForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "head_dim", "hidden_act", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters",
    "sliding_window",  # one window for every layer, or None
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
})
# Rotary frequencies are a non-persistent buffer; old checkpoints may still carry them.
IGNORED_HF_KEYS = rotary_buffer_keys()


def config_from_hf(hf: MistralConfig) -> ModelConfig:
    if getattr(hf, "layer_types", None) is not None:
        # MistralConfig.__post_init__ warns that layer_types is for Ministral: MistralModel never reads
        # it and slides every layer. Refused, since the checkpoint most likely wants alternating layers.
        raise UnsupportedConfigError(f"{ARCH}: config field layer_types={hf.layer_types!r} is not supported "
                                     "(MistralForCausalLM ignores it; load the checkpoint as Ministral)")
    if hf.sliding_window is not None and hf.sliding_window <= 0:
        raise UnsupportedConfigError(f"{ARCH}: config field sliding_window={hf.sliding_window!r} is not supported")
    # MistralAttention: head_dim = getattr(config, "head_dim", None) or hidden_size // num_attention_heads.
    d_head = head_dim(hf)
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=NormConfig(kind="rmsnorm", eps=hf.rms_norm_eps, bias=False),
        act_fn=activation(hf, ARCH),
        positions=full_head_rotary(rope_parameters(hf, ARCH), d_head, ARCH),
        attn_scale=d_head**-0.5, gated_mlp=True,  # MistralAttention: self.scaling = self.head_dim**-0.5
        # MistralModel.forward: create_sliding_window_causal_mask for every layer whenever
        # config.sliding_window is not None ("main diff with Llama").
        attn_windows=None if hf.sliding_window is None else (hf.sliding_window,) * hf.num_hidden_layers,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: MistralConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # MistralAttention: q/k/v/o_proj all have bias=False. MistralMLP: down_proj(act(gate_proj(x)) *
        # up_proj(x)), no biases.
        return pop_llama_layer(src, hf_i, ours, cfg, w_e)

    # MistralForCausalLM._tied_weights_keys: a tied checkpoint may omit lm_head.weight (bias=False).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, MistralConfig]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    return {
        # GQA with a window of 4, shorter than the 9- and 16-token test sequences: the window binds.
        "default": MistralConfig(**base, num_key_value_heads=2, sliding_window=4),
        "no_window": MistralConfig(**base, num_key_value_heads=2, sliding_window=None),   # Mistral-7B v0.3
        "mha_window_1": MistralConfig(**base, num_key_value_heads=4, sliding_window=1),   # attends to itself only
        "mqa_tied": MistralConfig(**base, num_key_value_heads=1, sliding_window=6, tie_word_embeddings=True),
        "head_dim_16": MistralConfig(**base, num_key_value_heads=2, head_dim=16, sliding_window=3,
                                     **rope_config(rope_type="default", rope_theta=1000000.0)),
        "rope_linear": MistralConfig(**base, num_key_value_heads=2, sliding_window=5,
                                     **rope_config(rope_type="linear", rope_theta=500.0, factor=4.0)),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="mistral", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
