"""Phi-3 family (Phi-3-mini/medium with the default rope, Phi-4). Mirrors
transformers/models/phi3/modeling_phi3.py (``Phi3ForCausalLM``). Checkpoints with longrope (the 128k
Phi-3 and Phi-3.5 models) are refused."""

from torch import Tensor
from transformers import Phi3Config

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, activation, convert_decoder, decoder_sizes, head_dim, heads_in, heads_out, pop_norms,
    rotary_buffer_keys, zeros,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, rope_config, rope_parameters, rotary_from_hf
from hooked_attn.config import ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "Phi3ForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters",  # rope_type (default only) and partial_rotary_factor
    # A top-level partial_rotary_factor (Phi-4-mini's config.json) stays an attribute, but
    # Phi3Config.convert_rope_params_to_dict copies it into rope_parameters with setdefault, and the model
    # reads only rope_parameters["partial_rotary_factor"]: it is read through rope_parameters.
    "partial_rotary_factor",
    "sliding_window",   # one window for every layer, or None
    # Phi3Attention reads getattr(config, "head_dim", hidden_size // num_attention_heads): not a declared
    # field, but a config that carries one gets it.
    "head_dim",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "resid_pdrop", "embd_pdrop", "attention_dropout",  # dropout: off at inference
    # Read only by the longrope rotary (modeling_rope_utils._compute_longrope_parameters and the
    # longrope_frequency_update of dynamic_rope_update), which config_from_hf refuses, and by
    # Phi3ForCausalLM.prepare_inputs_for_generation, which at most drops the KV cache.
    "original_max_position_embeddings",
    # Not a Phi3Config field, but Phi-3 config.json files carry attention_bias=false: Phi3Attention never
    # reads it (qkv_proj and o_proj have bias=False), and a checkpoint with bias tensors is refused by the
    # key ledger.
    "attention_bias",
    # Phi-3 config.json files name the remote-code classes the model was first released with
    # (configuration_phi3.Phi3Config / modeling_phi3.Phi3ForCausalLM); transformers uses its built-in
    # Phi3 classes, which this module mirrors, unless trust_remote_code is set.
    "auto_map",
})
# Rotary frequencies are a non-persistent buffer; old checkpoints may still carry them.
IGNORED_HF_KEYS = rotary_buffer_keys()


def config_from_hf(hf: Phi3Config) -> ModelConfig:
    rope = rope_parameters(hf, ARCH, 10_000.0)
    kind = rope.get("rope_type", "default")
    if kind != "default":
        # Phi3Config.validate_rope allows default and longrope (legacy "su"/"yarn" are renamed longrope).
        # longrope rescales each frequency by short_factor / long_factor depending on the sequence
        # length and multiplies cos/sin by an attention factor; our Rotary has no such scaling.
        raise UnsupportedConfigError(f"{ARCH}: config field rope_parameters with rope_type={kind!r} is not supported "
                                     "(only the default rope type)")
    if hf.sliding_window is not None and hf.sliding_window <= 0:
        raise UnsupportedConfigError(f"{ARCH}: config field sliding_window={hf.sliding_window!r} is not supported")
    d_head = head_dim(hf)
    # Partial rotary: Phi3RotaryEmbedding.compute_default_rope_parameters builds frequencies for
    # int(head_dim * partial_rotary_factor) dims; apply_rotary_pos_emb rotates those first dims of each
    # head with rotate_half and passes the rest through.
    n_rot = int(d_head * rope.get("partial_rotary_factor", 1.0))
    if n_rot <= 0 or n_rot % 2:
        raise UnsupportedConfigError(
            f"{ARCH}: rope_parameters partial_rotary_factor={rope.get('partial_rotary_factor')!r} gives "
            f"{n_rot} rotary dimensions of d_head={d_head}; a positive even number is needed"
        )
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=NormConfig(kind="rmsnorm", eps=hf.rms_norm_eps, bias=False),  # Phi3RMSNorm: LLaMA's RMSNorm
        act_fn=activation(hf, ARCH),
        positions=rotary_from_hf(rope, d_head, ARCH),
        attn_scale=d_head**-0.5, gated_mlp=True,  # Phi3Attention: self.scaling = self.head_dim**-0.5
        # Phi3Model.forward: create_sliding_window_causal_mask for every layer whenever
        # config.sliding_window is not None.
        attn_windows=None if hf.sliding_window is None else (hf.sliding_window,) * hf.num_hidden_layers,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: Phi3Config) -> dict[str, Tensor]:
    h, kv, d, m, f = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp

    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        out = pop_norms(src, hf_i, ours, m)
        # Fused qkv_proj (bias=False): Phi3Attention.forward slices its output as
        # [:h*d] queries, [h*d : h*d + kv*d] keys, the rest values, each (head d_head). With GQA the
        # three blocks differ in size, so split by size first, then unflatten heads.
        qkv = src.pop(f"{hf_i}.self_attn.qkv_proj.weight", ((h + 2 * kv) * d, m))
        for site, w in zip("QKV", qkv.split([h * d, kv * d, kv * d], dim=0)):
            out[f"{ours}.attn.W_{site}"] = heads_in(w, d)
            out[f"{ours}.attn.b_{site}"] = zeros(w_e, w.shape[0] // d, d)
        out[f"{ours}.attn.W_O"] = heads_out(src.pop(f"{hf_i}.self_attn.o_proj.weight", (m, h * d)), d)
        out[f"{ours}.attn.b_O"] = zeros(w_e, m)
        # Fused gate_up_proj (bias=False): Phi3MLP.forward does `gate, up_states = x.chunk(2, dim=-1)`, so
        # the first d_mlp rows are the gate and the last d_mlp rows the up projection;
        # down_proj(up * act(gate)).
        w_gate, w_up = src.pop(f"{hf_i}.mlp.gate_up_proj.weight", (2 * f, m)).chunk(2, dim=0)
        return out | {
            f"{ours}.mlp.W_gate": w_gate.T, f"{ours}.mlp.b_gate": zeros(w_e, f),
            f"{ours}.mlp.W_in": w_up.T, f"{ours}.mlp.b_in": zeros(w_e, f),
            f"{ours}.mlp.W_out": src.pop(f"{hf_i}.mlp.down_proj.weight", (m, f)).T,
            f"{ours}.mlp.b_out": zeros(w_e, m),
        }

    # Phi3ForCausalLM._tied_weights_keys: a tied checkpoint may omit lm_head.weight (bias=False).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, Phi3Config]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                original_max_position_embeddings=64, num_attention_heads=4, bos_token_id=0, eos_token_id=1,
                pad_token_id=2)
    return {
        # GQA with a window of 4 that binds on the 9-token test sequences (Phi-3-mini has 2047).
        "default": Phi3Config(**base, num_key_value_heads=2, sliding_window=4),
        "mha_no_window": Phi3Config(**base),                                              # Phi-3-mini-4k layout
        "mqa_tied": Phi3Config(**base, num_key_value_heads=1, tie_word_embeddings=True, sliding_window=6),
        # Rotary on half of each head (Phi-4-mini uses 0.75), with another theta.
        "partial_rotary": Phi3Config(**base, num_key_value_heads=2, sliding_window=5, **rope_config(
            rope_type="default", rope_theta=500.0, partial_rotary_factor=0.5)),
        "quarter_rotary_gelu": Phi3Config(**base, num_key_value_heads=2, hidden_act="gelu_new",
                                          partial_rotary_factor=0.25),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="phi3", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
