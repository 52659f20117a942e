"""BERT encoders (``BertModel``, ``BertForMaskedLM``). Mirrors transformers/models/bert/modeling_bert.py.

BERT is post-LN: ``LayerNorm(x + attn(x))`` then ``LayerNorm(x + mlp(x))`` (our ``block_norms=
"post_residual"``), with bidirectional attention, token-type embeddings and a LayerNorm on the
summed embeddings. These records are registered with ``kind="encoder"``: ``HookedEncoder`` loads
them, ``HookedTransformer`` refuses them.
"""

from torch import Tensor
from transformers import BertConfig

from hooked_attn.architectures import by_kind, register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import activation, heads_in, heads_out, pop_lm_head, tied_embed_key
from hooked_attn.config import LearnedPositions, ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "tie_word_embeddings", "is_decoder",
    "position_embedding_type",
})
IGNORED_HF_FIELDS = frozenset({
    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",  # dropout: off at inference
    "gradient_checkpointing",                                                   # training only
})
# The pooler (a dense + tanh on the first token, for next-sentence prediction) is not part of the
# hooked model; old checkpoints also carry the position-id buffer.
IGNORED_HF_KEYS = ("pooler.dense.*", "bert.pooler.dense.*", "*embeddings.position_ids", "cls.seq_relationship.*")


def config_from_hf(hf: BertConfig, architecture: str = "BertModel") -> ModelConfig:
    if hf.is_decoder:
        raise UnsupportedConfigError(f"{architecture}: config field is_decoder=True (causal BERT) is not supported")
    if getattr(hf, "position_embedding_type", "absolute") not in ("absolute", None):
        raise UnsupportedConfigError(
            f"{architecture}: config field position_embedding_type={hf.position_embedding_type!r} is not supported")
    ln = NormConfig(kind="layernorm", eps=hf.layer_norm_eps)
    d_head = hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        hf_architecture=architecture, n_layers=hf.num_hidden_layers, d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_attention_heads, d_head=d_head,
        d_mlp=hf.intermediate_size, d_vocab=hf.vocab_size, n_ctx=hf.max_position_embeddings, norm=ln,
        act_fn=activation(hf, architecture),
        positions=LearnedPositions(n_ctx=hf.max_position_embeddings), attn_scale=d_head**-0.5, causal=False,
        block_norms="post_residual", final_norm=False, embed_norm=ln,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: BertConfig) -> dict[str, Tensor]:
    """Our encoder layout. Keys carry a ``bert.`` prefix in BertForMaskedLM and none in BertModel."""
    src = KeyLedger(hf_sd, cfg.hf_architecture)
    p = "bert." if any(k.startswith("bert.") for k in hf_sd) else ""
    m, d, f, v = cfg.d_model, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    e = f"{p}embeddings"
    decoder = "cls.predictions.decoder.weight"
    embed = tied_embed_key(src, f"{e}.word_embeddings.weight", (decoder,), hf.tie_word_embeddings)
    out = {"embed.W_E": src.pop(embed, (v, m)),
           "pos_embed.W_pos": src.pop(f"{e}.position_embeddings.weight", (cfg.n_ctx, m)),
           "token_type_embed.W_token_type": src.pop(f"{e}.token_type_embeddings.weight", (hf.type_vocab_size, m)),
           "embed_ln.w": src.pop(f"{e}.LayerNorm.weight", (m,)), "embed_ln.b": src.pop(f"{e}.LayerNorm.bias", (m,))}
    for i in range(cfg.n_layers):
        hf_i, ours = f"{p}encoder.layer.{i}", f"blocks.{i}"
        for site, name in (("Q", "query"), ("K", "key"), ("V", "value")):
            w = src.pop(f"{hf_i}.attention.self.{name}.weight", (m, m))
            out[f"{ours}.attn.W_{site}"] = heads_in(w, d)
            out[f"{ours}.attn.b_{site}"] = src.pop(f"{hf_i}.attention.self.{name}.bias", (m,)).reshape(-1, d)
        w_o = src.pop(f"{hf_i}.attention.output.dense.weight", (m, m))
        out[f"{ours}.attn.W_O"] = heads_out(w_o, d)
        out[f"{ours}.attn.b_O"] = src.pop(f"{hf_i}.attention.output.dense.bias", (m,))
        # Post-LN: the attention output's LayerNorm normalises resid_pre + attn_out (our ln1), the
        # MLP output's LayerNorm normalises resid_mid + mlp_out (our ln2).
        out[f"{ours}.ln1.w"] = src.pop(f"{hf_i}.attention.output.LayerNorm.weight", (m,))
        out[f"{ours}.ln1.b"] = src.pop(f"{hf_i}.attention.output.LayerNorm.bias", (m,))
        out[f"{ours}.mlp.W_in"] = src.pop(f"{hf_i}.intermediate.dense.weight", (f, m)).T
        out[f"{ours}.mlp.b_in"] = src.pop(f"{hf_i}.intermediate.dense.bias", (f,))
        out[f"{ours}.mlp.W_out"] = src.pop(f"{hf_i}.output.dense.weight", (m, f)).T
        out[f"{ours}.mlp.b_out"] = src.pop(f"{hf_i}.output.dense.bias", (m,))
        out[f"{ours}.ln2.w"] = src.pop(f"{hf_i}.output.LayerNorm.weight", (m,))
        out[f"{ours}.ln2.b"] = src.pop(f"{hf_i}.output.LayerNorm.bias", (m,))
    if "cls.predictions.transform.dense.weight" in src:
        h = "cls.predictions"
        out["mlm_head.W"] = src.pop(f"{h}.transform.dense.weight", (m, m)).T
        out["mlm_head.b"] = src.pop(f"{h}.transform.dense.bias", (m,))
        out["mlm_head.ln.w"] = src.pop(f"{h}.transform.LayerNorm.weight", (m,))
        out["mlm_head.ln.b"] = src.pop(f"{h}.transform.LayerNorm.bias", (m,))
        # The decoder is tied to the word embeddings (tie_word_embeddings, the default): a tied checkpoint
        # may omit it; an untied one must carry it.
        # A tied checkpoint that stores only the decoder gives it to the embedding too (tied_embed_key).
        out["unembed.W_U"] = pop_lm_head(src, out["embed.W_E"], hf.tie_word_embeddings, keys=(decoder,)).T
        # HF ties cls.predictions.decoder.bias to cls.predictions.bias: one vector under two names.
        bias = src.pop(f"{h}.bias", (v,))
        src.pop_optional(f"{h}.decoder.bias", (v,))
        out["unembed.b_U"] = bias
    src.finish(ignore=IGNORED_HF_KEYS)
    return out


def has_mlm_head(hf_sd: StateDict) -> bool:
    return "cls.predictions.transform.dense.weight" in hf_sd


def tiny_hf_configs() -> dict[str, BertConfig]:
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=40, type_vocab_size=2)
    return {"default": BertConfig(**base), "gelu_new_3_types": BertConfig(**{**base, "type_vocab_size": 3},
                                                                           hidden_act="gelu_new")}


for _name in ("BertModel", "BertForMaskedLM"):
    register(Architecture(hf_architecture=_name, model_type="bert", kind="encoder", handled_hf_fields=HANDLED_HF_FIELDS,
                          ignored_hf_fields=IGNORED_HF_FIELDS,
                          config_from_hf=lambda hf, name=_name: config_from_hf(hf, name),
                          convert_state_dict=convert_state_dict, tiny_hf_configs=tiny_hf_configs))

# The encoders by HF class name (the registry's encoder records; kept for code written before BERT
# joined REGISTRY).
ENCODERS = by_kind("encoder")
