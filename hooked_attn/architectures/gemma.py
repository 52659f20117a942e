"""Gemma (1) family (gemma-2b, gemma-7b, CodeGemma). Mirrors transformers/models/gemma/modeling_gemma.py
(``GemmaForCausalLM``); also holds the Gemma layout helpers that gemma2.py and gemma3.py reuse."""


from collections.abc import Mapping

from torch import Tensor
from transformers import GemmaConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    DECODER_SIZE_FIELDS, LLAMA_NORMS, bias_rule, convert_decoder, decoder_sizes, pop_llama_layer,
    rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import ACTIVATIONS, ROPE_FIELDS, rope_config, rope_parameters, rotary_from_hf
from hooked_attn.config import ActFn, ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "GemmaForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "head_dim", "hidden_act", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "attention_bias",
    "use_bidirectional_attention",  # read only to refuse True
}) | DECODER_SIZE_FIELDS | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
})
# Rotary frequencies are a non-persistent buffer; old checkpoints may still carry them.
IGNORED_HF_KEYS = rotary_buffer_keys()
# gelu_pytorch_tanh (all Gemma checkpoints; GemmaConfig.__post_init__ rewrites the legacy "gelu" to it)
# is F.gelu(approximate="tanh"), which is our "gelu_new".


def gemma_norm(eps: float) -> NormConfig:
    """GemmaRMSNorm: ``(x * rsqrt(mean(x^2) + eps)) * (1 + w)``, all in float32, cast back at the end.

    HF stores ``w`` around 0 and computes ``1.0 + weight.float()`` in float32 and multiplies before
    the cast (``output * (1.0 + self.weight.float())`` then ``type_as(x)``), unlike LLaMA, which casts
    first: ``weight_offset=1`` with ``gain_dtype="float32"`` does exactly that, so bf16 rounds as HF's.
    """
    return NormConfig(kind="rmsnorm", eps=eps, bias=False, weight_offset=1.0, gain_dtype="float32")


def embed_scale(d_model: int) -> float:
    """GemmaTextScaledWordEmbedding multiplies by ``sqrt(d_model)``.

    HF keeps the scale in a buffer ``torch.tensor(hidden_size**0.5)`` and multiplies by it cast to the
    weight dtype (``self.embed_scale.to(self.weight.dtype)``): in bf16 the factor itself is rounded
    (sqrt(3072) = 55.43 becomes 55.5). Our model multiplies by ``torch.tensor(embed_scale,
    dtype=activation dtype)``, the same rounding of the same Python float: equal in fp32, bf16 and fp64.
    """
    return d_model**0.5


def check_activation(arch: str, field: str, value: str) -> ActFn:
    if value not in ACTIVATIONS:
        raise UnsupportedConfigError(f"{arch}: config field {field}={value!r} is not supported "
                                     f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[value]


def check_causal(arch: str, hf) -> None:
    """Refuse use_bidirectional_attention=True for Gemma 1 and 2, where transformers has no single meaning.

    GemmaAttention/Gemma2Attention only set ``is_causal = not use_bidirectional_attention``, while
    GemmaModel/Gemma2Model still build their masks with create_causal_mask. Eager attention adds that
    causal mask and stays causal; the kernels that read ``is_causal`` instead of a mask (Gemma's sdpa
    when nothing is padded, flash attention) attend both ways. Gemma 3 (gemma3.py) changes the masks
    themselves and is supported.
    """
    if getattr(hf, "use_bidirectional_attention", None):
        raise UnsupportedConfigError(
            f"{arch}: config field use_bidirectional_attention=True is not supported (transformers' eager "
            "attention stays causal while its sdpa/flash attention becomes bidirectional, so there is no "
            "single reference to match; Gemma3 configs support it)")


def config_from_hf(hf: GemmaConfig) -> ModelConfig:
    check_causal(ARCH, hf)
    act = check_activation(ARCH, "hidden_act", hf.hidden_act)
    # head_dim is a field of its own (256 for gemma-7b, where hidden_size // heads would be 192).
    d_head = hf.head_dim
    return ModelConfig(
        hf_architecture=ARCH,
        **decoder_sizes(hf, d_head),
        norm=gemma_norm(hf.rms_norm_eps), act_fn=act,
        positions=rotary_from_hf(rope_parameters(hf, ARCH, 10_000.0), d_head, ARCH),
        attn_scale=d_head**-0.5,  # GemmaAttention: self.scaling = self.head_dim**-0.5
        gated_mlp=True,           # GemmaMLP: down_proj(act(gate_proj(x)) * up_proj(x)), no biases
        embed_scale=embed_scale(hf.hidden_size),
    )


SANDWICH_NORMS = {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm",
                  "ln2": "pre_feedforward_layernorm", "ln2_post": "post_feedforward_layernorm"}
"""Gemma 2 and 3's four block norms (ours -> HF): a norm before and after attention and the MLP."""


def pop_gemma_layer(
    src: KeyLedger, hf_i: str, ours: str, cfg: ModelConfig, attention_bias: bool, like: Tensor,
    norms: Mapping[str, str],
) -> dict[str, Tensor]:
    """The ``norms`` (ours -> HF), the q/k/v/o projections and the gated MLP of one Gemma (1, 2 or 3)
    decoder layer; the zero biases the family lacks take ``like``'s dtype and device."""
    # d_head = config.head_dim, which need not be hidden_size // num_attention_heads. All four
    # projections have bias=config.attention_bias; with none, a stray bias key is refused.
    # GemmaMLP: down_proj(act(gate_proj(x)) * up_proj(x)), no biases.
    return pop_llama_layer(src, hf_i, ours, cfg, like, norms=norms, attn_bias=bias_rule(attention_bias))


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: GemmaConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # GemmaRMSNorm weights are stored as w, applied as (1 + w) (gemma_norm); post_attention_layernorm
        # is the pre-MLP norm here (LLAMA_NORMS).
        return pop_gemma_layer(src, hf_i, ours, cfg, hf.attention_bias, w_e, LLAMA_NORMS)

    # embed.W_E is the unscaled table: hook_embed sees it times embed_scale, as HF's inputs_embeds.
    # The tie is to embed_tokens.weight itself, the *unscaled* table (the sqrt(d_model) factor is
    # applied in GemmaTextScaledWordEmbedding.forward, not stored), so W_U = W_E^T exactly; a tied
    # checkpoint may omit lm_head.weight (bias=False).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, GemmaConfig]:
    # head_dim=16 with 4 heads: the attention width (64) differs from hidden_size (32), as in gemma-7b.
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, head_dim=16, rms_norm_eps=1e-6)
    return {
        "default": GemmaConfig(**base, num_key_value_heads=2),                       # GQA, tied (the default)
        "mha": GemmaConfig(**base, num_key_value_heads=4),                           # gemma-7b
        "mqa": GemmaConfig(**base, num_key_value_heads=1),                           # gemma-2b
        "untied": GemmaConfig(**base, num_key_value_heads=2, tie_word_embeddings=False),
        "attention_bias": GemmaConfig(**base, num_key_value_heads=2, attention_bias=True),
        "head_dim_8": GemmaConfig(**{**base, "head_dim": 8}, num_key_value_heads=2),  # 4 * 8 = 32 = hidden_size
        "rope_linear": GemmaConfig(**base, num_key_value_heads=2,
                                   **rope_config(rope_type="linear", rope_theta=500.0, factor=4.0)),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="gemma", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
