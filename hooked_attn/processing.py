"""Weight processing: pure ``StateDict -> StateDict`` transforms that leave the model's output unchanged.

Each function takes our per-head state dict (``blocks.{i}.attn.W_Q`` ...) and returns a new dict;
the input is never modified. With ``inplace=True`` the results go into the given dict instead, so that
each old tensor can be freed as its replacement is made. Tensors themselves are never written to, unless
the caller also passes ``owned``: then a tensor that ``owned`` accepts and whose storage no other entry
of the dict shares is overwritten slice by slice instead of replaced, so processing needs no second copy
of it (the loader does this with the tensors it has just read). Each docstring states the invariant its
test checks. Arithmetic runs in at least float32 and results are cast back to each tensor's dtype.
"""

import contextlib
import dataclasses
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator

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


Owned = Callable[[Tensor], bool] | None


def _overwriter(out: dict[str, Tensor], inplace: bool, owned: Owned) -> Callable[[Tensor], bool]:
    """For one step: whether a tensor of ``out`` may be written to. ``owned`` must accept it, and no other
    entry may share its storage (GPT-2's W_Q, W_K and W_V are views of one c_attn weight; a tied W_U is a
    view of W_E). Sharing is counted once, as the step starts: a step only ever adds fresh tensors, so
    nothing it does can make a storage shared, and one pass over the dict serves every weight."""
    if not inplace or owned is None:
        return lambda t: False
    counts = Counter(t.untyped_storage().data_ptr() for t in out.values())
    return lambda t: counts[t.untyped_storage().data_ptr()] == 1 and owned(t)


