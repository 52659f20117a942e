"""OLMo-2 family (OLMo-2-1124-7B/13B, OLMo-2-0425-1B, their -Instruct models). Mirrors
transformers/models/olmo2/modeling_olmo2.py (``Olmo2ForCausalLM``): LLaMA with the block's norms moved
onto the sublayer outputs and RMSNorm on the full q and k projections."""


import einops
from torch import Tensor
from transformers import Olmo2Config

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger
from hooked_attn.architectures.common import (
    activation, bias_rule, convert_decoder, head_dim, pop_llama_layer, rotary_buffer_keys,
)
from hooked_attn.architectures.parsers import (
    ROPE_FIELDS, ROPE_PARAMETERS_LAYOUT, rope_config, rope_parameters, rotary_from_hf,
)
from hooked_attn.config import ModelConfig, NormConfig, QKNorm
from hooked_attn.shapes import StateDict

ARCH = "Olmo2ForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "attention_bias",
    # Olmo2Attention reads getattr(config, "head_dim", hidden_size // num_attention_heads): not a declared
    # field, but a config that carries one gets it.
    "head_dim",
}) | ROPE_FIELDS
IGNORED_HF_FIELDS = frozenset({
    "attention_dropout",  # dropout: off at inference
})
IGNORED_HF_KEYS = rotary_buffer_keys()


def config_from_hf(hf: Olmo2Config) -> ModelConfig:
    d_head = head_dim(hf)
    # Olmo2RMSNorm: x.float() * rsqrt(mean(x^2) + eps), then (weight * x) BEFORE the cast back
    # (`(self.weight * hidden_states).to(input_dtype)`, unlike LlamaRMSNorm): gain_dtype="float32".
    norm = NormConfig(kind="rmsnorm", eps=hf.rms_norm_eps, bias=False, gain_dtype="float32")
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads, d_head=d_head, d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size, n_ctx=hf.max_position_embeddings,
        norm=norm,  # the final norm (model.norm); the blocks have no pre-norms
        act_fn=activation(hf, ARCH),
        # Olmo2DecoderLayer: x + post_attention_layernorm(attn(x)), then x + post_feedforward_layernorm(mlp(x)).
        block_norms="output", post_norm=norm,
        # Olmo2Attention: q_norm = Olmo2RMSNorm(num_attention_heads * head_dim) on q_proj's whole output,
        # before splitting into heads (k_norm likewise over num_key_value_heads * head_dim): one
        # statistic per position over all heads, not one per head.
        qk_norm=QKNorm(norm=norm, over="all_heads"),
        # Olmo2RotaryEmbedding returns cos/sin in float32 (no cast to x.dtype) and apply_rotary_pos_emb
        # rotates in float32 before casting q and k back; our rotary computes in the activation dtype.
        # The same in fp32; in bf16 HF rounds once where we round cos/sin and each product.
        positions=rotary_from_hf(rope_parameters(hf, ARCH, 10_000.0), d_head, ARCH),
        attn_scale=d_head**-0.5,  # Olmo2Attention: self.scaling = self.head_dim**-0.5
        gated_mlp=True,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: Olmo2Config) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # Naming trap: post_attention_layernorm normalises the attention OUTPUT here (our ln1_post), not
        # the MLP input as in LLaMA; there is no input_layernorm.
        norms = {"ln1_post": "post_attention_layernorm", "ln2_post": "post_feedforward_layernorm"}
        # All four projections have bias=config.attention_bias; with none, a stray bias key is refused.
        # Olmo2MLP: down_proj(act(gate_proj(x)) * up_proj(x)), no biases.
        out = pop_llama_layer(src, hf_i, ours, cfg, w_e, norms=norms, attn_bias=bias_rule(hf.attention_bias))
        # q_norm/k_norm gains cover the flat (head d_head) projection: the same order as the projection rows.
        for name, n in (("q_norm", cfg.n_heads), ("k_norm", cfg.n_kv_heads)):
            w = src.pop(f"{hf_i}.self_attn.{name}.weight", (n * cfg.d_head,))
            out[f"{ours}.attn.{name}.w"] = einops.rearrange(w, "(head d_head) -> head d_head", head=n)
        return out

    # Olmo2ForCausalLM._tied_weights_keys: a tied checkpoint may omit lm_head.weight (bias=False).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, Olmo2Config]:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                num_attention_heads=4, rms_norm_eps=1e-6, pad_token_id=1, eos_token_id=0)
    variants = {
        "default": Olmo2Config(**base),                                    # MHA, untied (OLMo-2 7B/13B)
        "gqa": Olmo2Config(**base, num_key_value_heads=2),                 # k_norm over fewer heads than q_norm
        "mqa_tied": Olmo2Config(**base, num_key_value_heads=1, tie_word_embeddings=True),
        "attention_bias": Olmo2Config(**base, num_key_value_heads=2, attention_bias=True),
    }
    if not ROPE_PARAMETERS_LAYOUT:
        # 4.57's Olmo2Config._rope_scaling_validation accepts only the legacy {"type", "factor"} of the
        # linear and dynamic types: llama3 scaling cannot be written there.
        return variants | {"rope_linear": Olmo2Config(**base, rope_theta=500.0,
                                                      rope_scaling={"type": "linear", "factor": 4.0})}
    return variants | {"rope_llama3": Olmo2Config(**base, **rope_config(
        rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))}


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="olmo2", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
