"""Small helpers the family converters share: the converter frame (embedding, layers, final norm,
unembedding, finish), norms, HF ``nn.Linear`` projections into our per-head layout, the per-head fused
QKV split, the gated MLP (with or without biases), the lm_head-or-tied unembedding, the rotary buffer
keys, and the activation-name table.

Every helper pops its keys through the family's :class:`KeyLedger`, so the ledger still accounts for
every HF key, and every shape check names the HF key. Layout quirks (fused projections, odd biases,
scalings) stay in the family modules, next to the HF source they mirror.
"""

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple, TypedDict

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from hooked_attn.architectures.base import KeyLedger
from hooked_attn.architectures.parsers import (  # re-exported for the families
    ACTIVATIONS,  # noqa: F401
    TRANSFORMERS_MAJOR,
    activation,  # noqa: F401
    head_dim,  # noqa: F401
    rotary_dims,  # noqa: F401
)
from hooked_attn.config import ModelConfig
from hooked_attn.shapes import StateDict



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


DECODER_SIZE_FIELDS = frozenset({
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings",
})
"""The HF config fields :func:`decoder_sizes` reads: a family that calls it adds them to its handled fields."""


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
    src: KeyLedger, embed: Float[Tensor, "d_vocab d_model"], tied: bool,
    keys: Iterable[str] = ("lm_head.weight",),
) -> Float[Tensor, "d_vocab d_model"]:
    """The lm_head weight (under the first of ``keys`` present), or the token embedding when the config
    ties them and the checkpoint omits it.

    A tied config whose checkpoint *stores* an lm_head different from the embedding gets what the
    installed transformers loads: from 5.0, the stored one (``PreTrainedModel.tie_weights`` in
    modeling_utils.py finds both keys with different values, warns, and does NOT tie them); in 4.x, the
    embedding (``_tie_or_clone_weights`` ties whatever the checkpoint stored), the stored key read and
    dropped as HF drops it.
    """
    keys = tuple(keys)
    if tied and TRANSFORMERS_MAJOR < 5:
        for key in keys:
            src.pop_optional(key, tuple(embed.shape))
        return embed
    for key in keys:
        lm_head = src.pop_optional(key, tuple(embed.shape))
        if lm_head is not None:
            return lm_head
    if not tied:
        src.pop(keys[0])  # raises: untied weights must be present
    return embed


def pop_unembed(
    src: KeyLedger, embed: Float[Tensor, "d_vocab d_model"], tied: bool, *,
    keys: Iterable[str] = ("lm_head.weight",), bias: str | None = None,
) -> dict[str, Tensor]:
    """``unembed.W_U`` from :func:`pop_lm_head` and ``unembed.b_U``: the bias at ``bias`` (never tied,
    always present when named), else zeros (an lm_head with bias=False)."""
    lm_head = pop_lm_head(src, embed, tied, keys)
    b_u = zeros(embed, embed.shape[0]) if bias is None else src.pop(bias, (embed.shape[0],))
    return {"unembed.W_U": lm_head.T, "unembed.b_U": b_u}


def pop_norm(src: KeyLedger, hf_norm: str, ours: str, width: int, *, bias: bool = False) -> dict[str, Tensor]:
    """``{ours}.w`` (and ``{ours}.b`` with ``bias``) from ``{hf_norm}.weight`` (and ``.bias``)."""
    out = {f"{ours}.w": src.pop(f"{hf_norm}.weight", (width,))}
    if bias:
        out[f"{ours}.b"] = src.pop(f"{hf_norm}.bias", (width,))
    return out


LLAMA_NORMS: Mapping[str, str] = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
"""LLaMA's block norms: ours -> the HF module under the layer (post_attention_layernorm: the pre-MLP norm)."""


SHARED_NORM: Mapping[str, str] = {"ln1": "input_layernorm", "ln2": "input_layernorm"}
"""A parallel block's ONE norm, read by attention and MLP: ours gives the same weights to ln1 and ln2."""

GPT2_NORMS: Mapping[str, str] = {"ln1": "ln_1", "ln2": "ln_2"}
"""GPT-2's block norms (also GPT-Neo and BigCode)."""

