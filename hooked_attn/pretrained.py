"""``from_pretrained`` for HookedTransformer: the loading pipeline (hooked_attn.loading) behind
TransformerLens' signature, a device map (hooked_attn.scale) or the wrap fallback (hooked_attn.wrap)."""

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from hooked_attn.architectures.base import UnknownArchitectureError
from hooked_attn.config import Processing
from hooked_attn.loading import DeviceArg, DtypeArg, load_weights, materialise, open_source, resolve_dtype
from hooked_attn.processing import DEFAULT_PROCESSING, NO_PROCESSING, processing_options
from hooked_attn.sources import Source, TokenizerArg
from hooked_attn.wrap.fallback import FALLBACK_HINT, WrappedHFModel, wrap_hf

Model = TypeVar("Model", bound="PretrainedMixin")
# "auto", "balanced", "sequential" or {module name: device} (see hooked_attn.scale).
DeviceMapArg = str | Mapping[str, Any] | None


class PretrainedMixin:
    """``from_pretrained`` and ``from_pretrained_no_processing`` for a model class built as
    ``cls(cfg, tokenizer=...)`` (HookedTransformer)."""

    @classmethod
    def from_pretrained(
        cls: type[Model], model_name_or_path: Source, *, tokenizer: TokenizerArg = None, dtype: DtypeArg = None,
        device: DeviceArg = None, processing: Processing = DEFAULT_PROCESSING, fold_ln: bool | None = None,
        center_writing_weights: bool | None = None, center_unembed: bool | None = None,
        fold_value_biases: bool | None = None, refactor_factored_attn_matrices: bool | None = None,
        gguf_file: str | None = None, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
        release_source: bool = False, device_map: DeviceMapArg = None, max_memory: Mapping[Any, int | str] | None = None,
        offload_folder: str | os.PathLike | None = None, fallback: str | None = None,
    ) -> Model | WrappedHFModel:
        """Build a HookedTransformer from an HF model and process its weights.

        Args:
            model_name_or_path: a local HF folder (config.json + safetensors), a ``.gguf`` file, a hub id,
                or an in-memory ``PreTrainedModel``.
            tokenizer: a tokenizer, or where to load one; by default the source's own, when it has one.
            dtype: of the built model's parameters: a floating-point ``torch.dtype`` or its name
                (``"bfloat16"``); float32 by default (an in-memory model in another dtype is then
                upcast with a warning).
            device: where the parameters live (CPU by default); checked before anything is loaded.
            processing: the weight-processing steps (a ``Processing`` record; see
                ``hooked_attn.processing``). By default TransformerLens' four.
            fold_ln, center_writing_weights, center_unembed, fold_value_biases,
                refactor_factored_attn_matrices: TransformerLens' flags; each one given overrides its
                field of ``processing``.
            gguf_file: the GGUF file inside the folder or hub repo ``model_name_or_path``.
            revision, cache_dir: passed to the hub download.
            release_source: for an in-memory ``PreTrainedModel`` only: take its weights rather than copy
                them, and leave it empty (every parameter and buffer on the ``meta`` device), so the load
                needs no second copy of the model. By default its weights are copied and it stays usable.
                It is emptied only once every check has passed (the arguments, its config, the
                conversion, the processing steps asked for, finite weights): an error before then leaves
                it whole. A weight that something else also holds (another model, a view) is copied,
                never rewritten.
            device_map, max_memory, offload_folder: spread the blocks over devices ("auto", "balanced",
                "sequential" or a {module: device} dict; units sent to "disk" are written to
                ``offload_folder``); see ``hooked_attn.scale`` and docs/scale.md. Not with ``device``.
            fallback: ``"wrap"``: for an architecture with no converter, return the HF model itself wrapped
                (``hooked_attn.wrap.wrap_hf``: hooks at every module output and attention call) instead of
                raising UnknownArchitectureError.

        Raises:
            UnknownArchitectureError, UnsupportedConfigError, StateDictError, ProcessingError,
            NonFiniteWeightError, ValueError, TypeError: with the name of what is wrong. No model is
                returned half-built.
        """
        steps = processing_options(processing, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                   center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                   refactor_factored_attn_matrices=refactor_factored_attn_matrices)
        if device_map is not None and device is not None:
            raise ValueError("pass device= or device_map=, not both")
        if device_map is None and (max_memory is not None or offload_folder is not None):
            raise ValueError("max_memory and offload_folder need a device_map (e.g. device_map='auto')")
        if fallback not in (None, "wrap"):
            raise ValueError(f"fallback must be None or 'wrap', got {fallback!r}")
        try:
            opened = open_source(model_name_or_path, tokenizer=tokenizer, dtype=dtype, device=device, gguf_file=gguf_file,
                                 revision=revision, cache_dir=cache_dir, release_source=release_source)
        except UnknownArchitectureError as err:  # hooked_attn/wrap/fallback.py
            if fallback == "wrap":
                return wrap_hf(model_name_or_path, dtype=resolve_dtype(dtype), device=device)
            raise UnknownArchitectureError(f"{err}. {FALLBACK_HINT}") from None
        plan = None
        if device_map is not None:  # planned (and refused) on a meta model before any weight is read
            from hooked_attn.scale.dispatch import plan_for_model

            with torch.device("meta"):
                meta = cls(opened.cfg).to(opened.dtype)  # type: ignore[call-arg]
            plan = plan_for_model(meta, device_map, max_memory, opened.dtype, offload_folder)
        if plan is not None:  # each block read, converted and processed on its own device (or written to disk)
            from hooked_attn.scale.streaming import load_placed

            return load_placed(lambda cfg, tok: cls(cfg, tokenizer=tok), opened, steps, plan, offload_folder)
        return materialise(lambda w: cls(w.cfg, tokenizer=w.tokenizer), load_weights(opened, steps))

    @classmethod
    def from_pretrained_no_processing(
        cls: type[Model], model_name_or_path: Source, *, tokenizer: TokenizerArg = None, dtype: DtypeArg = None,
        device: DeviceArg = None, fold_ln: bool | None = None, center_writing_weights: bool | None = None,
        center_unembed: bool | None = None, fold_value_biases: bool | None = None,
        refactor_factored_attn_matrices: bool | None = None, gguf_file: str | None = None,
        revision: str | None = None, cache_dir: str | os.PathLike | None = None, release_source: bool = False,
        device_map: DeviceMapArg = None, max_memory: Mapping[Any, int | str] | None = None,
        offload_folder: str | os.PathLike | None = None, fallback: str | None = None,
    ) -> Model | WrappedHFModel:
        """``from_pretrained`` with every weight-processing step off unless a flag turns it on: the
        weights exactly as HF has them."""
        return cls.from_pretrained(
            model_name_or_path, tokenizer=tokenizer, dtype=dtype, device=device, processing=NO_PROCESSING,
            fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
            fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            gguf_file=gguf_file, revision=revision, cache_dir=cache_dir, release_source=release_source,
            device_map=device_map, max_memory=max_memory, offload_folder=offload_folder, fallback=fallback)
