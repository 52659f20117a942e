"""Gemma 2 family (gemma-2-2b/9b/27b and their -it models). Mirrors
transformers/models/gemma2/modeling_gemma2.py (``Gemma2ForCausalLM``): Gemma plus norms after each
sublayer, tanh soft-capping of attention scores and final logits, and alternating sliding-window layers."""

from torch import Tensor
from transformers import Gemma2Config

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, convert_decoder, decoder_sizes, rotary_buffer_keys,
)
from hooked_attn.architectures.gemma import (
    check_activation, check_causal, pop_gemma_layer, SANDWICH_NORMS, embed_scale, gemma_norm,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, rope_parameters, rotary_from_hf
from hooked_attn.config import ModelConfig
from hooked_attn.shapes import StateDict

ARCH = "Gemma2ForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "head_dim", "hidden_activation", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "attention_bias",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "sliding_window", "layer_types",
    "use_bidirectional_attention",  # read only to refuse True
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
})
IGNORED_HF_KEYS = rotary_buffer_keys()


def layer_windows(arch: str, layer_types: list[str], sliding_window: int | None) -> tuple[int | None, ...]:
    """Our per-layer window from HF's ``layer_types``: ``sliding_window`` on "sliding_attention" layers.

    HF's sliding mask (masking_utils.sliding_window_overlay) keeps ``kv_idx > q_idx - sliding_window``,
    i.e. ``q_pos - k_pos < window``: the same convention as ``ModelConfig.attn_windows``.
    """
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise UnsupportedConfigError(f"{arch}: config field layer_types has {unknown} layers; only "
                                     "sliding_attention and full_attention are supported")
    if "sliding_attention" in layer_types and sliding_window is None:
        # HF's create_sliding_window_causal_mask refuses this too.
        raise UnsupportedConfigError(f"{arch}: config field sliding_window=None with sliding_attention layers")
    return tuple(sliding_window if t == "sliding_attention" else None for t in layer_types)


def config_from_hf(hf: Gemma2Config) -> ModelConfig:
    check_causal(ARCH, hf)
    act = check_activation(ARCH, "hidden_activation", hf.hidden_activation)
    d_head = hf.head_dim
    norm = gemma_norm(hf.rms_norm_eps)
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=norm, act_fn=act,
        # Gemma2DecoderLayer: x + post_attention_layernorm(attn(input_layernorm(x))), then
        # x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))): all four GemmaRMSNorms.
        block_norms="sandwich", post_norm=norm,
        positions=rotary_from_hf(rope_parameters(hf, ARCH, 10_000.0), d_head, ARCH),
        # Gemma2Attention: self.scaling = query_pre_attn_scalar**-0.5 (not head_dim**-0.5; 27b uses
        # hidden_size / num_attention_heads = 144 with head_dim 128).
        attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
        gated_mlp=True, embed_scale=embed_scale(hf.hidden_size),
        attn_windows=layer_windows(ARCH, list(hf.layer_types), hf.sliding_window),
        # eager_attention_forward: scores = matmul(q, k^T) * scaling; then softcap * tanh(scores /
        # softcap), then the mask, all in the activation dtype: our attention does the same
        # operations in the same order (and takes its explicit path whenever a cap is set).
        attn_scores_soft_cap=hf.attn_logit_softcapping,
        # Gemma2ForCausalLM.forward: logits / cap, tanh, * cap, after lm_head, in the activation dtype.
        output_logits_soft_cap=hf.final_logit_softcapping,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: Gemma2Config) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # Naming trap: in Gemma 2, post_attention_layernorm is the norm ON the attention output (our
        # ln1_post), not the pre-MLP norm it is in LLaMA/Gemma; the pre-MLP norm is pre_feedforward_layernorm.
        return pop_gemma_layer(src, hf_i, ours, cfg, hf.attention_bias, w_e, SANDWICH_NORMS)

    # W_E unscaled (embed_scale applies in forward); the tie as in gemma.py.
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, Gemma2Config]:
    # 2 layers: sliding then full (Gemma2Config.__post_init__'s default layer_types); a window of 4
    # binds on the tests' 7- to 16-token sequences. query_pre_attn_scalar differs from head_dim.
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, head_dim=16, rms_norm_eps=1e-6, sliding_window=4, query_pre_attn_scalar=24)
    return {
        # Both caps on (HF's defaults, 50 and 30), lowered so tanh bends the tiny model's values.
        "default": Gemma2Config(**base, num_key_value_heads=2, attn_logit_softcapping=4.0,
                                final_logit_softcapping=8.0),
        "caps_off": Gemma2Config(**base, num_key_value_heads=2, attn_logit_softcapping=None,
                                 final_logit_softcapping=None),
        "attn_cap_only": Gemma2Config(**base, num_key_value_heads=4, attn_logit_softcapping=4.0,
                                      final_logit_softcapping=None),
        "logit_cap_only": Gemma2Config(**base, num_key_value_heads=2, attn_logit_softcapping=None,
                                       final_logit_softcapping=8.0),
        "untied_all_full": Gemma2Config(**base, num_key_value_heads=2, tie_word_embeddings=False,
                                        layer_types=["full_attention"] * 2),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="gemma2", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
