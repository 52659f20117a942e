"""Gemma 3 family, text-only (gemma-3-270m, gemma-3-1b, and the text towers of the larger models loaded
as ``Gemma3ForCausalLM``). Mirrors transformers/models/gemma3/modeling_gemma3.py (``Gemma3ForCausalLM``):
Gemma 2's sandwich norms and sliding windows, plus Q/K RMSNorm and separate local/global rotary bases."""

from typing import Any

import einops
from torch import Tensor
from transformers import Gemma3TextConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import DECODER_SIZE_FIELDS, convert_decoder, decoder_sizes
from hooked_attn.architectures.gemma import (
    check_activation, pop_gemma_layer, SANDWICH_NORMS, embed_scale, gemma_norm,
)
from hooked_attn.architectures.gemma2 import layer_windows
from hooked_attn.architectures.parsers import ROPE_FIELDS, ROPE_PARAMETERS_LAYOUT, rope_config, rope_parameters, rotary_from_hf
from hooked_attn.config import ModelConfig, QKNorm, Rotary
from hooked_attn.shapes import StateDict

ARCH = "Gemma3ForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "head_dim", "hidden_activation", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "query_pre_attn_scalar", "final_logit_softcapping",
    "sliding_window", "layer_types",
    # {"sliding_attention": {...}, "full_attention": {...}}: Gemma3TextConfig.convert_rope_params_to_dict
    # puts rope_local_base_freq into the first and rope_theta plus any rope_scaling into the second.
    "rope_parameters",
    "rope_local_base_freq",  # transformers 4.57: the sliding layers' base (5.x: in rope_parameters)
    "use_bidirectional_attention",
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
    # Gemma3Attention stores it (self.attn_logit_softcapping) but never passes softcap= to the
    # attention function, in any attention implementation: HF's result does not depend on it.
    "attn_logit_softcapping",
    # The legacy sliding_window_pattern (Hub configs still carry it; the config keeps a copy as
    # _sliding_window_pattern), used by Gemma3TextConfig.__post_init__ only to fill layer_types when
    # a config has none; layer_types (handled) is what the model reads.
    "sliding_window_pattern", "_sliding_window_pattern",
})
IGNORED_HF_KEYS = ("model.layers.*.self_attn.rotary_emb.inv_freq", "model.rotary_emb.*inv_freq")


def layer_rotaries(hf: Gemma3TextConfig, d_head: int) -> tuple[Rotary, ...]:
    """One Rotary per layer, from ``rope_parameters[layer_types[i]]``.

    Gemma3RotaryEmbedding builds one inv_freq per layer type, and each decoder layer takes the cos/sin
    of its own type: the local base (10k) on sliding layers, the global base (1M) plus any rope
    scaling (linear, factor 8, on the 4b-27b models) on full layers. Both rotate halves.
    """
    if ROPE_PARAMETERS_LAYOUT:
        params = dict(hf.rope_parameters or {})
    else:
        # transformers 4.57: Gemma3TextModel builds rotary_emb from rope_theta and rope_scaling (the
        # full-attention layers) and rotary_emb_local from a copy of the config with rope_theta =
        # rope_local_base_freq and no scaling (the sliding layers).
        params = {"full_attention": rope_parameters(hf, ARCH),
                  "sliding_attention": {"rope_type": "default", "rope_theta": hf.rope_local_base_freq}}
    per_type: dict[str, Rotary] = {}
    for layer_type in sorted(set(hf.layer_types)):
        rope = params.get(layer_type)
        if rope is None:
            raise UnsupportedConfigError(f"{ARCH}: config field rope_parameters has no entry for {layer_type!r} "
                                         f"layers (it has {sorted(params)})")
        per_type[layer_type] = rotary_from_hf(dict(rope), d_head, ARCH)
    return tuple(per_type[t] for t in hf.layer_types)


