"""OLMo (1) family (OLMo-1B/7B -hf, OLMo-1.7). Mirrors transformers/models/olmo/modeling_olmo.py
(``OlmoForCausalLM``). Not OLMo-2 (``Olmo2ForCausalLM``: QK-norm, norms after the sublayers)."""

import math

import einops
import torch
from torch import Tensor
from transformers import OlmoConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.llama import rotary_from_hf
from hooked_attn.config import ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "OlmoForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "tie_word_embeddings", "rope_parameters",
    "attention_bias",
    "clip_qkv",  # refused unless None
    # OlmoAttention reads getattr(config, "head_dim", hidden_size // num_attention_heads): not a declared
    # field, but a config that carries one gets it.
    "head_dim",
})
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
})
# Rotary frequencies are a non-persistent buffer; old checkpoints may still carry them.
IGNORED_HF_KEYS = ("model.layers.*.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_new",
                "gelu_pytorch_tanh": "gelu_new", "relu": "relu"}
# OlmoLayerNorm.forward: F.layer_norm(x.float(), ..., None, None, eps=1e-5), a constant, not a config field.
_NORM_EPS = 1e-5


def config_from_hf(hf: OlmoConfig) -> ModelConfig:
    if hf.hidden_act not in _ACTIVATIONS:
        raise UnsupportedConfigError(f"{ARCH}: config field hidden_act={hf.hidden_act!r} is not supported")
    if hf.clip_qkv is not None:
        # OlmoAttention clamps q, k and v to [-clip_qkv, clip_qkv] after projection; our attention has
        # no clamp between hook_q/k/v and the scores.
        raise UnsupportedConfigError(f"{ARCH}: config field clip_qkv={hf.clip_qkv!r} is not supported "
                                     "(hooked_attn's attention does not clamp q, k and v)")
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads, d_head=d_head, d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size, n_ctx=hf.max_position_embeddings,
        # OlmoLayerNorm: "LayerNorm but with no learnable weight or bias".
        norm=NormConfig(kind="layernorm", eps=_NORM_EPS, weight=False, bias=False),
        act_fn=_ACTIVATIONS[hf.hidden_act],  # type: ignore[arg-type]
        positions=rotary_from_hf(dict(hf.rope_parameters or {"rope_theta": 10_000.0}), d_head, ARCH),
        attn_scale=d_head**-0.5, gated_mlp=True,  # OlmoAttention: self.scaling = self.head_dim**-0.5
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: OlmoConfig) -> dict[str, Tensor]:
    src = KeyLedger(hf_sd, ARCH)
    h, kv, d, m, f, v = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp, cfg.d_vocab
    w_e = src.pop("model.embed_tokens.weight", (v, m))
    out = {"embed.W_E": w_e}

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=w_e.dtype, device=w_e.device)

    def bias(key: str, shape: tuple[int, ...]) -> Tensor:
        # OlmoAttention: all four projections have bias=config.attention_bias; zeros otherwise. When the
        # config has none, a stray bias key is left over and finish() refuses it.
        if not hf.attention_bias:
            return zeros(*shape)
        return src.pop(key, (math.prod(shape),)).reshape(shape)

    for i in range(cfg.n_layers):
        hf_i, ours = f"model.layers.{i}", f"blocks.{i}"
        # input_layernorm / post_attention_layernorm / norm are OlmoLayerNorm: no parameters, no keys.
        # nn.Linear weights are [out, in]; the out axis is (head d_head).
        for site, proj, n in (("Q", "q_proj", h), ("K", "k_proj", kv), ("V", "v_proj", kv)):
            w = src.pop(f"{hf_i}.self_attn.{proj}.weight", (n * d, m))
            out[f"{ours}.attn.W_{site}"] = einops.rearrange(w, "(head d_head) d_model -> head d_model d_head", d_head=d)
            out[f"{ours}.attn.b_{site}"] = bias(f"{hf_i}.self_attn.{proj}.bias", (n, d))
        w_o = src.pop(f"{hf_i}.self_attn.o_proj.weight", (m, h * d))
        out[f"{ours}.attn.W_O"] = einops.rearrange(w_o, "d_model (head d_head) -> head d_head d_model", d_head=d)
        out[f"{ours}.attn.b_O"] = bias(f"{hf_i}.self_attn.o_proj.bias", (m,))
        # OlmoMLP: down_proj(act(gate_proj(x)) * up_proj(x)), no biases.
        out[f"{ours}.mlp.W_gate"] = src.pop(f"{hf_i}.mlp.gate_proj.weight", (f, m)).T
        out[f"{ours}.mlp.W_in"] = src.pop(f"{hf_i}.mlp.up_proj.weight", (f, m)).T
        out[f"{ours}.mlp.b_in"] = zeros(f)
        out[f"{ours}.mlp.W_out"] = src.pop(f"{hf_i}.mlp.down_proj.weight", (m, f)).T
        out[f"{ours}.mlp.b_out"] = zeros(m)
    # OlmoForCausalLM._tied_weights_keys: a tied checkpoint may omit lm_head.weight (bias=False).
    lm_head = src.pop_optional("lm_head.weight", (v, m))
    if lm_head is None:
        if not hf.tie_word_embeddings:
            src.pop("lm_head.weight")  # raises: untied weights must be present
        lm_head = w_e
    out["unembed.W_U"] = lm_head.T
    out["unembed.b_U"] = zeros(v)
    src.finish(ignore=IGNORED_HF_KEYS)
    return out


def tiny_hf_configs() -> dict[str, OlmoConfig]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, pad_token_id=1, eos_token_id=0)
    return {
        "default": OlmoConfig(**base),                                            # MHA, untied (OLMo-7B)
        "tied": OlmoConfig(**base, tie_word_embeddings=True),                     # OLMo-1B
        "gqa": OlmoConfig(**base, num_key_value_heads=2),
        "mqa": OlmoConfig(**base, num_key_value_heads=1),
        "attention_bias": OlmoConfig(**base, num_key_value_heads=2, attention_bias=True),
        "rope_linear": OlmoConfig(**base, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="olmo", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
