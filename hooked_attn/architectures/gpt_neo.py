"""GPT-Neo family (GPT-Neo 125M-2.7B). Mirrors transformers/models/gpt_neo/modeling_gpt_neo.py."""

from torch import Tensor
from transformers import GPTNeoConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    GPT2_FRAME, GPT2_NORMS, activation, convert_decoder, pop_attention, pop_learned_positions,
    pop_linear_mlp, pop_norms,
)
from hooked_attn.config import LearnedPositions, ModelConfig, NormConfig
from hooked_attn.shapes import StateDict

ARCH = "GPTNeoForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    # to_dict() spells the sizes num_layers / num_heads (attribute_map aliases num_hidden_layers /
    # num_attention_heads to them, configuration_gpt_neo.py).
    "vocab_size", "max_position_embeddings", "hidden_size", "num_layers", "num_heads", "intermediate_size",
    "activation_function", "layer_norm_epsilon", "tie_word_embeddings", "window_size",
    # attention_types is the compact form; GPTNeoConfig.__post_init__ expands it into attention_layers
    # (one "global"/"local" per layer), which is what GPTNeoAttention reads. We read attention_layers.
    "attention_types", "attention_layers",
})
IGNORED_HF_FIELDS = frozenset({
    "resid_dropout", "embed_dropout", "attention_dropout",  # dropout: off at inference
    "classifier_dropout",  # GPTNeoForSequenceClassification/TokenClassification heads only
    "gradient_checkpointing",  # in EleutherAI/gpt-neo-* config.json; a training-memory setting
    # Also in the EleutherAI configs, copied from GPT-2's; transformers has no GPT-Neo double-heads
    # model and never reads them.
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
})
# Old checkpoints (EleutherAI/gpt-neo-*) carry the per-layer causal / local-window mask buffers; they
# hold no weights (now non-persistent buffers, GPTNeoSelfAttention.__init__).
IGNORED_HF_KEYS = ("transformer.h.*.attn.attention.bias", "transformer.h.*.attn.attention.masked_bias")


def config_from_hf(hf: GPTNeoConfig) -> ModelConfig:
    layers = list(hf.attention_layers)
    if len(layers) != hf.num_layers or set(layers) - {"global", "local"}:
        raise UnsupportedConfigError(
            f"{ARCH}: attention_layers={layers!r} must name 'global' or 'local' for each of the "
            f"{hf.num_layers} layers (attention_types={hf.attention_types!r})"
        )
    if "local" in layers and hf.window_size < 1:
        raise UnsupportedConfigError(f"{ARCH}: window_size={hf.window_size!r} must be positive for local layers")
    d_head = hf.hidden_size // hf.num_heads
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.num_layers, d_model=hf.hidden_size, n_heads=hf.num_heads, n_kv_heads=hf.num_heads,
        d_head=d_head,
        d_mlp=hf.intermediate_size if hf.intermediate_size is not None else 4 * hf.hidden_size,  # GPTNeoBlock
        d_vocab=hf.vocab_size, n_ctx=hf.max_position_embeddings,
        norm=NormConfig(kind="layernorm", eps=hf.layer_norm_epsilon),
        act_fn=activation(hf, ARCH, "activation_function"),
        positions=LearnedPositions(n_ctx=hf.max_position_embeddings),
        # GPTNeoSelfAttention._attn never scales q.k (no 1/sqrt(d_head)): the original Mesh-TF model
        # folded the scale into its initialisation. It upcasts q and k to float32 first: identical in
        # fp32; in reduced precision our scores are computed in the model's dtype.
        attn_scale=1.0,
        # Local layers: GPTNeoSelfAttention.__init__ builds bias = tril XOR tril(-window_size), so key
        # k is visible from query q iff 0 <= q - k < window_size: exactly our attn_windows rule.
        attn_windows=tuple(hf.window_size if kind == "local" else None for kind in layers),
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: GPTNeoConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        out = pop_norms(src, hf_i, ours, cfg.d_model, GPT2_NORMS, bias=True)
        # The attention sits one level deeper than GPT-2's (GPTNeoAttention wraps GPTNeoSelfAttention
        # as .attention). q/k/v are separate nn.Linear [out, in] with bias=False; out_proj has a bias.
        out |= pop_attention(src, f"{hf_i}.attn.attention", ours, cfg, w_e, o_bias="required",
                             names=("q_proj", "k_proj", "v_proj", "out_proj"))
        # GPTNeoMLP uses nn.Linear (not GPT-2's Conv1D): weights are [out, in].
        return out | pop_linear_mlp(src, f"{hf_i}.mlp", ours, cfg, ("c_fc", "c_proj"))

    # A tied checkpoint may omit lm_head.weight (it is then the token embedding); lm_head has no bias.
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, **GPT2_FRAME,
                           extra=pop_learned_positions(cfg), ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, GPTNeoConfig]:
    base = dict(vocab_size=97, max_position_embeddings=32, hidden_size=32, num_heads=4, bos_token_id=0,
                eos_token_id=0)
    return {
        # GPT-Neo's alternation, with a window (4) that binds within the tests' 7-9 tokens.
        "default": GPTNeoConfig(**base, num_layers=2, attention_types=[[["global", "local"], 1]], window_size=4),
        "local_first_relu_untied": GPTNeoConfig(**base, num_layers=3, window_size=3,
                                                attention_types=[[["local", "global"], 1], [["local"], 1]],
                                                activation_function="relu", intermediate_size=48,
                                                tie_word_embeddings=False),
        "all_global_gelu": GPTNeoConfig(**base, num_layers=2, attention_types=[[["global"], 2]],
                                        activation_function="gelu"),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="gpt_neo", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
