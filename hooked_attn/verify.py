"""Checks a converted model against its HF original, and lists its hook points with their shapes.

The library half of the ``hooked-attn`` command (``hooked_attn/cli.py`` only formats what these
functions return): ``verify_model`` loads a source three ways (unprocessed, processed, HF eager) and
measures how far apart they are; ``list_hooks`` runs one short forward and records every hook's shape.
"""

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from hooked_attn.architectures.base import StateDictError, UnknownArchitectureError, UnsupportedConfigError
from hooked_attn.default_model import DefaultModelMissingError, resolve_default_model
from hooked_attn.model import HookedTransformer

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_ATOL = 1e-4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
N_RANDOM_TOKENS = 8  # length of the fixed random input used when a model has no tokenizer
N_HOOK_POS = 5  # length of the input list_hooks runs; distinct from the tiny test models' widths


class VerifyError(ValueError):
    """A problem with what the user asked to verify (a missing path, an empty prompt)."""


# Exceptions that mean "the input is wrong", not "hooked_attn is broken": the CLI reports these as
# one-line errors. OSError covers missing folders and hub failures (FileNotFoundError) and HF's own
# refusals to read a folder.
USER_ERRORS: tuple[type[Exception], ...] = (
    OSError, VerifyError, UnknownArchitectureError, UnsupportedConfigError, StateDictError,
    DefaultModelMissingError,
)

