"""Falcon family (Falcon-7B/40B/180B, Falcon-RW with ALiBi). Mirrors
transformers/models/falcon/modeling_falcon.py."""

import einops
from torch import Tensor
from transformers import FalconConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    FALCON_FRAME, LLAMA_NORMS, SHARED_NORM, activation, bias_rule, convert_decoder, heads_out, pop_bias,
    pop_norms,
)
from hooked_attn.architectures.parsers import ROPE_FIELDS, rope_config, rope_parameters, rotary_from_hf
from hooked_attn.config import Alibi, ModelConfig, NormConfig, Rotary
from hooked_attn.shapes import StateDict

ARCH = "FalconForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_kv_heads", "layer_norm_epsilon",
    "max_position_embeddings", "ffn_hidden_size", "activation", "tie_word_embeddings", "bias",
    "new_decoder_architecture", "multi_query", "parallel_attn", "num_ln_in_parallel_attn", "rope_parameters",
    "alibi",
    # Not a FalconConfig field, but the Falcon hub configs (falcon-7b, falcon-rw-1b...) carry it from the
    # original RW code. FalconDecoderLayer never reads it; read only to refuse True.
    "apply_residual_connection_post_layernorm",
}) | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "hidden_dropout", "attention_dropout",  # dropout: off at inference
})
IGNORED_HF_KEYS = ("transformer.rotary_emb.inv_freq",)  # a non-persistent buffer, rebuilt from rope_parameters


def _layout(hf: FalconConfig) -> tuple[int, bool, int]:
    """(K/V heads, parallel block, norms per parallel block), refusing what FalconDecoderLayer cannot run."""
    h = hf.num_attention_heads
    if hf.new_decoder_architecture:
        # FalconDecoderLayer.__init__ builds ln_attn/ln_mlp only when parallel_attn; its forward then
        # needs them (or input_layernorm with num_ln_in_parallel_attn=1) and fails otherwise.
        if not hf.parallel_attn:
            raise UnsupportedConfigError(f"{ARCH}: config field parallel_attn=False with new_decoder_architecture=True "
                                         "is not supported (transformers' FalconDecoderLayer fails on it)")
        n_ln = 2 if hf.num_ln_in_parallel_attn is None else hf.num_ln_in_parallel_attn  # FalconDecoderLayer.__init__
        if n_ln not in (1, 2):
            raise UnsupportedConfigError(f"{ARCH}: config field num_ln_in_parallel_attn={n_ln!r} is not supported "
                                         "(1 or 2; transformers' FalconDecoderLayer fails on others)")
        return hf.num_kv_heads, True, n_ln
    if hf.parallel_attn and hf.num_ln_in_parallel_attn not in (None, 1):
        raise UnsupportedConfigError(
            f"{ARCH}: config field num_ln_in_parallel_attn={hf.num_ln_in_parallel_attn!r} needs "
            "new_decoder_architecture=True (transformers' FalconDecoderLayer fails without it)"
        )
    if hf.multi_query:
        return 1, hf.parallel_attn, 1  # FalconAttention: one K/V head; config.num_kv_heads is not read
    if hf.num_kv_heads != h:
        # FalconAttention._split_heads gives every head its own K/V here; reshaping them to num_kv_heads fails.
        raise UnsupportedConfigError(f"{ARCH}: config field num_kv_heads={hf.num_kv_heads} with multi_query=False "
                                     f"and new_decoder_architecture=False must equal num_attention_heads={h}")
    return h, hf.parallel_attn, 1


