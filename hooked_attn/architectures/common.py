"""Small helpers the family converters share: HF ``nn.Linear`` projections into our per-head layout,
the gated MLP (with or without biases), the lm_head-or-tied unembedding, and the activation-name table.

Every helper pops its keys through the family's :class:`KeyLedger`, so the ledger still accounts for
every HF key, and every shape check names the HF key. Layout quirks (fused projections, odd biases,
scalings) stay in the family modules, next to the HF source they mirror.
"""

import math
from typing import Any, Literal, TypedDict

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from hooked_attn.architectures.base import KeyLedger
from hooked_attn.architectures.parsers import ACTIVATIONS  # noqa: F401  (re-exported: the families import it from here)
from hooked_attn.config import ModelConfig



class DecoderSizes(TypedDict):
    """The ModelConfig sizes that LLaMA-style HF configs spell the same way."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int


def decoder_sizes(hf: Any, d_head: int) -> DecoderSizes:
    """Sizes from num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads (None: MHA),
    intermediate_size, vocab_size and max_position_embeddings."""
    return DecoderSizes(
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads, d_head=d_head, d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size, n_ctx=hf.max_position_embeddings,
    )


BiasRule = Literal["none", "optional", "required"]
"""How a projection bias is read: "none" never pops it (zeros; a stray key is refused by finish()),
"optional" pops it when present (zeros otherwise), "required" pops it or raises."""


def zeros(like: Tensor, *shape: int) -> Tensor:
    """Zeros of ``shape`` with ``like``'s dtype and device."""
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def bias_rule(present: bool) -> BiasRule:
    """The rule for projections whose biases a config flag switches on: "required" if set, else "none"."""
    return "required" if present else "none"


def heads_in(w: Float[Tensor, "n_out d_model"], d_head: int) -> Float[Tensor, "head d_model d_head"]:
    """An nn.Linear q/k/v weight [out, in] whose out axis is (head d_head), in our per-head layout."""
    return einops.rearrange(w, "(head d_head) d_model -> head d_model d_head", d_head=d_head)


def heads_out(w: Float[Tensor, "d_model n_in"], d_head: int) -> Float[Tensor, "head d_head d_model"]:
    """An nn.Linear o weight [out, in] whose in axis is (head d_head), in our per-head layout."""
    return einops.rearrange(w, "d_model (head d_head) -> head d_head d_model", d_head=d_head)


def pop_bias(src: KeyLedger, key: str, shape: tuple[int, ...], like: Tensor, rule: BiasRule) -> Tensor:
    """The bias at ``key`` (stored flat) reshaped to ``shape``, or zeros, as ``rule`` says."""
    if rule == "none":
        return zeros(like, *shape)
    flat = (math.prod(shape),)
    b = src.pop(key, flat) if rule == "required" else src.pop_optional(key, flat)
    return zeros(like, *shape) if b is None else b.reshape(shape)


def pop_attention(
    src: KeyLedger, hf_attn: str, ours: str, cfg: ModelConfig, like: Tensor, *,
    bias: BiasRule = "none", o_bias: BiasRule | None = None,
    names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> dict[str, Tensor]:
    """W/b_Q, K, V, O under ``{ours}.attn`` from separate q/k/v/o nn.Linear layers under ``hf_attn``
    (``o_bias`` defaults to ``bias``)."""
    h, kv, d, m = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
    out = {}
    for site, proj, n in (("Q", names[0], h), ("K", names[1], kv), ("V", names[2], kv)):
        out[f"{ours}.attn.W_{site}"] = heads_in(src.pop(f"{hf_attn}.{proj}.weight", (n * d, m)), d)
        out[f"{ours}.attn.b_{site}"] = pop_bias(src, f"{hf_attn}.{proj}.bias", (n, d), like, bias)
    out[f"{ours}.attn.W_O"] = heads_out(src.pop(f"{hf_attn}.{names[3]}.weight", (m, h * d)), d)
    out[f"{ours}.attn.b_O"] = pop_bias(src, f"{hf_attn}.{names[3]}.bias", (m,), like,
                                       bias if o_bias is None else o_bias)
    return out


def pop_gated_mlp(
    src: KeyLedger, hf_mlp: str, ours: str, cfg: ModelConfig, like: Tensor,
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), *, bias: BiasRule = "none",
) -> dict[str, Tensor]:
    """W_gate, b_gate, W_in, b_in, W_out, b_out under ``{ours}.mlp`` from gate/up/down nn.Linear
    layers; their biases are read as ``bias`` says (zeros with the default "none")."""
    f, m = cfg.d_mlp, cfg.d_model
    gate, up, down = (f"{hf_mlp}.{name}" for name in names)
    return {
        f"{ours}.mlp.W_gate": src.pop(f"{gate}.weight", (f, m)).T,
        f"{ours}.mlp.b_gate": pop_bias(src, f"{gate}.bias", (f,), like, bias),
        f"{ours}.mlp.W_in": src.pop(f"{up}.weight", (f, m)).T,
        f"{ours}.mlp.b_in": pop_bias(src, f"{up}.bias", (f,), like, bias),
        f"{ours}.mlp.W_out": src.pop(f"{down}.weight", (m, f)).T,
        f"{ours}.mlp.b_out": pop_bias(src, f"{down}.bias", (m,), like, bias),
    }


def pop_linear_mlp(
    src: KeyLedger, hf_mlp: str, ours: str, cfg: ModelConfig, names: tuple[str, str]
) -> dict[str, Tensor]:
    """W_in, b_in, W_out, b_out under ``{ours}.mlp`` from an in/out pair of nn.Linear layers with biases."""
    f, m = cfg.d_mlp, cfg.d_model
    return {
        f"{ours}.mlp.W_in": src.pop(f"{hf_mlp}.{names[0]}.weight", (f, m)).T,
        f"{ours}.mlp.b_in": src.pop(f"{hf_mlp}.{names[0]}.bias", (f,)),
        f"{ours}.mlp.W_out": src.pop(f"{hf_mlp}.{names[1]}.weight", (m, f)).T,
        f"{ours}.mlp.b_out": src.pop(f"{hf_mlp}.{names[1]}.bias", (m,)),
    }


def pop_lm_head(
    src: KeyLedger, embed: Float[Tensor, "d_vocab d_model"], tied: bool, key: str = "lm_head.weight"
) -> Float[Tensor, "d_vocab d_model"]:
    """The lm_head weight, or the token embedding when the config ties them and the key is absent."""
    lm_head = src.pop_optional(key, tuple(embed.shape))
    if lm_head is None:
        if not tied:
            src.pop(key)  # raises: untied weights must be present
        lm_head = embed
    return lm_head
