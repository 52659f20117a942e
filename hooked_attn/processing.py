"""Weight processing: pure ``StateDict -> StateDict`` transforms that leave the model's output unchanged.

Each step takes our per-head state dict (``blocks.{i}.attn.W_Q`` ...) and the config, states the
invariant its test checks, and returns a new dict; the input is never modified. The steps are math over
whole tensors; ``hooked_attn.weight_writer`` carries it out in bounded slices. ``process_weights`` runs
the steps a ``Processing`` record asks for (TransformerLens' keyword flags are sugar over it) and returns
the config that describes the new weights. Arithmetic runs in at least float32 and results keep each
tensor's dtype.
"""

import dataclasses
import logging

import einops
import torch
from torch import Tensor

from hooked_attn.config import LearnedPositions, ModelConfig, Processing, ShortformerPositions
from hooked_attn.shapes import StateDict
from hooked_attn.weight_writer import Owned, WeightWriter, at_least_float32, bounded_sum, lend_work_buffer

logger = logging.getLogger(__name__)

_f = at_least_float32

DEFAULT_PROCESSING = Processing(fold_ln=True, center_writing_weights=True, center_unembed=True,
                                fold_value_biases=True)
"""What ``from_pretrained`` and ``process_weights`` do unless told otherwise (TransformerLens' defaults)."""
NO_PROCESSING = Processing()
"""The weights exactly as HF has them (``from_pretrained_no_processing``)."""
STEP_NAMES = tuple(field.name for field in dataclasses.fields(Processing))


class ProcessingError(ValueError):
    """A processing step was asked for that cannot preserve this model."""


def processing_options(base: Processing = DEFAULT_PROCESSING, **flags: bool | None) -> Processing:
    """``base`` with each flag given (not None) set: TransformerLens' ``fold_ln=...`` keywords as a record.

    Raises:
        TypeError: a flag that names no step, or one that is not a bool.
    """
    unknown = sorted(set(flags) - set(STEP_NAMES))
    if unknown:
        raise TypeError(f"unknown processing flag(s) {unknown}; the steps are {list(STEP_NAMES)}")
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"processing flag {name} must be True, False or None, got {value!r}")
    return dataclasses.replace(base, **{name: value for name, value in flags.items() if value is not None})


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
        if isinstance(cfg.positions, ShortformerPositions):
            return "shortformer positions are added after ln1 to what W_Q and W_K read, so ln1's gain cannot move"
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


def _writer(sd: StateDict, writer: WeightWriter | None) -> WeightWriter:
    """The given writer, or one over a copy of ``sd`` that overwrites nothing: the pure form of a step."""
    return writer if writer is not None else WeightWriter(dict(sd))


def fold_layer_norm(sd: StateDict, cfg: ModelConfig, *, writer: WeightWriter | None = None) -> dict[str, Tensor]:
    """Fold each norm's gain (and bias) into the weights that read its output; for LayerNorm,
    then centre those reading weights over ``d_model``.

    Invariant: logits unchanged. The norms keep normalising (the config's norm gets
    ``weight=False, bias=False``); ``w`` scales the rows of each reader, ``b`` becomes reader bias
    (``b_Q``/``b_K``/``b_V``, ``b_in`` and, in gated MLPs, ``b_gate``; ``b_U``), and a LayerNorm
    output has zero mean, so a reader's component along the all-ones direction is never used and
    centring removes it. Each reader's output ``x W + b`` is unchanged.
    """
    _refuse("fold_ln", cfg)
    w = _writer(sd, writer)
    for norm, readers in _norm_readers(cfg, w.sd):
        gain, bias = w.pop(f"{norm}.w"), w.pop(f"{norm}.b")
        gain = None if gain is None else _f(gain) + cfg.norm.weight_offset
        for key in readers:
            d_axis = w[key].ndim - 2  # d_model is the second-to-last axis of every reading weight
            along_d_model = [-1 if axis == d_axis else 1 for axis in range(w[key].ndim)]
            if bias is not None:
                bias_key = _bias_key(key, w.sd)
                if bias_key is None:
                    raise ProcessingError(f"cannot fold {norm}.b into {key}: it has no bias to take it")
                folded = bounded_sum(w[key], d_axis, _f(bias).view(along_d_model)).squeeze(d_axis)
                w.set(bias_key, _f(w[bias_key]) + folded)
            scale = None if gain is None else gain.view(along_d_model)
            w.scale_and_center(key, scale, center_axis=d_axis if cfg.norm.kind == "layernorm" else None)
    return w.sd


