"""OPT family (facebook/opt-125m ... opt-66b). Mirrors transformers/models/opt/modeling_opt.py."""

from torch import Tensor
from transformers import OPTConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.common import (
    EmbedProjection, activation, bias_rule, convert_decoder, pop_attention, pop_bias, pop_learned_positions, pop_norms,
)
from hooked_attn.architectures.parsers import TRANSFORMERS_MAJOR
from hooked_attn.config import LearnedPositions, ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "OPTForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings", "num_attention_heads",
    "activation_function", "do_layer_norm_before", "_remove_final_layer_norm", "word_embed_proj_dim",
    "enable_bias", "layer_norm_elementwise_affine", "tie_word_embeddings",
})
IGNORED_HF_FIELDS = frozenset({
    "dropout", "attention_dropout",  # dropout: off at inference
    "activation_dropout",            # in every facebook/opt-* config.json; not read by transformers (dropout)
    "layerdrop",                     # OPTDecoder skips layers at random only when self.training
    "init_std",                      # initialisation only
})
# The positional table is OPTLearnedPositionalEmbedding, a plain nn.Embedding: no buffers to skip.
IGNORED_HF_KEYS: tuple[str, ...] = ()
# OPTLearnedPositionalEmbedding.offset: the table has max_position_embeddings + 2 rows and position p
# reads row p + 2 (fairseq reserved rows for its padding index).
_POSITION_OFFSET = 2
# Every OPT LayerNorm is nn.LayerNorm(hidden_size) with torch's default eps (OPTDecoderLayer, OPTDecoder).
_LN_EPS = 1e-5


def config_from_hf(hf: OPTConfig) -> ModelConfig:
    d_head = hf.hidden_size // hf.num_attention_heads
    affine = hf.layer_norm_elementwise_affine
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_attention_heads, d_head=d_head, d_mlp=hf.ffn_dim, d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        norm=NormConfig(kind="layernorm", eps=_LN_EPS, weight=affine, bias=affine),
        act_fn=activation(hf, ARCH, "activation_function"),
        positions=LearnedPositions(n_ctx=hf.max_position_embeddings),
        # OPTAttention.forward multiplies q_proj(x) (bias included) by head_dim**-0.5 before q.k and
        # then calls the attention function with scaling=1.0: the same scores as scaling q.k.
        attn_scale=d_head**-0.5,
        # OPTDecoderLayer.forward: do_layer_norm_before=False (opt-350m) is post-LN, x = ln(x + f(x)),
        # with self_attn_layer_norm after attention and final_layer_norm after the MLP.
        block_norms="pre" if hf.do_layer_norm_before else "post_residual",
        # OPTDecoder.__init__ builds the decoder's final_layer_norm only when do_layer_norm_before and
        # not _remove_final_layer_norm.
        final_norm=hf.do_layer_norm_before and not hf._remove_final_layer_norm,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: OPTConfig) -> dict[str, Tensor]:
    m, f = cfg.d_model, cfg.d_mlp
    dec = "model.decoder"
    # enable_bias=False drops the bias of q/k/v/out_proj, fc1 and fc2 (OPTAttention, OPTDecoderLayer).
    bias = bias_rule(hf.enable_bias)
    # layer_norm_elementwise_affine=False: every nn.LayerNorm without weight or bias, so no keys.
    affine = hf.layer_norm_elementwise_affine
    # The same two norms serve both placements: before attention / MLP (pre-LN), or after each
    # residual sum (post-LN); our block reads ln1 / ln2 in either place.
    norms = {"ln1": "self_attn_layer_norm", "ln2": "final_layer_norm"} if affine else {}

    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        return (pop_norms(src, hf_i, ours, m, norms, bias=True)
                | pop_attention(src, f"{hf_i}.self_attn", ours, cfg, w_e, bias=bias,
                                names=("q_proj", "k_proj", "v_proj", "out_proj"))
                | {f"{ours}.mlp.W_in": src.pop(f"{hf_i}.fc1.weight", (f, m)).T,
                   f"{ours}.mlp.b_in": pop_bias(src, f"{hf_i}.fc1.bias", (f,), w_e, bias),
                   f"{ours}.mlp.W_out": src.pop(f"{hf_i}.fc2.weight", (m, f)).T,
                   f"{ours}.mlp.b_out": pop_bias(src, f"{hf_i}.fc2.bias", (m,), w_e, bias)})

    # word_embed_proj_dim != hidden_size (opt-350m): embed_tokens and lm_head are that wide, with
    # bias-free project_in (right after the lookup) and project_out (right before lm_head)
    # (OPTDecoder.forward); the frame folds both into W_E and W_U (products in float64, rounded once).
    projection = None
    if hf.word_embed_proj_dim != m:
        projection = EmbedProjection(hf.word_embed_proj_dim, f"{dec}.project_in.weight", f"{dec}.project_out.weight")
    # Drop the first _POSITION_OFFSET rows, so that our W_pos[p] is HF's row p + 2. HF reads those rows
    # only for negative position ids: padding tokens get cumsum(mask) * mask - 1 = -1 (OPTDecoder.forward),
    # and their outputs are never used. Real tokens count real tokens from 0 in HF and here alike.
    positions = pop_learned_positions(cfg, f"{dec}.embed_positions.weight", offset=_POSITION_OFFSET)
    final_norm = f"{dec}.final_layer_norm" if cfg.final_norm and affine else None
    # A tied checkpoint may omit lm_head.weight (it is then embed_tokens); lm_head has no bias.
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, embed=f"{dec}.embed_tokens.weight",
                           layers=f"{dec}.layers", final_norm=final_norm, norm_bias=True, extra=positions,
                           projection=projection, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, OPTConfig]:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, ffn_dim=48, max_position_embeddings=32,
                num_attention_heads=4, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    variants = {
        # HF's defaults: pre-LN, ReLU, biases, tied embeddings (opt-125m and every size but 350m).
        "default": OPTConfig(**base),
        # opt-350m: post-LN, no final norm, and 16-wide embeddings projected in and out.
        "post_ln_projected": OPTConfig(**base, do_layer_norm_before=False, word_embed_proj_dim=16),
        "projected_untied": OPTConfig(**base, word_embed_proj_dim=24, tie_word_embeddings=False),
        "no_bias_gelu": OPTConfig(**base, enable_bias=False, activation_function="gelu"),
        "no_final_norm_no_affine": OPTConfig(**base, _remove_final_layer_norm=True,
                                             layer_norm_elementwise_affine=False),
        "post_ln_untied": OPTConfig(**base, do_layer_norm_before=False, tie_word_embeddings=False),
    }
    if TRANSFORMERS_MAJOR < 5:
        # transformers 4.57's OPTPreTrainedModel._init_weights fills every LayerNorm's weight, and
        # layer_norm_elementwise_affine=False leaves none: HF cannot build this model there.
        del variants["no_final_norm_no_affine"]
    return variants


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="opt", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
