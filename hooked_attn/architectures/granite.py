"""Granite family (IBM Granite 3.x dense models). Mirrors transformers/models/granite/modeling_granite.py
(``GraniteForCausalLM``): LLaMA plus four scalar multipliers, folded exactly into the weights here."""

import math

import einops
import torch
from torch import Tensor
from transformers import GraniteConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.llama import rotary_from_hf
from hooked_attn.config import ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "GraniteForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "attention_bias",
    "mlp_bias",  # refused when True
    "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
    # GraniteAttention reads getattr(config, "head_dim", hidden_size // num_attention_heads): not a declared
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


def config_from_hf(hf: GraniteConfig) -> ModelConfig:
    if hf.hidden_act not in _ACTIVATIONS:
        raise UnsupportedConfigError(f"{ARCH}: config field hidden_act={hf.hidden_act!r} is not supported")
    if hf.mlp_bias:
        # GraniteMLP gives gate_proj a bias too; our gated MLP has no gate bias (TransformerLens' layout).
        raise UnsupportedConfigError(f"{ARCH}: config field mlp_bias=True is not supported (no gate bias)")
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads, d_head=d_head, d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size, n_ctx=hf.max_position_embeddings,
        norm=NormConfig(kind="rmsnorm", eps=hf.rms_norm_eps, bias=False),
        act_fn=_ACTIVATIONS[hf.hidden_act],  # type: ignore[arg-type]
        positions=rotary_from_hf(dict(hf.rope_parameters or {"rope_theta": 10_000.0}), d_head, ARCH),
        # GraniteAttention.__init__: `self.scaling = config.attention_multiplier` (replaces head_dim**-0.5).
        attn_scale=float(hf.attention_multiplier), gated_mlp=True,
    )


def _scaled(t: Tensor, factor: float) -> Tensor:
    """``t * factor`` computed in at least float32 (the loader casts to the target dtype afterwards)."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) * factor


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: GraniteConfig) -> dict[str, Tensor]:
    src = KeyLedger(hf_sd, ARCH)
    h, kv, d, m, f, v = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp, cfg.d_vocab
    residual = float(hf.residual_multiplier)
    w_e = src.pop("model.embed_tokens.weight", (v, m))
    # GraniteModel.forward: `inputs_embeds = inputs_embeds * self.embedding_multiplier`.
    out = {"embed.W_E": _scaled(w_e, float(hf.embedding_multiplier))}

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=w_e.dtype, device=w_e.device)

    def bias(key: str, shape: tuple[int, ...]) -> Tensor:
        # GraniteAttention: all four projections have bias=config.attention_bias; zeros otherwise. When
        # the config has none, a stray bias key is left over and finish() refuses it.
        if not hf.attention_bias:
            return zeros(*shape)
        return src.pop(key, (math.prod(shape),)).reshape(shape)

    for i in range(cfg.n_layers):
        hf_i, ours = f"model.layers.{i}", f"blocks.{i}"
        out[f"{ours}.ln1.w"] = src.pop(f"{hf_i}.input_layernorm.weight", (m,))
        out[f"{ours}.ln2.w"] = src.pop(f"{hf_i}.post_attention_layernorm.weight", (m,))
        # nn.Linear weights are [out, in]; the out axis is (head d_head).
        for site, proj, n in (("Q", "q_proj", h), ("K", "k_proj", kv), ("V", "v_proj", kv)):
            w = src.pop(f"{hf_i}.self_attn.{proj}.weight", (n * d, m))
            out[f"{ours}.attn.W_{site}"] = einops.rearrange(w, "(head d_head) d_model -> head d_model d_head", d_head=d)
            out[f"{ours}.attn.b_{site}"] = bias(f"{hf_i}.self_attn.{proj}.bias", (n, d))
        # GraniteDecoderLayer.forward: `hidden_states = residual + hidden_states * self.residual_multiplier`
        # after self_attn, whose output is o_proj(...) bias included: scale W_O and b_O.
        w_o = src.pop(f"{hf_i}.self_attn.o_proj.weight", (m, h * d))
        out[f"{ours}.attn.W_O"] = _scaled(
            einops.rearrange(w_o, "d_model (head d_head) -> head d_head d_model", d_head=d), residual)
        out[f"{ours}.attn.b_O"] = _scaled(bias(f"{hf_i}.self_attn.o_proj.bias", (m,)), residual)
        # GraniteMLP: down_proj(act(gate_proj(x)) * up_proj(x)); the same residual_multiplier line after
        # the MLP scales W_out and b_out (b_out is zero: mlp_bias is refused).
        out[f"{ours}.mlp.W_gate"] = src.pop(f"{hf_i}.mlp.gate_proj.weight", (f, m)).T
        out[f"{ours}.mlp.W_in"] = src.pop(f"{hf_i}.mlp.up_proj.weight", (f, m)).T
        out[f"{ours}.mlp.b_in"] = zeros(f)
        out[f"{ours}.mlp.W_out"] = _scaled(src.pop(f"{hf_i}.mlp.down_proj.weight", (m, f)).T, residual)
        out[f"{ours}.mlp.b_out"] = zeros(m)
    out["ln_final.w"] = src.pop("model.norm.weight", (m,))
    # GraniteForCausalLM._tied_weights_keys: a tied checkpoint may omit lm_head.weight; it is then the
    # raw embedding matrix, before embedding_multiplier (that multiplies activations, not the weight).
    lm_head = src.pop_optional("lm_head.weight", (v, m))
    if lm_head is None:
        if not hf.tie_word_embeddings:
            src.pop("lm_head.weight")  # raises: untied weights must be present
        lm_head = w_e
    # GraniteForCausalLM.forward: `logits = logits / self.config.logits_scaling` (lm_head has no bias).
    out["unembed.W_U"] = _scaled(lm_head.T, 1.0 / float(hf.logits_scaling))
    out["unembed.b_U"] = zeros(v)
    src.finish(ignore=IGNORED_HF_KEYS)
    return out


def tiny_hf_configs() -> dict[str, GraniteConfig]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0)
    # Granite-3.x-like multipliers (granite-3.0-2b: 12.0, 0.22, 0.015625, 8.0), with the attention
    # multiplier kept distinct from this tiny model's head_dim**-0.5.
    multipliers = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.25,
                       logits_scaling=8.0)
    return {
        "default": GraniteConfig(**base, **multipliers, num_key_value_heads=2),                  # GQA, untied
        "tied": GraniteConfig(**base, **multipliers, num_key_value_heads=2, tie_word_embeddings=True),
        "mha_attention_bias": GraniteConfig(**base, **multipliers, num_key_value_heads=4, attention_bias=True),
        "mqa": GraniteConfig(**base, **multipliers, num_key_value_heads=1),
        "unit_multipliers": GraniteConfig(**base, num_key_value_heads=2),  # HF defaults: all 1.0
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="granite", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