def _writing_keys(cfg: ModelConfig) -> list[str]:
    """Every weight and bias that writes to the residual stream."""
    keys = ["embed.W_E"] + (["pos_embed.W_pos"] if isinstance(cfg.positions, LearnedPositions) else [])
    for i in range(cfg.n_layers):
        keys += [f"blocks.{i}.attn.W_O", f"blocks.{i}.attn.b_O", f"blocks.{i}.mlp.W_out", f"blocks.{i}.mlp.b_out"]
    return keys


def center_writing_weights(sd: StateDict, cfg: ModelConfig, *,
                           writer: WeightWriter | None = None) -> dict[str, Tensor]:
    """Subtract from every weight and bias that writes to the residual stream its mean over ``d_model``.

    Invariant: logits unchanged, for LayerNorm models only: every reader of the residual stream is a
    LayerNorm, which removes the mean first.
    """
    _refuse("center_writing_weights", cfg)
    w = _writer(sd, writer)
    for key in _writing_keys(cfg):
        if w[key].ndim == 1:
            w.set(key, _f(w[key]) - _f(w[key]).mean())
        else:  # the mean is over d_model, the last axis
            w.scale_and_center(key, center_axis=-1)
    return w.sd


def center_unembed(sd: StateDict, cfg: ModelConfig, *, writer: WeightWriter | None = None) -> dict[str, Tensor]:
    """Subtract from ``W_U`` and ``b_U`` their mean over ``d_vocab``.

    Invariant: log-probs unchanged; logits shift by a per-position constant.
    """
    _refuse("center_unembed", cfg)
    w = _writer(sd, writer)
    w.scale_and_center("unembed.W_U", center_axis=-1)  # d_vocab is the last axis
    w.set("unembed.b_U", _f(w["unembed.b_U"]) - _f(w["unembed.b_U"]).mean())
    return w.sd


def fold_value_biases(sd: StateDict, cfg: ModelConfig, *, writer: WeightWriter | None = None) -> dict[str, Tensor]:
    """Move each value bias into the output bias: ``b_O += sum_head b_V[head] @ W_O[head]``; ``b_V = 0``.

    Invariant: logits unchanged, because every pattern row sums to 1, so the value bias reaches
    ``z`` unchanged whatever the pattern. Refused when v is clamped (``clip_qkv``).
    """
    _refuse("fold_value_biases", cfg)
    w = _writer(sd, writer)
    for i in range(cfg.n_layers):
        a = f"blocks.{i}.attn"
        b_V = _f(w[f"{a}.b_V"]).repeat_interleave(cfg.group_size, dim=0)
        folded = einops.einsum(b_V, _f(w[f"{a}.W_O"]), "head d_head, head d_head d_model -> d_model")
        w.set(f"{a}.b_O", _f(w[f"{a}.b_O"]) + folded)
        w.set(f"{a}.b_V", torch.zeros_like(w[f"{a}.b_V"]))
    return w.sd