def _slices(t: Tensor) -> Iterator[tuple[int, int, int]]:
    """(axis, start, size) of bounded slices of ``t`` along its outermost storage axis, so that each slice
    is one run of memory (a tied ``W_U`` stored as ``W_E`` is sliced along d_vocab, not d_model)."""
    axis = max(range(t.ndim), key=lambda a: t.stride(a) if t.shape[a] > 1 else -1)
    n = t.shape[axis]
    step = max(1, _SLICE_ELEMENTS // max(1, t.numel() // max(1, n)))
    for start in range(0, n, step):
        yield axis, start, min(step, n - start)


def _part(b: Tensor, axis: int, start: int, size: int) -> Tensor:
    """The piece of ``b`` (broadcast against a tensor) that meets that tensor's slice."""
    return b.narrow(axis, start, size) if b.shape[axis] > 1 else b


_lent = threading.local()  # the float32 buffer process_weights lends its steps for slice temporaries


@contextlib.contextmanager
def _lend_work_buffer() -> Iterator[None]:
    """Give the steps run inside one float32 buffer of ``_SLICE_ELEMENTS`` to reuse for every slice. A
    fresh temporary per slice fragments glibc's heap (small results land in the freed holes, so the next
    temporary no longer fits): load RSS then grows by a slice per weight."""
    previous = getattr(_lent, "buffer", None)
    _lent.buffer = torch.empty(_SLICE_ELEMENTS)
    try:
        yield
    finally:
        _lent.buffer = previous


def _work(t: Tensor, slices: list[tuple[int, int, int]]) -> Tensor:
    """A float32 tensor (float64 for a float64 ``t``) shaped and ordered in memory like ``t``'s first slice:
    in the lent buffer when there is one and it fits, else fresh. Later slices use a narrowed view of it."""
    like = t.narrow(*slices[0])
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    flat = getattr(_lent, "buffer", None)
    if flat is None or flat.numel() < like.numel() or flat.device != t.device or flat.dtype != dtype:
        flat = torch.empty(like.numel(), dtype=dtype, device=t.device)
    strides, step = [0] * like.ndim, 1
    for d in sorted(range(like.ndim), key=lambda d: (like.stride(d), -d)):  # innermost axis first
        strides[d], step = step, step * like.shape[d]
    return flat[:like.numel()].as_strided(like.shape, strides)


def _sum(t: Tensor, axis: int, scale: Tensor | None = None) -> Tensor:
    """float32 sum over ``axis`` (kept, size 1) of ``t``, times ``scale`` (broadcast against ``t``) when
    given, computed slice by slice: no float32 copy of ``t`` is ever whole."""
    axis, total, parts, along = axis % t.ndim, None, [], 0
    slices = list(_slices(t))
    if not slices:  # an empty tensor
        return torch.zeros([1 if a == axis else n for a, n in enumerate(t.shape)], dtype=_f(t).dtype, device=t.device)
    work = _work(t, slices) if scale is not None or t.dtype not in (torch.float32, torch.float64) else None
    for along, start, size in slices:
        x = t.narrow(along, start, size)
        if work is not None:
            buf = work.narrow(along, 0, size)
            x = buf.copy_(x)  # (a mixed-dtype torch.mul(out=) may make a temporary of its own)
            if scale is not None:
                x.mul_(_part(scale, along, start, size))
        s = x.sum(axis, keepdim=True)  # x is float32 (or 64) here; sum(dtype=) would copy it first
        if along == axis:
            total = s if total is None else total + s
        else:
            parts.append(s)
    return total if total is not None else torch.cat(parts, dim=along)


def _affine(t: Tensor, scale: Tensor | None, shift: Tensor | None, overwrite: bool) -> Tensor:
    """``t * scale - shift`` (each broadcast against ``t``, in at least float32), into a fresh tensor of
    ``t``'s dtype and layout or, with ``overwrite``, back into ``t``; by slices, so the float32
    temporaries are bounded by a slice (a float32 ``t`` needs none)."""
    out = t if overwrite else torch.empty_like(t)
    slices = list(_slices(t))
    same = t.dtype in (torch.float32, torch.float64)  # then the arithmetic runs in the destination
    work = None if same or not slices else _work(t, slices)
    for axis, start, size in slices:
        src, dst = t.narrow(axis, start, size), out.narrow(axis, start, size)
        if same and not overwrite:
            dst.copy_(src)
        x = dst if same else work.narrow(axis, 0, size).copy_(src)
        if scale is not None:
            x.mul_(_part(scale, axis, start, size))
        if shift is not None:
            x.sub_(_part(shift, axis, start, size))
        if x is not dst:
            dst.copy_(x)
    return out


def _scale_and_center(out: dict[str, Tensor], key: str, scale: Tensor | None, center_axis: int | None,
                      inplace: bool, may_overwrite: Callable[[Tensor], bool]) -> None:
    """``out[key] = W * scale``, then less its mean over ``center_axis`` (when given). ``W`` is overwritten
    when it may be, else replaced by a fresh tensor (and in place mode hands the old one's pages back
    before the next is made)."""
    old = out[key]
    mean = None if center_axis is None else _sum(old, center_axis, scale) / old.shape[center_axis]
    out[key] = _affine(old, scale, mean, overwrite=may_overwrite(old))
    if inplace and out[key] is not old:
        del old
        release_free_memory()


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


def fold_layer_norm(sd: StateDict, cfg: ModelConfig, inplace: bool = False, owned: Owned = None) -> dict[str, Tensor]:
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
    may_overwrite = _overwriter(out, inplace, owned)
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
                folded = _sum(W, d_axis, _f(b).view(shape)).squeeze(d_axis)
                out[bias_key] = (_f(out[bias_key]) + folded).to(out[bias_key].dtype)
            del W
            scale = None if gain is None else gain.view(shape)
            _scale_and_center(out, key, scale, d_axis if center else None, inplace, may_overwrite)
    return out


def center_writing_weights(sd: StateDict, cfg: ModelConfig, inplace: bool = False,
                           owned: Owned = None) -> dict[str, Tensor]:
    """Subtract from every weight and bias that writes to the residual stream its mean over ``d_model``.

    Invariant: logits unchanged, for LayerNorm models only: every reader of the residual stream is a
    LayerNorm, which removes the mean first.
    """
    _refuse("center_writing_weights", cfg)
    out = sd if inplace else dict(sd)
    may_overwrite = _overwriter(out, inplace, owned)
    keys = ["embed.W_E"] + (["pos_embed.W_pos"] if isinstance(cfg.positions, LearnedPositions) else [])
    for i in range(cfg.n_layers):
        keys += [f"blocks.{i}.attn.W_O", f"blocks.{i}.attn.b_O", f"blocks.{i}.mlp.W_out", f"blocks.{i}.mlp.b_out"]
    for key in keys:
        t = out[key]
        if t.ndim == 1:
            out[key] = (_f(t) - _f(t).mean()).to(t.dtype)
        else:  # the mean is over d_model, the last axis
            del t
            _scale_and_center(out, key, None, -1, inplace, may_overwrite)
    return out


def center_unembed(sd: StateDict, cfg: ModelConfig, inplace: bool = False, owned: Owned = None) -> dict[str, Tensor]:
    """Subtract from ``W_U`` and ``b_U`` their mean over ``d_vocab``.

    Invariant: log-probs unchanged; logits shift by a per-position constant.
    """
    _refuse("center_unembed", cfg)
    out = sd if inplace else dict(sd)
    b_U = _f(out["unembed.b_U"])
    _scale_and_center(out, "unembed.W_U", None, -1, inplace, _overwriter(out, inplace, owned))  # the mean over d_vocab, the last axis
    out["unembed.b_U"] = (b_U - b_U.mean()).to(out["unembed.b_U"].dtype)
    return out


def fold_value_biases(sd: StateDict, cfg: ModelConfig, inplace: bool = False, owned: Owned = None) -> dict[str, Tensor]:
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


def refactor_factored_attn_matrices(sd: StateDict, cfg: ModelConfig, inplace: bool = False,
                                    owned: Owned = None) -> dict[str, Tensor]:
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
    inplace: bool = False, owned: Owned = None,
) -> tuple[dict[str, Tensor], ModelConfig]:
    """Apply the chosen steps in order and return the new weights with the config that describes them.

    ``inplace`` puts the results into ``sd`` itself; ``owned`` (with ``inplace``) also lets a step
    overwrite the tensors it accepts that share storage with no other entry (see the module docstring).

    A default-on step that cannot preserve this model (``why_not``) is skipped with a logged reason:
    ``center_writing_weights`` on RMSNorm models, ``center_unembed`` with soft-capped logits, ...
    ``refactor_factored_attn_matrices`` raises ProcessingError instead, since it is only ever asked
    for explicitly.
    """
    wanted = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights,
              "center_unembed": center_unembed, "fold_value_biases": fold_value_biases,
              "refactor_factored_attn_matrices": refactor_factored_attn_matrices}
    out: dict[str, Tensor] = sd if inplace else dict(sd)  # type: ignore[assignment]
    with _lend_work_buffer():
        return _run_steps(out, cfg, wanted, inplace, owned)


def _run_steps(out: dict[str, Tensor], cfg: ModelConfig, wanted: dict[str, bool], inplace: bool,
               owned: Owned) -> tuple[dict[str, Tensor], ModelConfig]:
    done = cfg.processing
    for step, on in wanted.items():
        if not on or getattr(done, step):
            continue
        reason = why_not(step, cfg)
        if reason is not None and step != "refactor_factored_attn_matrices":
            logger.info("skipping %s for %s: %s", step, cfg.hf_architecture, reason)
            continue
        out = STEPS[step](out, cfg, inplace=True, owned=owned if inplace else None)  # out is this call's own dict
        if step == "refactor_factored_attn_matrices":
            done = Processing(**{**vars(done), "fold_value_biases": True})
        done = Processing(**{**vars(done), step: True})
        if step == "fold_ln":
            cfg = cfg.replace(norm=dataclasses.replace(cfg.norm, weight=False, bias=False, weight_offset=0.0))
    return out, cfg.replace(processing=done)
