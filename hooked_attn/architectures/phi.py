"""Phi family (phi-1, phi-1.5, phi-2). Mirrors transformers/models/phi/modeling_phi.py."""

import einops
from torch import Tensor
from transformers import PhiConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, SHARED_NORM, activation, convert_decoder, decoder_sizes, pop_attention,
    pop_linear_mlp, pop_norms, rotary_dims,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, rope_config, rope_parameters, rotary_from_hf
from hooked_attn.config import ModelConfig, NormConfig, QKNorm
from hooked_attn.shapes import StateDict

ARCH = "PhiForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "hidden_act", "layer_norm_eps", "tie_word_embeddings",
    "rope_parameters",  # holds partial_rotary_factor (0.5 by default, PhiConfig.__post_init__)
    "qk_layernorm",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "resid_pdrop", "embd_pdrop", "attention_dropout",  # dropout: off at inference
})
IGNORED_HF_KEYS = ("model.rotary_emb.inv_freq",)  # a non-persistent buffer, rebuilt from rope_parameters


def config_from_hf(hf: PhiConfig) -> ModelConfig:
    # PhiAttention: head_dim = hidden_size // num_attention_heads (PhiConfig has no head_dim field).
    d_head = hf.hidden_size // hf.num_attention_heads
    rope = rope_parameters(hf, ARCH)
    # Partial rotary: only the first int(d_head * partial_rotary_factor) dimensions of each head rotate,
    # paired by rotate_half (PhiAttention.rotary_ndims, apply_rotary_pos_emb); the rest pass through.
    n_rot = rotary_dims(rope, d_head, ARCH)
    # rotary_ndims == 0: apply_rotary_pos_emb rotates the empty slice and passes the rest through, so q
    # and k carry no position (attention sees order only through the causal mask): no rotary at all.
    qk_norm = None
    if hf.qk_layernorm:
        # PhiAttention.forward: q_layernorm/k_layernorm, nn.LayerNorm(d_head) with weight and bias, on
        # every head's q and k after the projections, before the partial rotary. gain_dtype="float32"
        # applies the gain before the one rounding to the activation dtype, as nn.LayerNorm does.
        head_ln = NormConfig(kind="layernorm", eps=hf.layer_norm_eps, gain_dtype="float32")
        qk_norm = QKNorm(norm=head_ln, over="head")
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=NormConfig(kind="layernorm", eps=hf.layer_norm_eps),
        act_fn=activation(hf, ARCH),
        positions=rotary_from_hf(rope, d_head, ARCH) if n_rot else None, attn_scale=d_head**-0.5,
        # PhiDecoderLayer.forward: attention and MLP both read input_layernorm(x) and add to x.
        parallel_attn_mlp=True,
        qk_norm=qk_norm,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: PhiConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # Phi has ONE norm per block, input_layernorm, read by both attention and MLP (PhiDecoderLayer).
        # Our parallel block gives attention ln1 and the MLP ln2, both reading resid_pre, so the same
        # weights go into both: identical outputs, and weight processing folds each copy into its reader.
        out = pop_norms(src, hf_i, ours, cfg.d_model, SHARED_NORM, bias=True)
        # Separate q/k/v projections and a dense output projection, all with bias.
        out |= pop_attention(src, f"{hf_i}.self_attn", ours, cfg, w_e, bias="required",
                             names=("q_proj", "k_proj", "v_proj", "dense"))
        if cfg.qk_norm is not None:
            # q_layernorm/k_layernorm: ONE [d_head] weight and bias shared by every head; ours are per
            # head [head d_head] (QKNorm's layout), so each is repeated over the (K/V) heads.
            for site, hf_norm, n in (("q", "q_layernorm", cfg.n_heads), ("k", "k_layernorm", cfg.n_kv_heads)):
                for param, ours_param in (("weight", "w"), ("bias", "b")):
                    t = src.pop(f"{hf_i}.self_attn.{hf_norm}.{param}", (cfg.d_head,))
                    t = einops.repeat(t, "d_head -> head d_head", head=n)
                    out[f"{ours}.attn.{site}_norm.{ours_param}"] = t
        return out | pop_linear_mlp(src, f"{hf_i}.mlp", ours, cfg, ("fc1", "fc2"))

    # A tied checkpoint may omit lm_head.weight (it is then the token embedding); lm_head.bias is
    # never tied and always present (PhiForCausalLM: nn.Linear(..., bias=True)).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings,
                           final_norm="model.final_layernorm", norm_bias=True, lm_head_bias="lm_head.bias",
                           ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, PhiConfig]:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return {
        "default": PhiConfig(**base),                                   # rotary on half of each head
        "gqa": PhiConfig(**base, num_key_value_heads=2),
        "quarter_rotary_tied": PhiConfig(**base, partial_rotary_factor=0.25, tie_word_embeddings=True),
        "full_rotary_gelu": PhiConfig(**base, partial_rotary_factor=1.0, hidden_act="gelu",
                                      **rope_config(rope_type="default", rope_theta=500.0)),
        # A LayerNorm (weight and bias) on each head's q and k, before the partial rotary.
        "qk_layernorm_gqa": PhiConfig(**base, num_key_value_heads=2, qk_layernorm=True),
        "no_rotary": PhiConfig(**base, partial_rotary_factor=0.0),      # no positional information at all
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="phi", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
