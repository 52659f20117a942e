"""SmolLM3 family (SmolLM3-3B). Mirrors transformers/models/smollm3/modeling_smollm3.py
(``SmolLM3ForCausalLM``): a LLaMA-style decoder in which some layers use no rotary embedding (NoPE)."""

from torch import Tensor
from transformers import SmolLM3Config

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, activation, bias_rule, convert_decoder, decoder_sizes, head_dim, pop_llama_layer,
    rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, full_head_rotary, rope_parameters, windows_from_layer_types
from hooked_attn.config import ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "SmolLM3ForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "attention_bias",
    "mlp_bias",
    "no_rope_layers",  # per layer: 1 = rotary, 0 = NoPE
    # Sliding windows: the mask of layer i is chosen by layer_types[i], with config.sliding_window.
    "layer_types", "sliding_window", "use_sliding_window",
    # SmolLM3Attention reads getattr(config, "head_dim", hidden_size // num_attention_heads): not a declared
    # field, but a config that carries one gets it.
    "head_dim",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",        # dropout: off at inference
    # SmolLM3Config.__post_init__ uses it only to fill no_rope_layers when that is None; the model reads
    # no_rope_layers, which to_dict() always carries.
    "no_rope_layer_interval",
    # Not SmolLM3Config fields, but SmolLM3-3B's config.json carries them: max_window_layers (a Qwen2
    # leftover) is read neither by the config's __post_init__ nor by the model (layer_types decides the
    # windows), and pretraining_tp is never read (transformers 5 does not split the matmuls).
    "max_window_layers", "pretraining_tp",
})
# Rotary frequencies are a non-persistent buffer; old checkpoints may still carry them.
IGNORED_HF_KEYS = rotary_buffer_keys()


def config_from_hf(hf: SmolLM3Config) -> ModelConfig:
    n = hf.num_hidden_layers
    no_rope = list(hf.no_rope_layers)
    if len(no_rope) != n or any(flag not in (0, 1) for flag in no_rope):
        raise UnsupportedConfigError(f"{ARCH}: config field no_rope_layers={no_rope!r} must hold one 0 or 1 "
                                     f"per layer ({n} layers)")
    windows = windows_from_layer_types(hf.layer_types, hf.sliding_window, n, ARCH)
    if windows is not None and not hf.use_sliding_window:
        # SmolLM3Model builds the sliding mask from layer_types alone (eager and sdpa), while
        # SmolLM3Attention.sliding_window also needs use_sliding_window (flash attention): HF's own
        # implementations disagree, so there is no single model to reproduce.
        raise UnsupportedConfigError(
            f"{ARCH}: config field layer_types={hf.layer_types!r} has sliding_attention layers while "
            "use_sliding_window=False; HF's eager and flash attention disagree on such a config"
        )
    d_head = head_dim(hf)
    rotary = full_head_rotary(rope_parameters(hf, ARCH), d_head, ARCH)
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=NormConfig(kind="rmsnorm", eps=hf.rms_norm_eps, bias=False),
        act_fn=activation(hf, ARCH),
        positions=rotary,
        # SmolLM3Attention: `self.use_rope = config.no_rope_layers[layer_idx]`; apply_rotary_pos_emb runs
        # only when it is truthy. Every layer shares one rotary table (SmolLM3Model.rotary_emb).
        layer_rotary=None if all(no_rope) else tuple(rotary if flag else None for flag in no_rope),
        attn_scale=d_head**-0.5, gated_mlp=True,  # SmolLM3Attention: self.scaling = self.head_dim**-0.5
        attn_windows=windows,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: SmolLM3Config) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # SmolLM3Attention: all four projections have bias=config.attention_bias; zeros otherwise. When
        # the config has none, a stray bias key is left over and finish() refuses it. NoPE layers have
        # the same keys. SmolLM3MLP: down_proj(act(gate_proj(x)) * up_proj(x)), all three with
        # bias=config.mlp_bias.
        return pop_llama_layer(src, hf_i, ours, cfg, w_e, attn_bias=bias_rule(hf.attention_bias),
                               mlp_bias=bias_rule(hf.mlp_bias))

    # SmolLM3ForCausalLM._tied_weights_keys: tied by default, and a tied checkpoint may omit
    # lm_head.weight (bias=False).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, SmolLM3Config]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, max_position_embeddings=64,
                num_attention_heads=4, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return {
        # GQA, tied; with HF's interval of 4, two layers both use rotary.
        "default": SmolLM3Config(**base, num_hidden_layers=2, num_key_value_heads=2),
        # Every 2nd layer is NoPE, as every 4th is in SmolLM3-3B: layers 0 and 2 rotate, layer 1 does not.
        "nope_interval_2": SmolLM3Config(**base, num_hidden_layers=3, num_key_value_heads=2,
                                         no_rope_layer_interval=2, tie_word_embeddings=False),
        "nope_first_mha": SmolLM3Config(**base, num_hidden_layers=2, num_key_value_heads=4, no_rope_layers=[0, 1]),
        "all_nope_mqa": SmolLM3Config(**base, num_hidden_layers=2, num_key_value_heads=1, no_rope_layers=[0, 0]),
        # HF's derivation: NoPE layers slide when use_sliding_window is set (here layer 1, window 4).
        "nope_layers_slide": SmolLM3Config(**base, num_hidden_layers=3, num_key_value_heads=2,
                                           no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4),
        "attention_bias": SmolLM3Config(**base, num_hidden_layers=2, num_key_value_heads=2, attention_bias=True,
                                        no_rope_layers=[1, 0]),
        "mlp_bias": SmolLM3Config(**base, num_hidden_layers=2, num_key_value_heads=2, mlp_bias=True),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="smollm3", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