# The axes of each hook site, in the glossary names of hooked_attn/shapes.py (see docs/conventions.md).
HOOK_AXES = {
    **dict.fromkeys(["hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                     "hook_attn_out", "hook_mlp_out", "hook_normalized"], "batch pos d_model"),
    "hook_scale": "batch pos 1",
    **dict.fromkeys(["hook_q", "hook_rot_q", "hook_z"], "batch pos head d_head"),
    **dict.fromkeys(["hook_k", "hook_v", "hook_rot_k"], "batch pos kv_head d_head"),
    **dict.fromkeys(["hook_attn_scores", "hook_pattern"], "batch head q_pos k_pos"),
    "hook_result": "batch pos head d_model",
    **dict.fromkeys(["mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"], "batch pos d_mlp"),
}


@dataclass(frozen=True, kw_only=True)
class NextToken:
    """The greedy (argmax) prediction after the last input position."""

    id: int
    text: str | None  # None when the model has no tokenizer


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """One model's prediction and timings. The diffs are against HF (None for HF itself)."""

    next_token: NextToken
    load_s: float
    forward_s: float  # best of three forwards, after the one whose outputs are compared
    max_logit_diff: float | None = None
    max_log_prob_diff: float | None = None


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """How far ``hooked_attn``'s two loads of a model are from the HF eager reference.

    The processed model's logits may differ from HF's by a per-position constant (``center_unembed``),
    so only its log-probs are held to the tolerance; the unprocessed model's logits must match outright.
    """

    source: str
    hf_architecture: str
    dtype: str
    n_layers: int
    prompt: str | None  # None: the model has no tokenizer, so fixed random token ids were used
    token_ids: list[int]
    n_hook_points: int
    hf: RunResult
    unprocessed: RunResult
    processed: RunResult
    resid_diffs: list[float]  # per layer: max |blocks.L.hook_resid_pre (unprocessed) - HF hidden_states[L]|
    resid_scales: list[float]  # per layer: max |HF hidden_states[L]|, the scale resid_diffs are measured on

    def failures(self, atol: float = DEFAULT_ATOL) -> list[str]:
        """One sentence per checked difference that exceeds ``atol``; empty when the model passes."""
        checks = [("unprocessed max |logit diff|", self.unprocessed.max_logit_diff),
                  ("processed max |log-prob diff|", self.processed.max_log_prob_diff)]
        # `not diff <= atol` also catches NaN.
        return [f"{what} {diff:.2e} exceeds atol {atol:.0e}" for what, diff in checks if not diff <= atol]

    def to_dict(self, atol: float = DEFAULT_ATOL) -> dict[str, Any]:
        """The report as plain JSON-ready data, with the verdict at ``atol``."""
        failures = self.failures(atol)
        return {**asdict(self), "atol": atol, "passed": not failures, "failures": failures}


@dataclass(frozen=True, kw_only=True)
class HookShape:
    """One hook point and the shape of the activation it saw."""

    name: str
    shape: tuple[int, ...] | None  # None: the hook did not fire on this forward
    axes: str | None  # glossary names, None for a site HOOK_AXES does not know


@dataclass(frozen=True, kw_only=True)
class HookTable:
    """Every hook point of a model (or those whose name contains a substring) with its shape."""

    source: str
    hf_architecture: str
    n_hook_points: int  # in the whole model, before any filter
    sizes: dict[str, int]  # each axis name's size on the forward that was run
    hooks: list[HookShape]


def resolve_source(source: str | os.PathLike | None) -> str:
    """The model to load: the embedded default for None, else ``source`` once it is known to be usable.

    Anything that looks like a local path (it exists, starts with ``/``, ``.`` or ``~``, has more than
    one ``/`` or ends in ``.gguf``) must exist; anything else is left for the loader to treat as a hub id.

    Raises:
        VerifyError: a local path does not exist.
        DefaultModelMissingError: the packages that ship the default model are missing.
    """
    if source is None:
        return str(resolve_default_model())
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or text.endswith(".gguf"):
        raise VerifyError(f"no such folder or file: {text!r}")
    return text


def load_hf_reference(source: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The HF model for ``source`` with eager attention: the reference ``verify_model`` compares with."""
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "dtype": dtype}
    if source.endswith(".gguf"):
        path = Path(source)
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs).eval()
    return AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()


def verify_model(
    source: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
    prompt: str = DEFAULT_PROMPT,
) -> VerifyReport:
    """Compare ``from_pretrained_no_processing`` and ``from_pretrained`` with the HF eager model.

    Args:
        source: a local HF folder, a ``.gguf`` file or a hub id; None for the embedded default model.
        dtype: of all three models: a torch dtype, or a key of ``DTYPES`` (``"bfloat16"``).
        prompt: the input; a model without a tokenizer gets ``N_RANDOM_TOKENS`` fixed random ids instead.

    Returns:
        The differences, next-token predictions and timings; ``report.failures(atol)`` judges them.

    Raises:
        One of ``USER_ERRORS`` when the source cannot be loaded, the dtype is unknown or the prompt is empty.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise VerifyError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    source = resolve_source(source)
    unprocessed, unprocessed_load_s = _timed(
        lambda: HookedTransformer.from_pretrained_no_processing(source, dtype=dtype))
    processed, processed_load_s = _timed(lambda: HookedTransformer.from_pretrained(source, dtype=dtype))
    hf_model, hf_load_s = _timed(lambda: load_hf_reference(source, dtype))
    tokens, used_prompt = _input_tokens(unprocessed, prompt)
    logger.info("verifying %s on %d tokens", source, tokens.shape[1])

    n_layers = unprocessed.cfg.n_layers
    resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    with torch.no_grad():
        hf_out = hf_model(tokens, output_hidden_states=True)
        unprocessed_logits, cache = unprocessed.run_with_cache(tokens, names_filter=resid_names)
        processed_logits = processed(tokens)
        hf_forward_s = _best_forward_s(lambda: hf_model(tokens))
        unprocessed_forward_s = _best_forward_s(lambda: unprocessed(tokens))
        processed_forward_s = _best_forward_s(lambda: processed(tokens))

    hf_logits, hf_resid = hf_out.logits, hf_out.hidden_states  # hidden_states[L] enters block L
    hf_log_probs = hf_logits.float().log_softmax(-1)

    def run(model: HookedTransformer, logits: Tensor, load_s: float, forward_s: float) -> RunResult:
        return RunResult(
            next_token=_next_token(model, logits), load_s=load_s, forward_s=forward_s,
            max_logit_diff=_max_abs_diff(logits, hf_logits),
            max_log_prob_diff=_max_abs_diff(logits.float().log_softmax(-1), hf_log_probs),
        )

    return VerifyReport(
        source=source, hf_architecture=unprocessed.cfg.hf_architecture,
        dtype=str(dtype).removeprefix("torch."), n_layers=n_layers, prompt=used_prompt,
        token_ids=tokens[0].tolist(), n_hook_points=len(unprocessed.hook_dict),
        hf=RunResult(next_token=_next_token(unprocessed, hf_logits), load_s=hf_load_s,
                     forward_s=hf_forward_s),
        unprocessed=run(unprocessed, unprocessed_logits, unprocessed_load_s, unprocessed_forward_s),
        processed=run(processed, processed_logits, processed_load_s, processed_forward_s),
        resid_diffs=[_max_abs_diff(cache[name], hf_resid[layer])
                     for layer, name in enumerate(resid_names)],
        resid_scales=[float(hf_resid[layer].float().abs().max()) for layer in range(n_layers)],
    )


def list_hooks(source: str | os.PathLike | None = None, contains: str | None = None) -> HookTable:
    """Run one forward on ``N_HOOK_POS`` fixed tokens, caching every hook (``hook_result`` included).

    Args:
        source: as for ``verify_model``.
        contains: keep only hooks whose name contains this substring.

    Raises:
        One of ``USER_ERRORS`` when the source cannot be loaded.
    """
    source = resolve_source(source)
    model = HookedTransformer.from_pretrained(source)
    model.set_use_attn_result(True)
    tokens = _fixed_random_tokens(model.cfg.d_vocab, N_HOOK_POS)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    c = model.cfg
    sizes = {"batch": 1, "pos": N_HOOK_POS, "q_pos": N_HOOK_POS, "k_pos": N_HOOK_POS, "head": c.n_heads,
             "kv_head": c.n_kv_heads, "d_model": c.d_model, "d_head": c.d_head, "d_mlp": c.d_mlp,
             "d_vocab": c.d_vocab}
    hooks = [
        HookShape(name=name, shape=tuple(cache[name].shape) if name in cache else None, axes=hook_axes(name))
        for name in model.hook_dict if contains is None or contains in name
    ]
    return HookTable(source=source, hf_architecture=c.hf_architecture, n_hook_points=len(model.hook_dict),
                     sizes=sizes, hooks=hooks)


def hook_axes(name: str) -> str | None:
    """The glossary axes of hook ``name`` (``"batch head q_pos k_pos"`` for a pattern), None if unknown."""
    parts = name.split(".")
    return HOOK_AXES.get(".".join(parts[-2:])) or HOOK_AXES.get(parts[-1])


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _best_forward_s(fn: Callable[[], Any], repeats: int = 3) -> float:
    return min(_timed(fn)[1] for _ in range(repeats))


def _fixed_random_tokens(d_vocab: int, n_pos: int) -> Tensor:
    return torch.randint(0, d_vocab, (1, n_pos), generator=torch.Generator().manual_seed(0))


def _input_tokens(model: HookedTransformer, prompt: str) -> tuple[Tensor, str | None]:
    """(token ids [1 pos], the prompt they encode, or None when they are fixed random ids)."""
    if model.tokenizer is None:
        logger.warning("the model has no tokenizer: using %d fixed random token ids instead of the prompt",
                       N_RANDOM_TOKENS)
        return _fixed_random_tokens(model.cfg.d_vocab, N_RANDOM_TOKENS), None
    if not prompt:
        raise VerifyError("the prompt is empty: give some text with --prompt")
    return model.to_tokens(prompt), prompt


def _next_token(model: HookedTransformer, logits: Tensor) -> NextToken:
    token_id = int(logits[0, -1].argmax())
    return NextToken(id=token_id, text=model.to_string([token_id]) if model.tokenizer is not None else None)


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"comparing tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max())


__all__ = ["DEFAULT_ATOL", "DEFAULT_PROMPT", "DTYPES", "HookShape", "HookTable", "NextToken", "RunResult",
           "USER_ERRORS", "VerifyError", "VerifyReport", "hook_axes", "list_hooks", "load_hf_reference",
           "resolve_source", "verify_model"]
