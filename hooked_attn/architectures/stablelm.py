"""StableLM family (StableLM-3B-4E1T, StableLM-2 1.6B/12B, Zephyr). Mirrors transformers/models/stablelm/modeling_stablelm.py."""

import torch
from torch import Tensor
from transformers import StableLmConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.common import (
    LLAMA_NORMS, SHARED_NORM, activation, bias_rule, convert_decoder, pop_attention, pop_gated_mlp,
    pop_norms,
)
from hooked_attn.architectures.parsers import (
    ROPE_FIELDS, TRANSFORMERS_MAJOR, rope_parameters, rotary_dims, rotary_from_hf,
)
from hooked_attn.config import ModelConfig, NormConfig, QKNorm
from hooked_attn.shapes import StateDict

ARCH = "StableLmForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "intermediate_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "layer_norm_eps", "tie_word_embeddings",
    # Holds partial_rotary_factor (0.25 by default, StableLmConfig.__post_init__).
    "rope_parameters", "use_qkv_bias", "qk_layernorm", "use_parallel_residual",
}) | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "hidden_dropout", "attention_dropout",  # dropout: off at inference
})
IGNORED_HF_KEYS = ("model.rotary_emb.inv_freq",)  # a non-persistent buffer, rebuilt from rope_parameters


def config_from_hf(hf: StableLmConfig) -> ModelConfig:
    # StableLmAttention: head_dim = hidden_size // num_attention_heads (no head_dim field).
    d_head = hf.hidden_size // hf.num_attention_heads
    rope = rope_parameters(hf, ARCH)
    # Partial rotary: the first int(d_head * partial_rotary_factor) dimensions of each head rotate,
    # paired by rotate_half (StableLmAttention.rotary_ndims, apply_rotary_pos_emb); the rest pass through.
    # StableLmAttention fails with none, so zero is refused too.
    rotary_dims(rope, d_head, ARCH, zero_ok=False)
    qk_norm = None
    if hf.qk_layernorm:
        # StableLmLayerNormPerHead: one nn.LayerNorm(d_head, bias=False) per head, with its own weight,
        # on q and k before rotary. gain_dtype="float32" applies the gain before the single rounding to
        # the activation dtype, as nn.LayerNorm does (and keeps the [head d_head] gain off F.layer_norm,
        # which takes a [d_head] weight only).
        qk_norm = QKNorm(norm=NormConfig(kind="layernorm", eps=hf.layer_norm_eps, bias=False, gain_dtype="float32"),
                         over="head")
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads, d_head=d_head, d_mlp=hf.intermediate_size, d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings, norm=NormConfig(kind="layernorm", eps=hf.layer_norm_eps),
        act_fn=activation(hf, ARCH),
        positions=rotary_from_hf(rope, d_head, ARCH), attn_scale=d_head**-0.5,
        gated_mlp=True,  # StableLmMLP: down(act(gate(x)) * up(x)), no biases
        # StableLmDecoderLayer.forward: parallel adds attn(ln(x)) + mlp(ln(x)) to x, one shared norm.
        parallel_attn_mlp=hf.use_parallel_residual,
        qk_norm=qk_norm,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: StableLmConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # With use_parallel_residual: ONE norm, input_layernorm, read by attention and MLP
        # (post_attention_layernorm is None). Our parallel block gives attention ln1 and the MLP ln2, both
        # reading resid_pre, so the same weights go into both: identical outputs, and weight processing
        # folds each copy into its reader.
        norms = SHARED_NORM if cfg.parallel_attn_mlp else LLAMA_NORMS
        out = pop_norms(src, hf_i, ours, cfg.d_model, norms, bias=True)
        # Separate q/k/v projections; biases only with use_qkv_bias; o_proj never has one
        # (StableLmAttention.__init__).
        out |= pop_attention(src, f"{hf_i}.self_attn", ours, cfg, w_e, bias=bias_rule(hf.use_qkv_bias), o_bias="none")
        if cfg.qk_norm is not None:
            # q_layernorm.norms.{head} / k_layernorm.norms.{head}: one [d_head] weight per (K/V) head,
            # stacked into our per-head gains [head d_head].
            for site, hf_norm, n in (("q", "q_layernorm", cfg.n_heads), ("k", "k_layernorm", cfg.n_kv_heads)):
                out[f"{ours}.attn.{site}_norm.w"] = torch.stack(
                    [src.pop(f"{hf_i}.self_attn.{hf_norm}.norms.{j}.weight", (cfg.d_head,)) for j in range(n)]
                )
        return out | pop_gated_mlp(src, f"{hf_i}.mlp", ours, cfg, w_e)

    # A tied checkpoint may omit lm_head.weight (it is then the token embedding); lm_head has no bias.
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, norm_bias=True,
                           ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, StableLmConfig]:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64)
    variants = {
        # HF's defaults (stablelm-3b-4e1t): sequential, rotary on a quarter of each head, no biases.
        "default": StableLmConfig(**base, num_key_value_heads=4),
        # stablelm-2-1_6b: q/k/v biases, half rotary.
        "qkv_bias_half_rotary_gqa": StableLmConfig(**base, num_key_value_heads=2, use_qkv_bias=True,
                                                   partial_rotary_factor=0.5),
        # stablelm-2-12b: parallel residual with per-head q/k LayerNorms.
        "parallel_qk_layernorm_gqa": StableLmConfig(**base, num_key_value_heads=2, use_parallel_residual=True,
                                                    qk_layernorm=True),
        "qk_layernorm_tied_gelu": StableLmConfig(**base, num_key_value_heads=4, qk_layernorm=True,
                                                 tie_word_embeddings=True, hidden_act="gelu"),
    }
    if TRANSFORMERS_MAJOR < 5:
        # transformers 4.57's StableLmPreTrainedModel._init_weights zeroes every LayerNorm's bias, and the
        # per-head q/k LayerNorms have none: HF cannot build these models there, so there is no reference.
        return {name: cfg for name, cfg in variants.items() if not cfg.qk_layernorm}
    return variants


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="stablelm", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
