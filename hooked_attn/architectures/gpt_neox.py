"""GPT-NeoX family (Pythia, GPT-NeoX-20B). Mirrors transformers/models/gpt_neox/modeling_gpt_neox.py."""

from torch import Tensor
from transformers import GPTNeoXConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.common import (
    activation, bias_rule, convert_decoder, heads_out, pop_bias, pop_linear_mlp, pop_norms, qkv_per_head,
    rotary_dims,
)
from hooked_attn.architectures.parsers import ACTIVATIONS, ROPE_FIELDS, rope_config, rope_parameters, rotary_from_hf
from hooked_attn.config import ActFn, ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "GPTNeoXForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "max_position_embeddings", "layer_norm_eps", "tie_word_embeddings", "use_parallel_residual",
    "attention_bias",
    # HF's config folds the checkpoint's rotary_pct / rotary_emb_base into rope_parameters
    # (configuration_gpt_neox.py, convert_rope_params_to_dict), so those two never reach to_dict().
    "rope_parameters",
}) | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout", "hidden_dropout",  # dropout: off at inference
    "classifier_dropout",                   # GPTNeoXForSequenceClassification/TokenClassification heads only
    "is_decoder",                           # GPTNeoXForCausalLM is causal whatever this says; never read
})
IGNORED_HF_KEYS = (
    # Pythia checkpoints carry the causal-mask buffers and per-layer rotary tables; they hold no weights.
    "gpt_neox.layers.*.attention.bias", "gpt_neox.layers.*.attention.masked_bias",
    "gpt_neox.layers.*.attention.rotary_emb.inv_freq", "gpt_neox.rotary_emb.inv_freq",
)
_ACTIVATIONS: dict[str, ActFn] = {
    **ACTIVATIONS,
    # GPT-NeoX-20B: HF FastGELUActivation (activations.py) is the same tanh approximation as
    # gelu_new, with sqrt(2/pi) written out to 10 digits; the two differ by float rounding only.
    "gelu_fast": "gelu_new",
}


def config_from_hf(hf: GPTNeoXConfig) -> ModelConfig:
    # GPTNeoXAttention: head_size = hidden_size // num_attention_heads; there is no head_dim field.
    d_head = hf.hidden_size // hf.num_attention_heads
    rope = rope_parameters(hf, ARCH)
    # Partial rotary (rotary_pct, 0.25 for Pythia): only the first int(d_head * factor) dimensions of
    # each head rotate, paired by rotate_half (GPTNeoXAttention.rotary_ndims, apply_rotary_pos_emb).
    n_rot = rotary_dims(rope, d_head, ARCH)
    # rotary_ndims == 0: GPTNeoXRotaryEmbedding has no frequencies, apply_rotary_pos_emb rotates the
    # empty slice q[..., :0] and concatenates the untouched rest, so q and k carry no position at all
    # (attention sees positions only through the causal mask): positions=None, no rotary hooks.
    positions = rotary_from_hf(rope, d_head, ARCH) if n_rot else None
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_attention_heads, d_head=d_head, d_mlp=hf.intermediate_size, d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings, norm=NormConfig(kind="layernorm", eps=hf.layer_norm_eps),
        act_fn=activation(hf, ARCH, table=_ACTIVATIONS),
        positions=positions, attn_scale=d_head**-0.5,
        # GPTNeoXLayer.forward: parallel adds attn(ln1(x)) + mlp(ln2(x)) to x; sequential is the GPT-2 order.
        parallel_attn_mlp=hf.use_parallel_residual,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: GPTNeoXConfig) -> dict[str, Tensor]:
    h, d, m = cfg.n_heads, cfg.d_head, cfg.d_model
    # attention_bias=False drops both query_key_value.bias and dense.bias (GPTNeoXAttention.__init__).
    bias = bias_rule(hf.attention_bias)

    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        out = pop_norms(src, hf_i, ours, m, bias=True)
        # NeoX fuses QKV per head: GPTNeoXAttention.forward views the output as (head, 3 * d_head) and
        # chunks the last axis, so rows are ordered (head, qkv, d_head), unlike GPT-2's (qkv, head, d_head).
        w_qkv = src.pop(f"{hf_i}.attention.query_key_value.weight", (3 * m, m))
        b_qkv = pop_bias(src, f"{hf_i}.attention.query_key_value.bias", (3 * m,), w_e, bias)
        out |= qkv_per_head(w_qkv, b_qkv, ours, h)
        # nn.Linear weights are [out, in]; dense reads the merged (head d_head) axis.
        out[f"{ours}.attn.W_O"] = heads_out(src.pop(f"{hf_i}.attention.dense.weight", (m, h * d)), d)
        out[f"{ours}.attn.b_O"] = pop_bias(src, f"{hf_i}.attention.dense.bias", (m,), w_e, bias)
        return out | pop_linear_mlp(src, f"{hf_i}.mlp", ours, cfg, ("dense_h_to_4h", "dense_4h_to_h"))

    # Hub checkpoints (Pythia) name the unembedding embed_out; transformers renames it to lm_head on
    # load (conversion_mapping.py). A tied checkpoint may omit it: it is then the token embedding.
    # lm_head has bias=False.
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings,
                           embed="gpt_neox.embed_in.weight", layers="gpt_neox.layers",
                           final_norm="gpt_neox.final_layer_norm", norm_bias=True,
                           lm_head=("lm_head.weight", "embed_out.weight"), ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, GPTNeoXConfig]:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return {
        # HF's defaults: parallel residual, rotary on a quarter of each head (Pythia).
        "default": GPTNeoXConfig(**base),
        "sequential": GPTNeoXConfig(**base, use_parallel_residual=False),
        "full_rotary": GPTNeoXConfig(**base, rotary_pct=1.0, rotary_emb_base=500.0),
        "sequential_half_rotary_tied": GPTNeoXConfig(**base, use_parallel_residual=False, rotary_pct=0.5,
                                                     tie_word_embeddings=True),
        "no_attention_bias_relu": GPTNeoXConfig(**base, attention_bias=False, hidden_act="relu"),
        "no_rotary": GPTNeoXConfig(**base, rotary_pct=0.0),          # no positional information at all
        "no_rotary_sequential": GPTNeoXConfig(**base, rotary_pct=0.0, use_parallel_residual=False),
        "rope_linear": GPTNeoXConfig(**base, rotary_pct=0.5,
                                     **rope_config(rope_type="linear", rope_theta=1000.0, factor=2.0)),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="gpt_neox", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
