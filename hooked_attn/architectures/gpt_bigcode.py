"""GPT-BigCode family (SantaCoder, StarCoder 1, WizardCoder...). Mirrors
transformers/models/gpt_bigcode/modeling_gpt_bigcode.py (``GPTBigCodeForCausalLM``)."""

import einops
from torch import Tensor
from transformers import GPTBigCodeConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    GPT2_FRAME, GPT2_NORMS, activation, convert_decoder, heads_in, heads_out, pop_learned_positions,
    pop_linear_mlp, pop_norms, qkv_per_head,
)
from hooked_attn.architectures.parsers import ACTIVATIONS
from hooked_attn.config import ActFn, LearnedPositions, ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "GPTBigCodeForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "multi_query", "tie_word_embeddings",
    "add_cross_attention",  # refused when True (encoder-decoder use only)
})
IGNORED_HF_FIELDS = frozenset({
    "resid_pdrop", "embd_pdrop", "attn_pdrop",  # dropout: off at inference
    # GPTBigCodeConfig.__post_init__ always recomputes it as `1 if self.multi_query else self.n_head`;
    # the model reads multi_query (GPTBigCodeAttention: self.kv_heads = 1 if self.multi_query else ...).
    "num_key_value_heads",
    # In transformers 5.23 GPTBigCodeAttention stores these two as attributes that nothing reads: attention
    # runs through eager_attention_forward (or sdpa), which always takes the softmax in fp32, as we do.
    # (The upcast_softmax helpers they once selected are dead code.) They only ever changed rounding in
    # fp16/bf16, never the fp32 result.
    "attention_softmax_in_fp32", "scale_attention_softmax_in_fp32",
})
# GPTBigCodeModel.bias is the causal-mask buffer (persistent=False); old checkpoints may still carry it.
IGNORED_HF_KEYS = ("transformer.bias",)
_ACTIVATIONS: dict[str, ActFn] = {**ACTIVATIONS, "gelu_python_tanh": "gelu_new", "gelu_python": "gelu"}


def config_from_hf(hf: GPTBigCodeConfig) -> ModelConfig:
    if hf.add_cross_attention:
        raise UnsupportedConfigError(f"{ARCH}: config field add_cross_attention=True is not supported "
                                     "(hooked_attn rebuilds decoder-only models)")
    d_head = hf.n_embd // hf.n_head
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.n_layer, d_model=hf.n_embd, n_heads=hf.n_head,
        n_kv_heads=1 if hf.multi_query else hf.n_head,  # GPTBigCodeAttention.kv_heads
        d_head=d_head, d_mlp=hf.n_inner if hf.n_inner is not None else 4 * hf.n_embd, d_vocab=hf.vocab_size,
        n_ctx=hf.n_positions, norm=NormConfig(kind="layernorm", eps=hf.layer_norm_epsilon),
        act_fn=activation(hf, ARCH, "activation_function", table=_ACTIVATIONS),
        positions=LearnedPositions(n_ctx=hf.n_positions),
        # GPTBigCodeAttention: self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        attn_scale=d_head**-0.5 if hf.scale_attn_weights else 1.0,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: GPTBigCodeConfig) -> dict[str, Tensor]:
    h, kv, d, m, f = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    n_qkv = (h + 2 * kv) * d

    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        out = pop_norms(src, hf_i, ours, m, GPT2_NORMS, bias=True)
        # c_attn is an nn.Linear (weight [out, in]), not GPT-2's Conv1D. Its output rows are laid out
        # differently in the two attention modes (GPTBigCodeAttention.forward):
        w_qkv = src.pop(f"{hf_i}.attn.c_attn.weight", (n_qkv, m))
        b_qkv = src.pop(f"{hf_i}.attn.c_attn.bias", (n_qkv,))
        if hf.multi_query:
            # `.split((self.embed_dim, self.kv_dim, self.kv_dim), dim=3)`: all query heads, then the one
            # key head, then the one value head.
            w_q, w_k, w_v = w_qkv.split((h * d, kv * d, kv * d), dim=0)
            b_q, b_k, b_v = b_qkv.split((h * d, kv * d, kv * d), dim=0)
            for site, w, b in (("Q", w_q, b_q), ("K", w_k, b_k), ("V", w_v, b_v)):
                out[f"{ours}.attn.W_{site}"] = heads_in(w, d)
                out[f"{ours}.attn.b_{site}"] = einops.rearrange(b, "(head d_head) -> head d_head", d_head=d)
        else:
            # `.view(*hidden_states.shape[:2], self.num_heads, 3 * self.head_dim).split(3 * [self.head_dim],
            # dim=3)`: per head, its q, k and v (NeoX's order), unlike GPT-2's (qkv head d_head).
            out |= qkv_per_head(w_qkv, b_qkv, ours, h)
        out[f"{ours}.attn.W_O"] = heads_out(src.pop(f"{hf_i}.attn.c_proj.weight", (m, h * d)), d)
        out[f"{ours}.attn.b_O"] = src.pop(f"{hf_i}.attn.c_proj.bias", (m,))
        # GPTBigCodeMLP: c_fc and c_proj are nn.Linear too, so transpose to our [in, out].
        return out | pop_linear_mlp(src, f"{hf_i}.mlp", ours, cfg, ("c_fc", "c_proj"))

    # GPTBigCodeForCausalLM._tied_weights_keys: a tied checkpoint may omit lm_head.weight (bias=False).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, **GPT2_FRAME,
                           extra=pop_learned_positions(cfg), ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, GPTBigCodeConfig]:
    base = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return {
        "default": GPTBigCodeConfig(**base),                                     # multi-query, tied (StarCoder)
        "mha": GPTBigCodeConfig(**base, multi_query=False),
        "untied": GPTBigCodeConfig(**base, tie_word_embeddings=False),
        "mha_gelu_new_untied": GPTBigCodeConfig(**base, multi_query=False, activation_function="gelu_new",
                                                tie_word_embeddings=False),
        "no_attn_scale_gelu_inner": GPTBigCodeConfig(**base, scale_attn_weights=False, activation_function="gelu",
                                                     n_inner=48),
        # Dead fields in transformers 5.23 (see IGNORED_HF_FIELDS): the output must not depend on them.
        "softmax_fp32_off": GPTBigCodeConfig(**base, attention_softmax_in_fp32=False,
                                             scale_attention_softmax_in_fp32=False),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="gpt_bigcode", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
