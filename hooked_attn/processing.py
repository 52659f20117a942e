"""Weight processing: pure ``StateDict -> StateDict`` transforms that leave the model's output unchanged.

Each function takes our per-head state dict (``blocks.{i}.attn.W_Q`` ...) and returns a new dict;
the input is never modified. Each docstring states the invariant its test checks. Arithmetic runs
in at least float32 and results are cast back to each tensor's dtype.
"""

import dataclasses
import logging
from collections.abc import Callable

import einops
import torch
from torch import Tensor

from hooked_attn.config import LearnedPositions, ModelConfig, Processing, Rotary
from hooked_attn.shapes import StateDict

logger = logging.getLogger(__name__)


class ProcessingError(ValueError):
    """A processing step was asked for that cannot preserve this model."""


def _f(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _norm_readers(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """(norm prefix, the weights that read its output) for every norm in the model."""
    gate = ["mlp.W_gate"] if cfg.gated_mlp else []
    out = []
    for i in range(cfg.n_layers):
        out.append((f"blocks.{i}.ln1", [f"blocks.{i}.attn.W_{s}" for s in "QKV"]))
        out.append((f"blocks.{i}.ln2", [f"blocks.{i}.mlp.W_in"] + [f"blocks.{i}.{g}" for g in gate]))
    out.append(("ln_final", ["unembed.W_U"]))
    return out


def _bias_key(weight_key: str) -> str | None:
    head, _, name = weight_key.rpartition(".")
    return {"W_Q": f"{head}.b_Q", "W_K": f"{head}.b_K", "W_V": f"{head}.b_V", "W_in": f"{head}.b_in",
            "W_U": f"{head}.b_U", "W_gate": None}[name]


def fold_layer_norm(sd: StateDict, cfg: ModelConfig) -> dict[str, Tensor]:
    """Fold each norm's gain (and bias) into the weights that read its output; for LayerNorm,
    then centre those reading weights over ``d_model``.

    Invariant: logits unchanged. The norms keep normalising (the config's norm gets
    ``weight=False, bias=False``); ``w`` scales the rows of each reader, ``b`` becomes reader bias,
    and a LayerNorm output has zero mean, so a reader's component along the all-ones direction is
    never used and centring removes it.
    """
    out = dict(sd)
    center = cfg.norm.kind == "layernorm"
    for norm, readers in _norm_readers(cfg):
        w, b = out.pop(f"{norm}.w", None), out.pop(f"{norm}.b", None)
        for key in readers:
            W = _f(out[key])
            d_axis = W.ndim - 2  # d_model is the second-to-last axis of every reading weight
            shape = [1] * W.ndim
            shape[d_axis] = -1
            bias_key = _bias_key(key)
            if b is not None:
                if bias_key is None:
                    raise ProcessingError(f"cannot fold {norm}.b into {key}: the gated MLP has no gate bias")
                out[bias_key] = (_f(out[bias_key]) + (W * _f(b).view(shape)).sum(d_axis)).to(out[bias_key].dtype)
            if w is not None:
                W = W * _f(w).view(shape)
            if center:
                W = W - W.mean(d_axis, keepdim=True)
            out[key] = W.to(sd[key].dtype)
    return out


def center_writing_weights(sd: StateDict, cfg: ModelConfig) -> dict[str, Tensor]:
    """Subtract from every weight and bias that writes to the residual stream its mean over ``d_model``.

    Invariant: logits unchanged, for LayerNorm models only: every reader of the residual stream is a
    LayerNorm, which removes the mean first.
    """
    if cfg.norm.kind != "layernorm":
        raise ProcessingError("center_writing_weights needs LayerNorm readers; this model uses RMSNorm")
    out = dict(sd)
    keys = ["embed.W_E"] + (["pos_embed.W_pos"] if isinstance(cfg.positions, LearnedPositions) else [])
    for i in range(cfg.n_layers):
        keys += [f"blocks.{i}.attn.W_O", f"blocks.{i}.attn.b_O", f"blocks.{i}.mlp.W_out", f"blocks.{i}.mlp.b_out"]
    for key in keys:
        t = _f(out[key])
        out[key] = (t - t.mean(-1, keepdim=True)).to(sd[key].dtype)
    return out


def center_unembed(sd: StateDict, cfg: ModelConfig) -> dict[str, Tensor]:
    """Subtract from ``W_U`` and ``b_U`` their mean over ``d_vocab``.

    Invariant: log-probs unchanged; logits shift by a per-position constant.
    """
    out = dict(sd)
    W_U, b_U = _f(sd["unembed.W_U"]), _f(sd["unembed.b_U"])
    out["unembed.W_U"] = (W_U - W_U.mean(-1, keepdim=True)).to(sd["unembed.W_U"].dtype)
    out["unembed.b_U"] = (b_U - b_U.mean()).to(sd["unembed.b_U"].dtype)
    return out


def fold_value_biases(sd: StateDict, cfg: ModelConfig) -> dict[str, Tensor]:
    """Move each value bias into the output bias: ``b_O += sum_head b_V[head] @ W_O[head]``; ``b_V = 0``.

    Invariant: logits unchanged, because every pattern row sums to 1, so the value bias reaches
    ``z`` unchanged whatever the pattern.
    """
    out = dict(sd)
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


def refactor_factored_attn_matrices(sd: StateDict, cfg: ModelConfig) -> dict[str, Tensor]:
    """Rewrite each head's ``W_Q``/``W_K`` (with biases) and ``W_V``/``W_O`` as balanced SVD factors
    of ``W_Q W_K^T`` and ``W_V W_O``; value biases are folded into ``b_O`` first.

    Invariant: logits unchanged; each head's QK and OV products (bias rows included) are preserved.
    Refused for rotary models (rotation sits between Q and K) and for shared K/V heads.
    """
    if isinstance(cfg.positions, Rotary):
        raise ProcessingError("refactor_factored_attn_matrices cannot preserve a rotary model: the rotation "
                              "acts between W_Q and W_K, so their product is not the QK circuit")
    if cfg.n_kv_heads != cfg.n_heads:
        raise ProcessingError("refactor_factored_attn_matrices needs one K/V head per query head "
                              f"(this model has {cfg.n_heads} query and {cfg.n_kv_heads} K/V heads)")
    out = fold_value_biases(sd, cfg)
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


STEPS: dict[str, Callable[[StateDict, ModelConfig], dict[str, Tensor]]] = {
    "fold_ln": fold_layer_norm,
    "center_writing_weights": center_writing_weights,
    "center_unembed": center_unembed,
    "fold_value_biases": fold_value_biases,
    "refactor_factored_attn_matrices": refactor_factored_attn_matrices,
}


def process_weights(
    sd: StateDict, cfg: ModelConfig, *, fold_ln: bool = True, center_writing_weights: bool = True,
    center_unembed: bool = True, fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
) -> tuple[dict[str, Tensor], ModelConfig]:
    """Apply the chosen steps in order and return the new weights with the config that describes them.

    ``center_writing_weights`` is skipped, with a logged reason, on RMSNorm models (it would not
    preserve them); ``refactor_factored_attn_matrices`` raises ProcessingError where it cannot
    preserve the model, since it is only ever asked for explicitly.
    """
    wanted = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights,
              "center_unembed": center_unembed, "fold_value_biases": fold_value_biases,
              "refactor_factored_attn_matrices": refactor_factored_attn_matrices}
    done = cfg.processing
    out: dict[str, Tensor] = dict(sd)
    for step, on in wanted.items():
        if not on or getattr(done, step):
            continue
        if step == "center_writing_weights" and cfg.norm.kind != "layernorm":
            logger.info("skipping center_writing_weights: %s reads the residual stream through RMSNorm, "
                        "which does not remove the mean", cfg.hf_architecture)
            continue
        out = STEPS[step](out, cfg)
        if step == "refactor_factored_attn_matrices":
            done = Processing(**{**vars(done), "fold_value_biases": True})
        done = Processing(**{**vars(done), step: True})
        if step == "fold_ln":
            cfg = cfg.replace(norm=dataclasses.replace(cfg.norm, weight=False, bias=False))
    return out, cfg.replace(processing=done)
