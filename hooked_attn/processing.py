"""Weight processing: pure ``StateDict -> StateDict`` transforms that leave the model's output unchanged.

Each function takes our per-head state dict (``blocks.{i}.attn.W_Q`` ...) and returns a new dict;
the input is never modified. With ``inplace=True`` the results go into the given dict instead, so that
each old tensor can be freed as its replacement is made (the loader does this with the dict it owns);
tensors themselves are never written to in either mode. Each docstring states the invariant its test checks. Arithmetic runs
in at least float32 and results are cast back to each tensor's dtype.
"""

import dataclasses
import logging
from collections.abc import Callable

import einops
import torch
from torch import Tensor

from hooked_attn.config import LearnedPositions, ModelConfig, Processing
from hooked_attn.memory import release_free_memory
from hooked_attn.shapes import StateDict

logger = logging.getLogger(__name__)


class ProcessingError(ValueError):
    """A processing step was asked for that cannot preserve this model."""


def _f(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


_SLICE_ELEMENTS = 1 << 21  # float32 temporaries stay under ~8 MB per slice, whatever the tensor's size


def _map_slices(t: Tensor, fn: Callable[[Tensor], Tensor], axis: int) -> Tensor:
    """``fn`` (in at least float32) over slices of ``t`` along ``axis``, into a fresh tensor of ``t``'s
    dtype and layout. ``fn`` must treat each slice on its own (reduce over other axes only), so the
    result equals ``fn(t)``; the float32 temporaries are bounded by the slice, not by ``t``.
    """
    n = t.shape[axis]
    step = max(1, _SLICE_ELEMENTS // max(1, t.numel() // max(1, n)))
    if step >= n and t.dtype == torch.float32:  # one slice, no upcast: the result keeps t's layout as it is
        return fn(t)
    out = torch.empty_like(t)
    for start in range(0, n, step):
        size = min(step, n - start)
        out.narrow(axis, start, size).copy_(fn(_f(t.narrow(axis, start, size))))
    return out


def _contract(b: Tensor, W: Tensor, axis: int) -> Tensor:
    """``sum over axis of W * b`` (b along ``axis``), in float32 slices over W's last axis."""
    last = W.ndim - 1
    step = max(1, _SLICE_ELEMENTS // max(1, W.numel() // max(1, W.shape[last])))
    parts = [torch.tensordot(_f(b), _f(W.narrow(last, start, min(step, W.shape[last] - start))), dims=([0], [axis]))
             for start in range(0, W.shape[last], step)]
    return torch.cat(parts, dim=-1)


def _norm_readers(cfg: ModelConfig, sd: StateDict) -> list[tuple[str, list[str]]]:
    """(norm prefix, the weights that read its output) for every norm whose gain can be folded:
    the pre-norms of each block and the final norm. Post-sublayer norms, Q/K norms and an
    embedding norm write into the residual stream or sit between two weights, so they stay."""
    out = []
    if cfg.block_norms in ("pre", "sandwich"):
        for i in range(cfg.n_layers):
            out.append((f"blocks.{i}.ln1", [f"blocks.{i}.attn.W_{s}" for s in "QKV"]))
            mlp = f"blocks.{i}.mlp."
            readers = [k for k in sd if k.startswith(mlp) and k[len(mlp):].startswith("W_") and k != mlp + "W_out"]
            out.append((f"blocks.{i}.ln2", sorted(readers)))
    if cfg.final_norm:
        out.append(("ln_final", ["unembed.W_U"]))
    return out


_READER_BIAS = {"W_Q": "b_Q", "W_K": "b_K", "W_V": "b_V", "W_in": "b_in", "W_gate": "b_gate", "W_U": "b_U"}


def _bias_key(weight_key: str, sd: StateDict) -> str | None:
    head, _, name = weight_key.rpartition(".")
    key = f"{head}.{_READER_BIAS[name]}" if name in _READER_BIAS else None
    return key if key in sd else None


def why_not(step: str, cfg: ModelConfig) -> str | None:
    """Why ``step`` cannot preserve this model, or None when it can."""
    # clip_qkv clamps x W + b for q, k and v. Folding a norm's gain and bias into W and b, centring
    # W over d_model (the norm's output has zero mean) and centring the residual stream (every reader
    # is a LayerNorm) all leave x W + b unchanged, so what is clamped is unchanged; the steps below
    # that would change it are refused.
    if step == "fold_ln":
        if cfg.block_norms == "post_residual":
            return "post-residual norms write the residual stream itself, so their gains cannot move"
        if cfg.block_norms == "normed_residual":
            return "each block adds its sublayers to the norm's output, so its gains shape the residual stream"
        if cfg.block_norms == "output" and not cfg.final_norm:
            return "this model has no norm whose gain feeds a weight"
    if step == "fold_value_biases" and cfg.clip_qkv is not None:
        return "v is clamped (clip_qkv) after its bias is added, so the bias cannot move past the clamp"
    if step == "center_writing_weights":
        if cfg.norm.kind != "layernorm":
            return "the residual stream is read through RMSNorm, which does not remove the mean"
        if cfg.block_norms != "pre" or not cfg.final_norm:
            return "some reader of the residual stream is not a LayerNorm"
    if step == "center_unembed" and cfg.output_logits_soft_cap is not None:
        return "the final logits are soft-capped, and tanh does not commute with a shift"
    if step == "refactor_factored_attn_matrices":
        if cfg.rotary_at(0) is not None or cfg.layer_rotary is not None:
            return "the rotary rotation acts between W_Q and W_K, so their product is not the QK circuit"
        if cfg.n_kv_heads != cfg.n_heads:
            return f"it needs one K/V head per query head ({cfg.n_heads} query, {cfg.n_kv_heads} K/V heads here)"
        if cfg.qk_norm is not None:
            return "a norm sits between the Q/K projections and the scores"
        if cfg.clip_qkv is not None:
            return "q, k and v are clamped (clip_qkv) after projection: refactoring changes what is clamped"
    return None


def _refuse(step: str, cfg: ModelConfig) -> None:
    reason = why_not(step, cfg)
    if reason is not None:
        raise ProcessingError(f"{step} cannot preserve this {cfg.hf_architecture} model: {reason}")


def fold_layer_norm(sd: StateDict, cfg: ModelConfig, inplace: bool = False) -> dict[str, Tensor]:
    """Fold each norm's gain (and bias) into the weights that read its output; for LayerNorm,
    then centre those reading weights over ``d_model``.

    Invariant: logits unchanged. The norms keep normalising (the config's norm gets
    ``weight=False, bias=False``); ``w`` scales the rows of each reader, ``b`` becomes reader bias
    (``b_Q``/``b_K``/``b_V``, ``b_in`` and, in gated MLPs, ``b_gate``; ``b_U``), and a LayerNorm
    output has zero mean, so a reader's component along the all-ones direction is never used and
    centring removes it. Each reader's output ``x W + b`` is unchanged.
    """
    _refuse("fold_ln", cfg)
    out = sd if inplace else dict(sd)
    center = cfg.norm.kind == "layernorm"
    for norm, readers in _norm_readers(cfg, sd):
        w, b = out.pop(f"{norm}.w", None), out.pop(f"{norm}.b", None)
        gain = None if w is None else _f(w) + cfg.norm.weight_offset
        for key in readers:
            W = out[key]
            d_axis = W.ndim - 2  # d_model is the second-to-last axis of every reading weight
            shape = [1] * W.ndim
            shape[d_axis] = -1
            bias_key = _bias_key(key, sd)
            if b is not None:
                if bias_key is None:
                    raise ProcessingError(f"cannot fold {norm}.b into {key}: it has no bias to take it")
                out[bias_key] = (_f(out[bias_key]) + _contract(b, W, d_axis)).to(out[bias_key].dtype)

            def scale_and_center(w: Tensor, gain: Tensor | None = gain, shape: list[int] = shape,
                                 d_axis: int = d_axis) -> Tensor:
                if gain is not None:
                    w = w * gain.view(shape)
                return w - w.mean(d_axis, keepdim=True) if center else w

            # Slices never run along d_model, over which the centring reduces: along head (or expert) for
            # per-head weights, else along the last axis; both are outermost in the nn.Linear storage.
            out[key] = _map_slices(W, scale_and_center, 0 if W.ndim == 3 else W.ndim - 1)
            if inplace:  # the replaced tensor is gone: hand its pages back before the next one is made
                release_free_memory()
    return out


def center_writing_weights(sd: StateDict, cfg: ModelConfig, inplace: bool = False) -> dict[str, Tensor]:
    """Subtract from every weight and bias that writes to the residual stream its mean over ``d_model``.

    Invariant: logits unchanged, for LayerNorm models only: every reader of the residual stream is a
    LayerNorm, which removes the mean first.
    """
    _refuse("center_writing_weights", cfg)
    out = sd if inplace else dict(sd)
    keys = ["embed.W_E"] + (["pos_embed.W_pos"] if isinstance(cfg.positions, LearnedPositions) else [])
    for i in range(cfg.n_layers):
        keys += [f"blocks.{i}.attn.W_O", f"blocks.{i}.attn.b_O", f"blocks.{i}.mlp.W_out", f"blocks.{i}.mlp.b_out"]
    for key in keys:
        t = out[key]
        if t.ndim == 1:
            out[key] = (_f(t) - _f(t).mean()).to(t.dtype)
        else:  # the mean is over d_model, the last axis: slice along the first
            out[key] = _map_slices(t, lambda x: x - x.mean(-1, keepdim=True), 0)
    return out


def center_unembed(sd: StateDict, cfg: ModelConfig, inplace: bool = False) -> dict[str, Tensor]:
    """Subtract from ``W_U`` and ``b_U`` their mean over ``d_vocab``.

    Invariant: log-probs unchanged; logits shift by a per-position constant.
    """
    _refuse("center_unembed", cfg)
    out = sd if inplace else dict(sd)
    b_U = _f(sd["unembed.b_U"])
    # The mean is over d_vocab, the last axis: slice along d_model.
    out["unembed.W_U"] = _map_slices(sd["unembed.W_U"], lambda w: w - w.mean(-1, keepdim=True), 0)
    out["unembed.b_U"] = (b_U - b_U.mean()).to(sd["unembed.b_U"].dtype)
    return out


def fold_value_biases(sd: StateDict, cfg: ModelConfig, inplace: bool = False) -> dict[str, Tensor]:
    """Move each value bias into the output bias: ``b_O += sum_head b_V[head] @ W_O[head]``; ``b_V = 0``.

    Invariant: logits unchanged, because every pattern row sums to 1, so the value bias reaches
    ``z`` unchanged whatever the pattern. Refused when v is clamped (``clip_qkv``).
    """
    _refuse("fold_value_biases", cfg)
    out = sd if inplace else dict(sd)
    for i in range(cfg.n_layers):
        a = f"blocks.{i}.attn"
        b_V = _f(sd[f"{a}.b_V"]).repeat_interleave(cfg.group_size, dim=0)
        folded = einops.einsum(b_V, _f(sd[f"{a}.W_O"]), "head d_head, head d_head d_model -> d_model")
        out[f"{a}.b_O"] = (_f(sd[f"{a}.b_O"]) + folded).to(sd[f"{a}.b_O"].dtype)
        out[f"{a}.b_V"] = torch.zeros_like(sd[f"{a}.b_V"])
    return out


def _balanced(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Factors ``(U sqrt S, sqrt S Vh)`` of ``A @ B`` (batched), via QR so the product is never formed."""
    Qa, Ra = torch.linalg.qr(A)
    Qb, Rb = torch.linalg.qr(B.mT)
    U, S, Vh = torch.linalg.svd(Ra @ Rb.mT)
    root = S.sqrt()
    return (Qa @ U) * root[..., None, :], root[..., :, None] * (Vh @ Qb.mT)


def refactor_factored_attn_matrices(sd: StateDict, cfg: ModelConfig, inplace: bool = False) -> dict[str, Tensor]:
    """Rewrite each head's ``W_Q``/``W_K`` (with biases) and ``W_V``/``W_O`` as balanced SVD factors
    of ``W_Q W_K^T`` and ``W_V W_O``; value biases are folded into ``b_O`` first.

    Invariant: logits unchanged; each head's QK and OV products (bias rows included) are preserved.
    Refused for rotary models (rotation sits between Q and K), for shared K/V heads, Q/K norms and
    clamped q, k, v.
    """
    _refuse("refactor_factored_attn_matrices", cfg)
    out = fold_value_biases(sd, cfg, inplace=inplace)
    for i in range(cfg.n_layers):
        a = f"blocks.{i}.attn"
        dt = sd[f"{a}.W_Q"].dtype
        q = torch.cat([out[f"{a}.W_Q"], out[f"{a}.b_Q"][:, None, :]], dim=1).double()
        k = torch.cat([out[f"{a}.W_K"], out[f"{a}.b_K"][:, None, :]], dim=1).double()
        q, k_t = _balanced(q, k.mT)
        k = k_t.mT
        out[f"{a}.W_Q"], out[f"{a}.b_Q"] = q[:, :-1].to(dt), q[:, -1].to(dt)
        out[f"{a}.W_K"], out[f"{a}.b_K"] = k[:, :-1].to(dt), k[:, -1].to(dt)
        v, o = _balanced(out[f"{a}.W_V"].double(), out[f"{a}.W_O"].double())
        out[f"{a}.W_V"], out[f"{a}.W_O"] = v.to(dt), o.to(dt)
    return out


STEPS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "fold_ln": fold_layer_norm,
    "center_writing_weights": center_writing_weights,
    "center_unembed": center_unembed,
    "fold_value_biases": fold_value_biases,
    "refactor_factored_attn_matrices": refactor_factored_attn_matrices,
}


def process_weights(
    sd: StateDict, cfg: ModelConfig, *, fold_ln: bool = True, center_writing_weights: bool = True,
    center_unembed: bool = True, fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
    inplace: bool = False,
) -> tuple[dict[str, Tensor], ModelConfig]:
    """Apply the chosen steps in order and return the new weights with the config that describes them.

    A default-on step that cannot preserve this model (``why_not``) is skipped with a logged reason:
    ``center_writing_weights`` on RMSNorm models, ``center_unembed`` with soft-capped logits, ...
    ``refactor_factored_attn_matrices`` raises ProcessingError instead, since it is only ever asked
    for explicitly.
    """
    wanted = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights,
              "center_unembed": center_unembed, "fold_value_biases": fold_value_biases,
              "refactor_factored_attn_matrices": refactor_factored_attn_matrices}
    done = cfg.processing
    out: dict[str, Tensor] = sd if inplace else dict(sd)  # type: ignore[assignment]
    for step, on in wanted.items():
        if not on or getattr(done, step):
            continue
        reason = why_not(step, cfg)
        if reason is not None and step != "refactor_factored_attn_matrices":
            logger.info("skipping %s for %s: %s", step, cfg.hf_architecture, reason)
            continue
        out = STEPS[step](out, cfg, inplace=True)  # out is this call's own dict (or the caller's, inplace)
        if inplace:
            release_free_memory()
        if step == "refactor_factored_attn_matrices":
            done = Processing(**{**vars(done), "fold_value_biases": True})
        done = Processing(**{**vars(done), step: True})
        if step == "fold_ln":
            cfg = cfg.replace(norm=dataclasses.replace(cfg.norm, weight=False, bias=False, weight_offset=0.0))
    return out, cfg.replace(processing=done)