def config_from_hf(hf: Gemma3TextConfig) -> ModelConfig:
    act = check_activation(ARCH, "hidden_activation", hf.hidden_activation)
    d_head = hf.head_dim
    norm = gemma_norm(hf.rms_norm_eps)
    rotaries = layer_rotaries(hf, d_head)
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=norm, act_fn=act,
        # Gemma3DecoderLayer: the same four norms as Gemma 2 (input, post_attention, pre_feedforward,
        # post_feedforward), all GemmaRMSNorms.
        block_norms="sandwich", post_norm=norm,
        # positions only says "rotary"; layer_rotary overrides it in every layer.
        positions=rotaries[-1], layer_rotary=rotaries,
        # Gemma3Attention: q_norm/k_norm are Gemma3RMSNorm(head_dim) applied to [batch head pos
        # d_head] after the projections and before rotary: one (1 + w) gain shared by all heads,
        # statistics and gain in float32, then cast (the same norm as the residual stream's).
        qk_norm=QKNorm(norm=norm, over="head"),
        attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,  # Gemma3Attention.scaling
        gated_mlp=True, embed_scale=embed_scale(hf.hidden_size),
        attn_windows=layer_windows(ARCH, list(hf.layer_types), hf.sliding_window),
        # use_bidirectional_attention (EmbeddingGemma): Gemma3TextModel.forward ORs a full mask onto the
        # causal one of full layers, and onto the sliding layers' mask the overlay
        # |q_idx - kv_idx| < sliding_window, so every query sees the keys within the window on both
        # sides: our causal=False with the same attn_windows. Gemma3TextConfig.__post_init__ has
        # already turned the config's window w into w // 2 + 1; hf.sliding_window is that value.
        causal=not hf.use_bidirectional_attention,
        # Gemma3ForCausalLM.forward: logits / cap, tanh, * cap (None on the released checkpoints).
        output_logits_soft_cap=hf.final_logit_softcapping,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: Gemma3TextConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # As in Gemma 2, post_attention_layernorm is the norm on the attention output (ln1_post) and
        # pre_feedforward_layernorm the pre-MLP norm (ln2).
        out = pop_gemma_layer(src, hf_i, ours, cfg, hf.attention_bias, w_e, SANDWICH_NORMS)
        # HF's q_norm/k_norm hold one [d_head] gain shared by every head; ours are per head
        # [head d_head] (QKNorm's layout, which also fits OLMo-2 and Cohere), so it is repeated.
        for name, n in (("q_norm", cfg.n_heads), ("k_norm", cfg.n_kv_heads)):
            w = src.pop(f"{hf_i}.self_attn.{name}.weight", (cfg.d_head,))
            out[f"{ours}.attn.{name}.w"] = einops.repeat(w, "d_head -> head d_head", head=n)
        return out

    # W_E unscaled (embed_scale applies in forward); the tie as in gemma.py.
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, Gemma3TextConfig]:
    # 3 layers with sliding_window_pattern=3: sliding, sliding, full (the released models use 5:1 over
    # 18-62 layers; more random layers only add fp32 noise). A window of 4 binds on the tests' 7- to
    # 16-token sequences; different local and global bases make a layer that took the wrong table fail.
    def rope(**full: Any) -> dict[str, Any]:
        """The local base 10 on sliding layers, ``full`` on full-attention ones, in the installed layout."""
        if ROPE_PARAMETERS_LAYOUT:
            return {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                        "full_attention": {"rope_type": "default", "rope_theta": 10_000.0, **full}}}
        return {"rope_local_base_freq": 10.0, **rope_config(**{"rope_theta": 10_000.0, **full})}

    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3, max_position_embeddings=64,
                num_attention_heads=4, head_dim=16, rms_norm_eps=1e-6, sliding_window=4, query_pre_attn_scalar=64,
                sliding_window_pattern=3)
    return {
        "default": Gemma3TextConfig(**base, num_key_value_heads=2, **rope()),
        "mqa": Gemma3TextConfig(**base, num_key_value_heads=1, **rope()),    # gemma-3-270m/1b
        # Global layers with linear rope scaling (gemma-3-4b and up); explicit layer_types.
        "rope_scaling": Gemma3TextConfig(**base, num_key_value_heads=2,
                                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                         **rope(rope_type="linear", factor=8.0)),
        "final_softcap_untied": Gemma3TextConfig(**base, num_key_value_heads=2, **rope(),
                                                 final_logit_softcapping=8.0, tie_word_embeddings=False),
        # HF ignores attn_logit_softcapping in Gemma 3: equal logits prove we ignore it the same way.
        "attn_softcap_unused": Gemma3TextConfig(**base, num_key_value_heads=2, **rope(),
                                                attn_logit_softcapping=1.0),
        # Bidirectional (EmbeddingGemma): the window of 4 becomes 4 // 2 + 1 = 3 on each side.
        "bidirectional": Gemma3TextConfig(**base, num_key_value_heads=1, **rope(),
                                          use_bidirectional_attention=True),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="gemma3_text", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