GPT2_FRAME: Mapping[str, Any] = {"embed": "transformer.wte.weight", "layers": "transformer.h",
                                 "final_norm": "transformer.ln_f", "norm_bias": True}
""":func:`convert_decoder`'s keys for GPT-2's layout (also GPT-Neo, GPT-J and BigCode)."""

FALCON_FRAME: Mapping[str, Any] = {"embed": "transformer.word_embeddings.weight", "layers": "transformer.h",
                                   "final_norm": "transformer.ln_f", "norm_bias": True}
""":func:`convert_decoder`'s keys for BLOOM's layout (also Falcon's)."""


def pop_learned_positions(
    cfg: ModelConfig, key: str = "transformer.wpe.weight", *, offset: int = 0
) -> Callable[[KeyLedger, Tensor], dict[str, Tensor]]:
    """For :func:`convert_decoder`'s ``extra``: ``pos_embed.W_pos`` [n_ctx d_model] from ``key``, a table
    of ``n_ctx + offset`` rows whose first ``offset`` rows are dropped (position p reads row p + offset)."""
    return lambda src, w_e: {"pos_embed.W_pos": src.pop(key, (cfg.n_ctx + offset, cfg.d_model))[offset:]}


def pop_norms(
    src: KeyLedger, hf_layer: str, ours: str, width: int, names: Mapping[str, str] = LLAMA_NORMS, *,
    bias: bool = False,
) -> dict[str, Tensor]:
    """The block norms ``names`` maps (our ``ln1``/``ln2``/``ln1_post``/``ln2_post`` -> the HF module
    under ``hf_layer``). One HF norm named for two of ours (a parallel block's single norm) gives both
    the same tensors; the ledger counts it once."""
    out: dict[str, Tensor] = {}
    for our_norm, hf_norm in names.items():
        out |= pop_norm(src, f"{hf_layer}.{hf_norm}", f"{ours}.{our_norm}", width, bias=bias)
    return out


def pop_llama_layer(
    src: KeyLedger, hf_layer: str, ours: str, cfg: ModelConfig, like: Tensor, *,
    norms: Mapping[str, str] = LLAMA_NORMS, attn_bias: BiasRule = "none", o_bias: BiasRule | None = None,
    mlp_bias: BiasRule = "none",
) -> dict[str, Tensor]:
    """One LLaMA-shaped decoder layer: RMS norms without bias (``names`` as in :func:`pop_norms`),
    q/k/v/o_proj under ``self_attn`` (:func:`pop_attention`) and gate/up/down_proj under ``mlp``."""
    return (pop_norms(src, hf_layer, ours, cfg.d_model, norms)
            | pop_attention(src, f"{hf_layer}.self_attn", ours, cfg, like, bias=attn_bias, o_bias=o_bias)
            | pop_gated_mlp(src, f"{hf_layer}.mlp", ours, cfg, like, bias=mlp_bias))


def qkv_per_head(
    w: Float[Tensor, "n_qkv d_model"], b: Float[Tensor, " n_qkv"], ours: str, n_heads: int
) -> dict[str, Tensor]:
    """W/b_Q, K, V under ``{ours}.attn`` from a fused nn.Linear whose rows are ordered
    (head, qkv, d_head): each head's query, key and value rows together (GPT-NeoX, BLOOM, multi-head
    Falcon and BigCode), unlike GPT-2's (qkv, head, d_head)."""
    w_sites = einops.rearrange(w, "(head qkv d_head) d_model -> qkv head d_model d_head", qkv=3, head=n_heads)
    b_sites = einops.rearrange(b, "(head qkv d_head) -> qkv head d_head", qkv=3, head=n_heads)
    out = {}
    for j, site in enumerate("QKV"):
        out[f"{ours}.attn.W_{site}"] = w_sites[j]
        out[f"{ours}.attn.b_{site}"] = b_sites[j]
    return out