def _positions(hf: FalconConfig, d_head: int) -> Rotary | Alibi:
    if hf.alibi:
        # FalconModel.forward: build_alibi_tensor rounds the slopes, then slope * k_pos, to bfloat16
        # (`slopes[..., None].bfloat16() * arange_tensor`), with k_pos counting real tokens; no rotary
        # then (FalconAttention applies rotary only `if alibi is None`). The bias is scaled with the
        # scores: the original Falcon-RW attention computes (q.k + alibi) / sqrt(d_head), and HF's sdpa
        # branch passes alibi / sqrt(d_head) as the mask of an SDPA scaled by 1/sqrt(d_head), which is
        # the same. (HF's eager branch adds alibi once there and once more through the mask that
        # FalconModel.forward builds from it: tests/conftest.py compares with the sdpa branch.)
        return Alibi(scaled_with_scores=True, bias_dtype="bfloat16")
    rope = rope_parameters(hf, ARCH, 10_000.0)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        # FalconRotaryEmbedding's default init ignores partial_rotary_factor (rotary over all of d_head)
        # while the scaled types honour it and then fail in apply_rotary_pos_emb: no consistent reference.
        raise UnsupportedConfigError(f"{ARCH}: rope_parameters partial_rotary_factor="
                                     f"{rope['partial_rotary_factor']!r} is not supported")
    # Rotary over the whole head, paired by rotate_half (FalconRotaryEmbedding, apply_rotary_pos_emb).
    return rotary_from_hf(rope, d_head, ARCH)


def config_from_hf(hf: FalconConfig) -> ModelConfig:
    if getattr(hf, "apply_residual_connection_post_layernorm", False):
        raise UnsupportedConfigError(f"{ARCH}: config field apply_residual_connection_post_layernorm=True is not "
                                     "supported (transformers' Falcon ignores it, so no reference exists)")
    d_head = hf.hidden_size // hf.num_attention_heads  # FalconConfig.head_dim
    n_kv, parallel, _ = _layout(hf)
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, n_heads=hf.num_attention_heads, n_kv_heads=n_kv,
        d_head=d_head, d_mlp=hf.ffn_hidden_size, d_vocab=hf.vocab_size, n_ctx=hf.max_position_embeddings,
        norm=NormConfig(kind="layernorm", eps=hf.layer_norm_epsilon),
        act_fn=activation(hf, ARCH, "activation"),
        positions=_positions(hf, d_head),
        # FalconAttention: q.k / sqrt(d_head) (inv_norm_factor). Its eager softmax runs in the activation
        # dtype; ours in float32 (identical in fp32).
        attn_scale=d_head**-0.5,
        # FalconDecoderLayer.forward: parallel adds attn(ln(x)) + mlp(ln'(x)) to x; otherwise sequential.
        parallel_attn_mlp=parallel,
    )


