"""BLOOM family (bigscience/bloom, bloom-560m ... bloomz). Mirrors transformers/models/bloom/modeling_bloom.py."""

from torch import Tensor
from transformers import BloomConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    FALCON_FRAME, convert_decoder, heads_out, pop_linear_mlp, pop_norm, pop_norms, qkv_per_head,
)
from hooked_attn.config import Alibi, ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "BloomForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    # to_dict() spells the sizes n_layer / n_head (attribute_map aliases num_hidden_layers /
    # num_attention_heads to them); a checkpoint's n_embed is folded into hidden_size by __post_init__.
    "vocab_size", "hidden_size", "n_layer", "n_head", "layer_norm_epsilon", "tie_word_embeddings",
    "apply_residual_connection_post_layernorm",
    # Read only to refuse pretraining_tp > 1 together with slow_but_exact. Either alone changes nothing:
    # BloomAttention/BloomMLP take the sliced path only when both are set.
    "pretraining_tp", "slow_but_exact",
})
IGNORED_HF_FIELDS = frozenset({
    "hidden_dropout", "attention_dropout",  # dropout: off at inference
    # bigscience/bloom-560m's config.json (and others) carries these Megatron training settings;
    # transformers never reads them (its softmax is always float32, its fusions do not exist).
    "attention_softmax_in_fp32", "bias_dropout_fusion", "masked_softmax_fusion", "offset_alibi",
    "skip_bias_add", "skip_bias_add_qkv", "n_inner",
})
IGNORED_HF_KEYS: tuple[str, ...] = ()  # the ALiBi slopes are computed in forward, never stored
# BLOOM has no maximum length of its own (ALiBi needs no table); n_ctx is informational here and is
# set to the 2048-token context BLOOM was trained with.
_N_CTX = 2048


def config_from_hf(hf: BloomConfig) -> ModelConfig:
    if hf.pretraining_tp > 1 and hf.slow_but_exact:
        # The sliced path of BloomAttention.forward / BloomMLP.forward sums F.linear over column slices
        # of dense / dense_4h_to_h *without their biases*, so HF then drops two trained biases per layer.
        # Matching that, or the checkpoint as trained, would each be wrong by someone's reading: refuse.
        raise UnsupportedConfigError(
            f"{ARCH}: config fields pretraining_tp={hf.pretraining_tp} with slow_but_exact=True are not supported "
            "(transformers then omits the dense and dense_4h_to_h biases); set slow_but_exact=False"
        )
    d_head = hf.hidden_size // hf.n_head
    norm = NormConfig(kind="layernorm", eps=hf.layer_norm_epsilon)
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.n_layer, d_model=hf.hidden_size, n_heads=hf.n_head, n_kv_heads=hf.n_head, d_head=d_head,
        d_mlp=4 * hf.hidden_size,  # BloomMLP: dense_h_to_4h is always 4 * hidden_size wide
        d_vocab=hf.vocab_size, n_ctx=_N_CTX, norm=norm,
        # BloomGelu is x/2 (1 + tanh(0.79788456 x (1 + 0.044715 x^2))): the tanh approximation of
        # gelu_new with sqrt(2/pi) truncated to 8 digits, which differs by float rounding only.
        act_fn="gelu_new",
        # BloomAttention.forward: scores = alibi.baddbmm(q, k^T, beta=1, alpha=1/sqrt(d_head)), i.e.
        # q.k / sqrt(d_head) + slope[head] * k_pos, with BLOOM's slopes (_get_alibi_slopes) and k_pos
        # counting real tokens (build_alibi_tensor): our Alibi exactly.
        positions=Alibi(), attn_scale=d_head**-0.5,
        # BloomModel.word_embeddings_layernorm, right after the token embedding.
        embed_norm=norm,
        # BloomBlock.forward: with apply_residual_connection_post_layernorm the residual each sublayer
        # is added to is the LayerNorm's output, ln(x) + f(ln(x)), not x + f(ln(x)).
        block_norms="normed_residual" if hf.apply_residual_connection_post_layernorm else "pre",
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: BloomConfig) -> dict[str, Tensor]:
    h, d, m = cfg.n_heads, cfg.d_head, cfg.d_model

    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        out = pop_norms(src, hf_i, ours, m, bias=True)
        # BLOOM fuses QKV per head: BloomAttention._reshape views the output as (head, 3, d_head), so
        # rows are ordered (head, qkv, d_head) like GPT-NeoX, unlike GPT-2's (qkv, head, d_head).
        out |= qkv_per_head(src.pop(f"{hf_i}.self_attention.query_key_value.weight", (3 * m, m)),
                            src.pop(f"{hf_i}.self_attention.query_key_value.bias", (3 * m,)), ours, h)
        # nn.Linear weights are [out, in]; dense reads the merged (head d_head) axis (_merge_heads).
        out[f"{ours}.attn.W_O"] = heads_out(src.pop(f"{hf_i}.self_attention.dense.weight", (m, h * d)), d)
        out[f"{ours}.attn.b_O"] = src.pop(f"{hf_i}.self_attention.dense.bias", (m,))
        return out | pop_linear_mlp(src, f"{hf_i}.mlp", ours, cfg, ("dense_h_to_4h", "dense_4h_to_h"))

    def embed_norm(src: KeyLedger, w_e: Tensor) -> dict[str, Tensor]:
        # word_embeddings_layernorm: a LayerNorm right after the lookup (BloomModel.forward).
        return pop_norm(src, "transformer.word_embeddings_layernorm", "embed_ln", m, bias=True)

    # A tied checkpoint may omit lm_head.weight (it is then the token embedding); lm_head has no bias.
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, **FALCON_FRAME,
                           extra=embed_norm, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, BloomConfig]:
    base = dict(vocab_size=97, n_layer=2, bos_token_id=0, eos_token_id=0)
    return {
        "default": BloomConfig(**base, hidden_size=32, n_head=4),
        # 6 heads is not a power of two: the slopes interleave those of 8 heads (_get_alibi_slopes).
        "six_heads_untied": BloomConfig(**base, hidden_size=48, n_head=6, tie_word_embeddings=False),
        # bigscience/bloom's pretraining_tp=4 without slow_but_exact: the ordinary path.
        "pretraining_tp_4": BloomConfig(**base, hidden_size=32, n_head=4, pretraining_tp=4),
        "residual_post_layernorm": BloomConfig(**base, hidden_size=32, n_head=4,
                                               apply_residual_connection_post_layernorm=True),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="bloom", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
