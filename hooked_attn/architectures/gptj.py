"""GPT-J family (GPT-J-6B and its fine-tunes). Mirrors transformers/models/gptj/modeling_gptj.py."""

from torch import Tensor
from transformers import GPTJConfig

from hooked_attn.architectures import register
from hooked_attn.architectures.base import Architecture, KeyLedger, UnsupportedConfigError
from hooked_attn.architectures.common import (
    GPT2_FRAME, activation, convert_decoder, pop_attention, pop_linear_mlp, pop_norms,
)
from hooked_attn.config import ModelConfig, NormConfig, Rotary
from hooked_attn.shapes import StateDict

ARCH = "GPTJForCausalLM"
HANDLED_HF_FIELDS = frozenset({
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim", "n_inner", "activation_function",
    "layer_norm_epsilon", "tie_word_embeddings",
})
IGNORED_HF_FIELDS = frozenset({
    "resid_pdrop", "embd_pdrop", "attn_pdrop",  # dropout: off at inference
})
# Old checkpoints (EleutherAI/gpt-j-6b) carry the causal-mask buffers; they hold no weights. (The
# sinusoid table embed_positions is a non-persistent buffer: never in a state dict.)
IGNORED_HF_KEYS = ("transformer.h.*.attn.bias", "transformer.h.*.attn.masked_bias")


def config_from_hf(hf: GPTJConfig) -> ModelConfig:
    d_head = hf.n_embd // hf.n_head
    # GPTJConfig types rotary_dim as int (None is rejected by its strict validation). HF slices
    # [..., :rotary_dim] per head against a rotary_dim-wide sinusoid table (GPTJAttention.forward).
    n_rot = hf.rotary_dim
    if n_rot > d_head or n_rot <= 0 or n_rot % 2:
        raise UnsupportedConfigError(
            f"{ARCH}: rotary_dim={hf.rotary_dim!r} must be a positive even number of at most d_head={d_head} "
            "(HF's own forward fails otherwise)"
        )
    return ModelConfig(
        hf_architecture=ARCH,
        n_layers=hf.n_layer, d_model=hf.n_embd, n_heads=hf.n_head, n_kv_heads=hf.n_head, d_head=d_head,
        d_mlp=hf.n_inner if hf.n_inner is not None else 4 * hf.n_embd, d_vocab=hf.vocab_size,
        n_ctx=hf.n_positions, norm=NormConfig(kind="layernorm", eps=hf.layer_norm_epsilon),
        act_fn=activation(hf, ARCH, "activation_function"),
        # Interleaved partial rotary: the first rotary_dim dimensions of each head rotate in adjacent
        # pairs (2i, 2i+1) (rotate_every_two, apply_rotary_pos_emb), base fixed at 10000
        # (create_sinusoidal_positions); the rest pass through.
        positions=Rotary(n_rotary_dims=n_rot, base=10_000.0, pairing="interleaved"),
        # GPTJAttention._attn divides q.k by sqrt(d_head), with q and k upcast to float32: identical
        # in fp32; in reduced precision our scores are computed in the model's dtype.
        attn_scale=d_head**-0.5,
        # GPTJBlock.forward: attention and MLP both read ln_1(x) and add to x.
        parallel_attn_mlp=True,
    )


def convert_state_dict(hf_sd: StateDict, cfg: ModelConfig, hf: GPTJConfig) -> dict[str, Tensor]:
    def layer(src: KeyLedger, hf_i: str, ours: str, w_e: Tensor) -> dict[str, Tensor]:
        # GPT-J has ONE norm per block, ln_1, read by both attention and MLP (GPTJBlock.forward). Our
        # parallel block gives attention ln1 and the MLP ln2, both reading resid_pre, so the same
        # weights go into both: identical outputs, and weight processing folds each copy into its reader.
        out = pop_norms(src, hf_i, ours, cfg.d_model, {"ln1": "ln_1", "ln2": "ln_1"}, bias=True)
        # Separate q/k/v/out projections, all bias=False (GPTJAttention.__init__).
        out |= pop_attention(src, f"{hf_i}.attn", ours, cfg, w_e, names=("q_proj", "k_proj", "v_proj", "out_proj"))
        return out | pop_linear_mlp(src, f"{hf_i}.mlp", ours, cfg, ("fc_in", "fc_out"))

    # A tied checkpoint may omit lm_head.weight (it is then the token embedding); lm_head.bias is
    # never tied and always present (GPTJForCausalLM: nn.Linear(n_embd, vocab_size) with bias).
    return convert_decoder(hf_sd, cfg, ARCH, layer, tied=hf.tie_word_embeddings, **GPT2_FRAME,
                           lm_head_bias="lm_head.bias", ignore=IGNORED_HF_KEYS)


def tiny_hf_configs() -> dict[str, GPTJConfig]:
    base = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return {
        "default": GPTJConfig(**base, rotary_dim=4),          # rotary on half of each 8-wide head
        "full_rotary": GPTJConfig(**base, rotary_dim=8),
        "tied_inner_gelu": GPTJConfig(**base, rotary_dim=2, n_inner=48, activation_function="gelu",
                                      tie_word_embeddings=True),
    }


ARCHITECTURE = register(Architecture(
    hf_architecture=ARCH, model_type="gptj", handled_hf_fields=HANDLED_HF_FIELDS,
    ignored_hf_fields=IGNORED_HF_FIELDS, config_from_hf=config_from_hf, convert_state_dict=convert_state_dict,
    tiny_hf_configs=tiny_hf_configs,
))
