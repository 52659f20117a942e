"""Qwen2 family (Qwen2, Qwen2.5, their instruct and coder models). Mirrors
transformers/models/qwen2/modeling_qwen2.py (``Qwen2ForCausalLM``)."""

from torch import Tensor
from transformers import Qwen2Config

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, activation, convert_decoder, decoder_sizes, head_dim, pop_llama_layer,
    rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, rope_config, rope_parameters, rotary_from_hf
from hooked_attn.architectures.mistral import windows_from_layer_types
from hooked_attn.config import ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "Qwen2ForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters",
    # Qwen2Attention reads getattr(config, "head_dim", hidden_size // num_attention_heads): not a declared
    # field, but a config that carries one gets it.
    "head_dim",
    # Sliding-window attention: HF decides per layer from layer_types (Qwen2Config.__post_init__ derives
    # it from use_sliding_window, sliding_window and max_window_layers; see config_from_hf).
    "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
})
# Rotary frequencies are a non-persistent buffer; old checkpoints may still carry them.
IGNORED_HF_KEYS = rotary_buffer_keys()


def config_from_hf(hf: Qwen2Config) -> ModelConfig:
    d_head = head_dim(hf)
    # Qwen2Config.__post_init__ sets sliding_window=None unless use_sliding_window, and (when layer_types
    # is not given) marks layers i >= max_window_layers as "sliding_attention". Qwen2Model then gives
    # those layers create_sliding_window_causal_mask with config.sliding_window (Qwen2Attention also
    # passes it to the kernel): keys with q_pos - k_pos < sliding_window, our attn_windows rule.
    windows = windows_from_layer_types(hf.layer_types, hf.sliding_window, hf.num_hidden_layers, ARCH)
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=NormConfig(kind="rmsnorm", eps=hf.rms_norm_eps, bias=False),
        act_fn=activation(hf, ARCH),
        positions=rotary_from_hf(rope_parameters(hf, ARCH, 10_000.0), d_head, ARCH),
        attn_scale=d_head**-0.5, gated_mlp=True,  # Qwen2Attention: self.scaling = self.head_dim**-0.5
        attn_windows=windows,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: Qwen2Config) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # Qwen2Attention: q/k/v_proj always have a bias (bias=True), o_proj never (bias=False).
        # Qwen2MLP: down_proj(act(gate_proj(x)) * up_proj(x)), no biases.
        return pop_llama_layer(src, hf_i, ours, cfg, w_e, attn_bias="required", o_bias="none")

    # Qwen2ForCausalLM._tied_weights_keys: a tied checkpoint may omit lm_head.weight.
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, Qwen2Config]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, rms_norm_eps=1e-6, **rope_config(rope_type="default", rope_theta=1000000.0))
    return {
        "default": Qwen2Config(**base, num_key_value_heads=2),                            # GQA, untied (Qwen2-7B)
        "mha": Qwen2Config(**base, num_key_value_heads=4),
        "mqa": Qwen2Config(**base, num_key_value_heads=1),
        "tied": Qwen2Config(**base, num_key_value_heads=2, tie_word_embeddings=True),   # Qwen2.5-0.5B style
        "head_dim_16": Qwen2Config(**base, num_key_value_heads=2, head_dim=16),
        # A window shorter than the test sequences, switched on but used by no layer
        # (max_window_layers >= num_hidden_layers): every layer_types entry is full_attention.
        "sliding_window_unused": Qwen2Config(**base, num_key_value_heads=2, use_sliding_window=True,
                                             sliding_window=4, max_window_layers=2),
        # Layer 0 full, layer 1 sliding with a window of 4 (layers >= max_window_layers slide); the
        # 9- and 16-token test sequences are longer than the window, so it binds.
        "sliding_window_layer_1": Qwen2Config(**base, num_key_value_heads=2, use_sliding_window=True,
                                              sliding_window=4, max_window_layers=1),
        # Explicit layer_types: sliding first, then full, window of 1 (each query sees itself only).
        "sliding_layer_types_window_1": Qwen2Config(**base, num_key_value_heads=2, use_sliding_window=True,
                                                    sliding_window=1,
                                                    layer_types=["sliding_attention", "full_attention"]),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="qwen2", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