def _split_qkv(w: Tensor, hf: FalconConfig, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Split the fused query_key_value rows (the last axis of ``w`` after the row axis, if any, is kept)
    into ``[head ...]``, ``[kv_head ...]``, ``[kv_head ...]`` (FalconAttention._split_heads)."""
    h, kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    if hf.new_decoder_architecture:
        # Rows are (kv_head, slot, d_head) with slot = the group's g query heads, then K, then V; query
        # head kv_head * g + j uses K/V head kv_head, which is our expand_kv_heads grouping.
        g = h // kv
        x = einops.rearrange(w, "(kv_head slot d_head) ... -> kv_head slot d_head ...", slot=g + 2, d_head=d)
        q = einops.rearrange(x[:, :g], "kv_head group d_head ... -> (kv_head group) d_head ...")
        return q, x[:, g], x[:, g + 1]
    if kv == 1:
        # multi_query: rows are (slot, d_head) with slot = all h query heads, then the one K, then the one V.
        x = einops.rearrange(w, "(slot d_head) ... -> slot d_head ...", slot=h + 2, d_head=d)
        return x[:h], x[h:h + 1], x[h + 1:]
    # Multi-head: rows are (head, qkv, d_head), per head like BLOOM and GPT-NeoX.
    x = einops.rearrange(w, "(head qkv d_head) ... -> qkv head d_head ...", qkv=3, d_head=d)
    return x[0], x[1], x[2]


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: FalconConfig) -> dict[str, Tensor]:
    h, kv, d, m, f = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    _, parallel, n_ln = _layout(hf)
    if parallel and n_ln == 1:
        # ONE norm, input_layernorm, read by attention and MLP (FalconDecoderLayer.forward). Our
        # parallel block gives attention ln1 and the MLP ln2, both reading resid_pre, so the same
        # weights go into both: identical outputs, and weight processing folds each copy into its reader.
        norms = SHARED_NORM
    elif parallel:
        norms = {"ln1": "ln_attn", "ln2": "ln_mlp"}  # new_decoder_architecture's two parallel norms
    else:
        norms = LLAMA_NORMS
    # bias=False drops every FalconLinear bias: query_key_value, dense and both MLP projections.
    bias = bias_rule(hf.bias)

    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        out = pop_norms(src, hf_i, ours, m, norms, bias=True)
        # FalconLinear computes x @ W.T (+ b): weights are nn.Linear's [out, in].
        n_rows = (h + 2 * kv) * d
        w_q, w_k, w_v = _split_qkv(src.pop(f"{hf_i}.self_attention.query_key_value.weight", (n_rows, m)), hf, cfg)
        b_qkv = pop_bias(src, f"{hf_i}.self_attention.query_key_value.bias", (n_rows,), w_e, bias)
        b_q, b_k, b_v = _split_qkv(b_qkv, hf, cfg)
        for site, w, b in (("Q", w_q, b_q), ("K", w_k, b_k), ("V", w_v, b_v)):
            out[f"{ours}.attn.W_{site}"] = einops.rearrange(w, "head d_head d_model -> head d_model d_head")
            out[f"{ours}.attn.b_{site}"] = b
        out[f"{ours}.attn.W_O"] = heads_out(src.pop(f"{hf_i}.self_attention.dense.weight", (m, h * d)), d)
        out[f"{ours}.attn.b_O"] = pop_bias(src, f"{hf_i}.self_attention.dense.bias", (m,), w_e, bias)
        return out | {
            f"{ours}.mlp.W_in": src.pop(f"{hf_i}.mlp.dense_h_to_4h.weight", (f, m)).T,
            f"{ours}.mlp.b_in": pop_bias(src, f"{hf_i}.mlp.dense_h_to_4h.bias", (f,), w_e, bias),
            f"{ours}.mlp.W_out": src.pop(f"{hf_i}.mlp.dense_4h_to_h.weight", (m, f)).T,
            f"{ours}.mlp.b_out": pop_bias(src, f"{hf_i}.mlp.dense_4h_to_h.bias", (m,), w_e, bias),
        }

    # A tied checkpoint may omit lm_head.weight (it is then the token embedding); lm_head has no bias.
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, **FALCON_FRAME,
                           ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, FalconConfig]:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=48,
                max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return {
        # HF's defaults (falcon-7b): multi-query, parallel block with one norm, no biases, rotary.
        "default": FalconConfig(**base),
        "mha_sequential_bias": FalconConfig(**base, multi_query=False, parallel_attn=False, bias=True,
                                            tie_word_embeddings=False),
        "mha_parallel_relu": FalconConfig(**base, multi_query=False, activation="relu"),
        # falcon-40b/180b: grouped K/V heads interleaved with their queries, two parallel norms.
        "new_arch_gqa": FalconConfig(**base, new_decoder_architecture=True, num_kv_heads=2),
        "new_arch_mqa_one_norm_bias": FalconConfig(**base, new_decoder_architecture=True, num_kv_heads=1,
                                                   num_ln_in_parallel_attn=1, bias=True),
        "rope_linear": FalconConfig(**base, **rope_config(rope_type="linear", rope_theta=500.0, factor=2.0)),
        # ALiBi (falcon-rw-1b/7b: multi-head, sequential, biases) and the other layouts with it.
        "alibi_mha_sequential_bias": FalconConfig(**base, alibi=True, multi_query=False, parallel_attn=False,
                                                  bias=True),
        "alibi_mqa_parallel": FalconConfig(**base, alibi=True),
        "alibi_new_arch_gqa": FalconConfig(**base, alibi=True, new_decoder_architecture=True, num_kv_heads=2),
        # 12 heads, not a power of two: the slopes interleave those of 16 heads, 2^-0.5, 2^-1.5 ..., which
        # bfloat16 cannot hold exactly (those of 4 or 8 heads are powers of two), so the rounding shows.
        "alibi_twelve_heads_parallel": FalconConfig(**{**base, "num_attention_heads": 12, "hidden_size": 48},
                                                    alibi=True, multi_query=False),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="falcon", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
