"""StarCoder2 family (StarCoder2-3B/7B/15B). Mirrors transformers/models/starcoder2/modeling_starcoder2.py
(``Starcoder2ForCausalLM``)."""

from torch import Tensor
from transformers import Starcoder2Config

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, activation, bias_rule, convert_decoder, decoder_sizes, head_dim, pop_attention,
    pop_bias, pop_norms, rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, full_head_rotary, rope_config, rope_parameters
from hooked_attn.config import ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "Starcoder2ForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "hidden_act", "norm_epsilon", "tie_word_embeddings",
    "rope_parameters", "use_bias",
    "sliding_window",  # one window for every layer, or None
    # Starcoder2Attention reads getattr(config, "head_dim", None) or hidden_size // num_attention_heads:
    # not a declared field, but a config that carries one gets it.
    "head_dim",
    # Not Starcoder2Config fields, but the StarCoder2 config.json files carry them; the model never reads
    # them (it always builds nn.LayerNorm with norm_epsilon and the c_fc/c_proj MLP). Accepted only with
    # the values that match what it builds: anything else would describe a different model.
    "norm_type", "mlp_type", "layer_norm_epsilon",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout", "residual_dropout", "embedding_dropout",  # dropout: off at inference
})
# Rotary frequencies are a non-persistent buffer; old checkpoints may still carry them.
IGNORED_HF_KEYS = rotary_buffer_keys()


def config_from_hf(hf: Starcoder2Config) -> ModelConfig:
    if hf.sliding_window is not None and hf.sliding_window <= 0:
        raise UnsupportedConfigError(f"{ARCH}: config field sliding_window={hf.sliding_window!r} is not supported")
    for name, built in (("norm_type", "layer_norm"), ("mlp_type", "default"), ("layer_norm_epsilon", hf.norm_epsilon)):
        value = getattr(hf, name, None)
        if value is not None and value != built:
            raise UnsupportedConfigError(f"{ARCH}: config field {name}={value!r} is not supported (Starcoder2ForCausalLM "
                                         f"ignores it and builds the model for {name}={built!r})")
    d_head = head_dim(hf)
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        # Starcoder2DecoderLayer and Starcoder2Model.norm: nn.LayerNorm(eps=norm_epsilon), always with a bias
        # (use_bias only concerns the linear layers).
        norm=NormConfig(kind="layernorm", eps=hf.norm_epsilon),
        act_fn=activation(hf, ARCH),
        positions=full_head_rotary(rope_parameters(hf, ARCH), d_head, ARCH),
        attn_scale=d_head**-0.5,  # Starcoder2Attention: self.scaling = self.head_dim**-0.5
        # Starcoder2MLP: c_proj(act(c_fc(x))), not gated.
        gated_mlp=False,
        # Starcoder2Model.forward: create_sliding_window_causal_mask for every layer whenever
        # config.sliding_window is not None.
        attn_windows=None if hf.sliding_window is None else (hf.sliding_window,) * hf.num_hidden_layers,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: Starcoder2Config) -> dict[str, Tensor]:
    # q/k/v/o_proj, c_fc and c_proj all have bias=config.use_bias; zeros otherwise. When the config has
    # none, a stray bias key is left over and finish() refuses it.
    bias = bias_rule(hf.use_bias)
    f, m = cfg.d_mlp, cfg.d_model

    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        out = pop_norms(src, hf_i, ours, m, bias=True)
        out |= pop_attention(src, f"{hf_i}.self_attn", ours, cfg, w_e, bias=bias)
        return out | {
            f"{ours}.mlp.W_in": src.pop(f"{hf_i}.mlp.c_fc.weight", (f, m)).T,
            f"{ours}.mlp.b_in": pop_bias(src, f"{hf_i}.mlp.c_fc.bias", (f,), w_e, bias),
            f"{ours}.mlp.W_out": src.pop(f"{hf_i}.mlp.c_proj.weight", (m, f)).T,
            f"{ours}.mlp.b_out": pop_bias(src, f"{hf_i}.mlp.c_proj.bias", (m,), w_e, bias),
        }

    # Starcoder2ForCausalLM._tied_weights_keys: tied by default, and a tied checkpoint may omit
    # lm_head.weight (bias=False).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, norm_bias=True,
                           ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, Starcoder2Config]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, bos_token_id=0, eos_token_id=0)
    return {
        # GQA, tied, biases, a window of 4 that binds on the 9-token test sequences (StarCoder2-7B layout).
        "default": Starcoder2Config(**base, num_key_value_heads=2, sliding_window=4),
        "no_window": Starcoder2Config(**base, num_key_value_heads=2),
        "mha_untied": Starcoder2Config(**base, num_key_value_heads=4, tie_word_embeddings=False, sliding_window=6),
        "mqa_no_bias": Starcoder2Config(**base, num_key_value_heads=1, use_bias=False, sliding_window=3),
        "gelu_rope_theta": Starcoder2Config(**base, num_key_value_heads=2, hidden_act="gelu", sliding_window=5,
                                            **rope_config(rope_type="default", rope_theta=100000.0)),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="starcoder2", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