def _balanced(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Factors ``(U sqrt S, sqrt S Vh)`` of ``A @ B`` (batched), via QR so the product is never formed."""
    Qa, Ra = torch.linalg.qr(A)
    Qb, Rb = torch.linalg.qr(B.mT)
    U, S, Vh = torch.linalg.svd(Ra @ Rb.mT)
    root = S.sqrt()
    return (Qa @ U) * root[..., None, :], root[..., :, None] * (Vh @ Qb.mT)


def refactor_factored_attn_matrices(sd: StateDict, cfg: ModelConfig, *,
                                    writer: WeightWriter | None = None) -> dict[str, Tensor]:
    """Rewrite each head's ``W_Q``/``W_K`` (with biases) and ``W_V``/``W_O`` as balanced SVD factors
    of ``W_Q W_K^T`` and ``W_V W_O``; value biases are folded into ``b_O`` first.

    Invariant: logits unchanged; each head's QK and OV products (bias rows included) are preserved.
    Refused for rotary models (rotation sits between Q and K), for shared K/V heads, Q/K norms and
    clamped q, k, v.
    """
    _refuse("refactor_factored_attn_matrices", cfg)
    w = _writer(sd, writer)
    fold_value_biases(w.sd, cfg, writer=w)
    for i in range(cfg.n_layers):
        a = f"blocks.{i}.attn"
        q = torch.cat([w[f"{a}.W_Q"], w[f"{a}.b_Q"][:, None, :]], dim=1).double()
        k = torch.cat([w[f"{a}.W_K"], w[f"{a}.b_K"][:, None, :]], dim=1).double()
        q, k_t = _balanced(q, k.mT)
        k = k_t.mT
        v, o = _balanced(w[f"{a}.W_V"].double(), w[f"{a}.W_O"].double())
        for key, value in {"W_Q": q[:, :-1], "b_Q": q[:, -1], "W_K": k[:, :-1], "b_K": k[:, -1],
                           "W_V": v, "W_O": o}.items():
            w.set(f"{a}.{key}", value)
    return w.sd


STEPS = {
    "fold_ln": fold_layer_norm,
    "center_writing_weights": center_writing_weights,
    "center_unembed": center_unembed,
    "fold_value_biases": fold_value_biases,
    "refactor_factored_attn_matrices": refactor_factored_attn_matrices,
}


def plan_processing(
    sd: StateDict, cfg: ModelConfig, wanted: Processing,
) -> tuple[list[str], ModelConfig, dict[str, str]]:
    """The steps ``process_weights`` will run, in order, the config that will describe the result, and
    the skipped steps with the reason for each; nothing is computed. Steps already recorded in
    ``cfg.processing`` are not run again.

    A default-on step that cannot preserve this model (``why_not``) is skipped with a logged reason:
    ``center_writing_weights`` on RMSNorm models, ``center_unembed`` with soft-capped logits or with no
    unembedding (an encoder without its head), ... ``refactor_factored_attn_matrices`` raises
    ProcessingError instead, since it is only ever asked for explicitly.
    """
    run, done, skipped = [], cfg.processing, {}
    for step in STEP_NAMES:
        if not getattr(wanted, step) or getattr(done, step):
            continue
        reason = why_not(step, cfg)
        if step == "refactor_factored_attn_matrices":
            _refuse(step, cfg)
        elif step == "center_unembed" and "unembed.W_U" not in sd:
            reason = "this model has no unembedding"
        if reason is not None:
            skipped[step] = reason
            continue
        run.append(step)
        if step == "refactor_factored_attn_matrices":  # folds the value biases first
            done = dataclasses.replace(done, fold_value_biases=True)
        done = dataclasses.replace(done, **{step: True})
        if step == "fold_ln":
            cfg = cfg.replace(norm=dataclasses.replace(cfg.norm, weight=False, bias=False, weight_offset=0.0))
    return run, cfg.replace(processing=done), skipped


def process_weights(
    sd: StateDict, cfg: ModelConfig, steps: Processing = DEFAULT_PROCESSING, *, fold_ln: bool | None = None,
    center_writing_weights: bool | None = None, center_unembed: bool | None = None,
    fold_value_biases: bool | None = None, refactor_factored_attn_matrices: bool | None = None,
    inplace: bool = False, owned: Owned = None,
) -> tuple[dict[str, Tensor], ModelConfig]:
    """Apply the steps ``steps`` asks for (each keyword flag, when given, overrides its field) and return
    the new weights with the config that describes them. See ``plan_processing`` for skips and refusals,
    which are all decided before any weight is touched.

    ``inplace`` puts the results into ``sd`` itself (each replaced tensor freed at once); ``owned`` (with
    ``inplace``) also lets a step overwrite the tensors it accepts that share storage with no other entry
    (see ``hooked_attn.weight_writer``).
    """
    wanted = processing_options(steps, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                refactor_factored_attn_matrices=refactor_factored_attn_matrices)
    run, new_cfg, skipped = plan_processing(sd, cfg, wanted)
    for step, reason in skipped.items():
        logger.info("skipping %s for %s: %s", step, cfg.hf_architecture, reason)
    out: dict[str, Tensor] = sd if inplace else dict(sd)  # type: ignore[assignment]
    with lend_work_buffer():
        for step in run:  # a fresh writer per step: each counts the sharing of storages as it starts
            STEPS[step](out, cfg, writer=WeightWriter(out, owned if inplace else None, release=inplace))
            if step == "fold_ln":  # later steps see the norms as folded
                cfg = cfg.replace(norm=dataclasses.replace(cfg.norm, weight=False, bias=False, weight_offset=0.0))
    return out, new_cfg
