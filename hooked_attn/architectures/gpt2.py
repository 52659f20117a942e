"""GPT-2 family. Mirrors transformers/models/gpt2/modeling_gpt2.py (``GPT2LMHeadModel``)."""

import einops
from torch import Tensor
from transformers import GPT2Config

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.common import (
    GPT2_FRAME, GPT2_NORMS, activation, convert_decoder, pop_learned_positions, pop_norms,
)
from hooked_attn.config import LearnedPositions, ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings",
    # Only changes rounding in reduced precision (HF upcasts q.k to fp32); our softmax is fp32 anyway.
    "reorder_and_upcast_attn",
})
IGNORED_HF_FIELDS = frozenset({
    "resid_pdrop", "embd_pdrop", "attn_pdrop",                       # dropout: off at inference
    "summary_type", "summary_use_proj", "summary_activation",        # GPT2DoubleHeadsModel's head only
    "summary_proj_to_labels", "summary_first_dropout",
})
# Old checkpoints carry the causal-mask buffers; they hold no weights.
IGNORED_HF_KEYS = ("transformer.h.*.attn.bias", "transformer.h.*.attn.masked_bias")


def config_from_hf(hf: GPT2Config) -> ModelConfig:
    d_head = hf.n_embd // hf.n_head
    return ModelConfig(
        hf_architecture="GPT2LMHeadModel",
        n_layers=hf.n_layer, d_model=hf.n_embd, n_heads=hf.n_head, n_kv_heads=hf.n_head, d_head=d_head,
        d_mlp=hf.n_inner if hf.n_inner is not None else 4 * hf.n_embd, d_vocab=hf.vocab_size,
        n_ctx=hf.n_positions, norm=NormConfig(kind="layernorm", eps=hf.layer_norm_epsilon),
        act_fn=activation(hf, "GPT2LMHeadModel", "activation_function"),
        positions=LearnedPositions(n_ctx=hf.n_positions),
        attn_scale=d_head**-0.5 if hf.scale_attn_weights else 1.0,
        attn_scale_by_inverse_layer=hf.scale_attn_by_inverse_layer_idx,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: GPT2Config) -> dict[str, Tensor]:
    d, m, f = cfg.d_head, cfg.d_model, cfg.d_mlp

    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        out = pop_norms(src, hf_i, ours, m, GPT2_NORMS, bias=True)
        # Conv1D stores weights as [in, out] (x @ W), the transpose of nn.Linear; columns are
        # (qkv, head, d_head): all of Q, then all of K, then all of V.
        w_qkv = einops.rearrange(src.pop(f"{hf_i}.attn.c_attn.weight", (m, 3 * m)),
                                 "d_model (qkv head d_head) -> qkv head d_model d_head", qkv=3, d_head=d)
        b_qkv = einops.rearrange(src.pop(f"{hf_i}.attn.c_attn.bias", (3 * m,)),
                                 "(qkv head d_head) -> qkv head d_head", qkv=3, d_head=d)
        for j, site in enumerate("QKV"):
            # Each copied into our parameters' own storage ([head d_head d_model], an nn.Linear weight's):
            # on its own, processing may overwrite it and the model adopts it, with no further copy.
            out[f"{ours}.attn.W_{site}"] = w_qkv[j].transpose(1, 2).contiguous().transpose(1, 2)
            out[f"{ours}.attn.b_{site}"] = b_qkv[j]
        return out | {
            f"{ours}.attn.W_O": einops.rearrange(src.pop(f"{hf_i}.attn.c_proj.weight", (m, m)),
                                                 "(head d_head) d_model -> head d_head d_model", d_head=d),
            f"{ours}.attn.b_O": src.pop(f"{hf_i}.attn.c_proj.bias", (m,)),
            # Conv1D again: the MLP weights are already our [in, out].
            f"{ours}.mlp.W_in": src.pop(f"{hf_i}.mlp.c_fc.weight", (m, f)),
            f"{ours}.mlp.b_in": src.pop(f"{hf_i}.mlp.c_fc.bias", (f,)),
            f"{ours}.mlp.W_out": src.pop(f"{hf_i}.mlp.c_proj.weight", (f, m)),
            f"{ours}.mlp.b_out": src.pop(f"{hf_i}.mlp.c_proj.bias", (m,)),
        }

    # A tied checkpoint may omit lm_head.weight; it is then the token embedding.
    return convert_decoder(hf_sd, cfg, "GPT2LMHeadModel", layer, tied=hf.tie_word_embeddings, **GPT2_FRAME,
                           extra=pop_learned_positions(cfg), ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, GPT2Config]:
    base = dict(vocab_size=97, n_positions=32, n_embd=32, n_head=4, bos_token_id=0, eos_token_id=0)
    return {
        "default": GPT2Config(**base, n_layer=2),
        "untied": GPT2Config(**base, n_layer=2, tie_word_embeddings=False),
        "inverse_layer_scale": GPT2Config(**base, n_layer=3, scale_attn_by_inverse_layer_idx=True),
        "no_attn_scale_relu_inner": GPT2Config(**base, n_layer=2, scale_attn_weights=False,
                                               activation_function="relu", n_inner=48),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture="GPT2LMHeadModel", model_type="gpt2", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