def rotary_buffer_keys(prefix: str = "model", attn: str = "layers.*.self_attn") -> tuple[str, str]:
    """The rotary ``inv_freq`` buffers, per layer and per model: non-persistent (rebuilt from the config),
    but older checkpoints still carry them. Globs for :meth:`KeyLedger.finish`."""
    return (f"{prefix}.{attn}.rotary_emb.inv_freq", f"{prefix}.rotary_emb.inv_freq")


class EmbedProjection(NamedTuple):
    """A token table narrower than the residual stream, with bias-free nn.Linear maps between them:
    ``project_in`` [d_model width] right after the lookup and ``project_out`` [width d_model] right
    before the lm_head (OPT's word_embed_proj_dim). Both are linear with nothing in between, so they
    fold exactly into our d_model-wide ``W_E = E @ P_in^T`` and ``W_U = (lm_head @ P_out)^T``."""

    width: int
    project_in: str
    project_out: str


def _product64(a: Float[Tensor, "n k"], b: Float[Tensor, "k m"]) -> Float[Tensor, "n m"]:
    """``a @ b`` taken in float64 and rounded once to ``a``'s dtype."""
    return (a.double() @ b.double()).to(a.dtype)


def tied_embed_key(src: KeyLedger, embed: str, lm_head: Iterable[str], tied: bool) -> str:
    """The key to read the token embedding from: ``embed``, or, for a tied checkpoint that stores only
    the lm_head (under the first of ``lm_head`` present), that lm_head: transformers 5 ties the embedding
    to it (PreTrainedModel.tie_weights swaps source and target when only the target is present)."""
    stored_head = next((key for key in lm_head if key in src), None)
    return stored_head if tied and embed not in src and stored_head is not None else embed


LayerConverter = Callable[[KeyLedger, str, str, Tensor], dict[str, Tensor]]
"""``(src, hf_layer, ours, w_e) -> weights``: one decoder layer, ``hf_layer`` the HF prefix
(``model.layers.3``), ``ours`` ours (``blocks.3``), ``w_e`` the token embedding (for dtype/device)."""


def convert_decoder(
    hf_sd: StateDict, cfg: ModelConfig, arch: str, layer: LayerConverter, *, tied: bool,
    embed: str = "model.embed_tokens.weight", layers: str = "model.layers",
    final_norm: str | None = "model.norm", norm_bias: bool = False,
    lm_head: Iterable[str] = ("lm_head.weight",), lm_head_bias: str | None = None,
    extra: Callable[[KeyLedger, Tensor], dict[str, Tensor]] | None = None, ignore: Iterable[str] = (),
    projection: EmbedProjection | None = None,
) -> dict[str, Tensor]:
    """The converter frame: ``embed.W_E`` from ``embed`` (through ``projection``'s project_in when
    given); ``extra(src, w_e)`` (positions, an embedding norm); ``layer`` for each of ``layers.{i}``;
    ``ln_final`` from ``final_norm`` (None: no norm, or a norm without parameters); the unembedding
    (:func:`pop_unembed`, then ``projection``'s project_out); then every HF key not matched by ``ignore``
    must have been used (:meth:`KeyLedger.finish`)."""
    src = KeyLedger(hf_sd, arch)
    lm_head = tuple(lm_head)
    embed = tied_embed_key(src, embed, lm_head, tied)
    width = cfg.d_model if projection is None else projection.width
    w_tok = src.pop(embed, (cfg.d_vocab, width))
    w_e = w_tok
    if projection is not None:
        w_e = _product64(w_tok, src.pop(projection.project_in, (cfg.d_model, width)).T)
    out = {"embed.W_E": w_e}
    if extra is not None:
        out |= extra(src, w_e)
    for i in range(cfg.n_layers):
        out |= layer(src, f"{layers}.{i}", f"blocks.{i}", w_e)
    if final_norm is not None:
        out |= pop_norm(src, final_norm, "ln_final", cfg.d_model, bias=norm_bias)
    unembed = pop_unembed(src, w_tok, tied, keys=lm_head, bias=lm_head_bias)
    if projection is not None:
        p_out = src.pop(projection.project_out, (width, cfg.d_model))
        unembed["unembed.W_U"] = _product64(unembed["unembed.W_U"].T, p_out).T
    out |= unembed
    src.finish(ignore=ignore)
    return out
