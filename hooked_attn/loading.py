"""from_pretrained: resolve the source -> HF config -> check -> convert -> process -> load. Nothing else."""

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from hooked_attn.architectures import get_architecture
from hooked_attn.architectures.base import StateDictError, UnknownArchitectureError, check_hf_config
from hooked_attn.checkpoint import LazySafetensors, read_torch_bin, safetensors_files
from hooked_attn.config import ModelConfig
from hooked_attn.memory import release_free_memory
from hooked_attn.model import HookedTransformer
from hooked_attn.processing import process_weights
from hooked_attn.shapes import StateDict
from hooked_attn.wrap.fallback import FALLBACK_HINT, WrappedHFModel, wrap_hf

logger = logging.getLogger(__name__)

# An in-memory model is an HF PreTrainedModel (checked by _is_hf_model). It is typed as nn.Module so that
# loading from a folder never imports transformers' modeling code (and the scipy it pulls in: ~1 s).
Source = str | os.PathLike | nn.Module
TokenizerArg = PreTrainedTokenizerBase | str | os.PathLike | None
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def from_pretrained(
    model_name_or_path: Source, *, tokenizer: TokenizerArg = None, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None, fold_ln: bool = True, center_writing_weights: bool = True,
    center_unembed: bool = True, fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False,
    gguf_file: str | None = None, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
    release_source: bool = False, device_map: Any = None, max_memory: Mapping[Any, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None, fallback: str | None = None,
) -> HookedTransformer | WrappedHFModel:
    """Build a HookedTransformer from an HF model and process its weights.

    Args:
        model_name_or_path: a local HF folder (config.json + safetensors), a ``.gguf`` file, a hub id,
            or an in-memory ``PreTrainedModel``.
        tokenizer: a tokenizer, or where to load one; by default the source's own, when it has one.
        dtype, device: of the built model's parameters.
        fold_ln, center_writing_weights, center_unembed, fold_value_biases,
            refactor_factored_attn_matrices: the weight-processing steps (see ``hooked_attn.processing``).
        gguf_file: the GGUF file inside the folder or hub repo ``model_name_or_path``.
        revision, cache_dir: passed to the hub download.
        release_source: for an in-memory ``PreTrainedModel`` only: take its weights rather than copy
            them, and leave it empty (every parameter and buffer on the ``meta`` device), so the load
            needs no second copy of the model. By default its weights are copied and it stays usable.
            It is emptied only once its weights are converted: an error before then leaves it whole.
        device_map, max_memory, offload_folder: spread the blocks over devices ("auto", "balanced",
            "sequential" or a {module: device} dict; units sent to "disk" are written to
            ``offload_folder``); see ``hooked_attn.scale`` and docs/scale.md. Not with ``device``.
        fallback: ``"wrap"``: for an architecture with no converter, return the HF model itself wrapped
            (``hooked_attn.wrap.wrap_hf``: hooks at every module output and attention call) instead of
            raising UnknownArchitectureError.

    Raises:
        UnknownArchitectureError, UnsupportedConfigError, StateDictError, ProcessingError: with the
            name of what is wrong. No model is returned half-built.
    """
    hf_config, arch_name, hf_sd, default_tokenizer = _resolve(model_name_or_path, gguf_file, revision, cache_dir, dtype)
    if fallback not in (None, "wrap"):
        raise ValueError(f"fallback must be None or 'wrap', got {fallback!r}")
    try:
        arch = get_architecture(arch_name, hf_config)
    except UnknownArchitectureError as err:  # hooked_attn/wrap/fallback.py
        if fallback == "wrap":
            return wrap_hf(model_name_or_path, dtype=dtype, device=device)
        raise UnknownArchitectureError(f"{err}. {FALLBACK_HINT}") from None
    check_hf_config(hf_config, arch)
    cfg = arch.config_from_hf(hf_config)
    plan = None
    if device_map is not None:  # planned (and refused) before any weight is read
        from hooked_attn.scale.dispatch import plan_for_config

        if device is not None:
            raise ValueError("pass device= or device_map=, not both")
        plan = plan_for_config(cfg, device_map, max_memory, dtype, offload_folder)
    elif max_memory is not None or offload_folder is not None:
        raise ValueError("max_memory and offload_folder need a device_map (e.g. device_map='auto')")
    in_memory = _is_hf_model(model_name_or_path)
    if release_source and not in_memory:
        raise ValueError(f"release_source=True takes the weights of an in-memory PreTrainedModel; got "
                         f"{type(model_name_or_path).__name__} {str(model_name_or_path)!r}")
    # Tensors that belong to a caller's in-memory model: they are copied, never adopted or written to.
    foreign = {t.untyped_storage().data_ptr() for t in hf_sd.values()} if in_memory else set()
    sd = arch.convert_state_dict(hf_sd, cfg, hf_config)
    del hf_sd
    if release_source:  # converted without error: the weights are ours now, the caller's model lets go
        model_name_or_path.to_empty(device="meta")  # type: ignore[union-attr]
        foreign = set()
    release_free_memory()
    for key in sd:  # one tensor at a time, so the old one is freed as the new one is made
        sd[key] = sd[key].to(dtype)
    sd, cfg = process_weights(
        sd, cfg, fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
        fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        # sd is ours, and so is every tensor not in a caller's model: those are overwritten as they are
        # processed, the others replaced (and freed) one at a time.
        inplace=True, owned=lambda t: t.untyped_storage().data_ptr() not in foreign,
    )
    target = torch.device(device) if device is not None else torch.device("cpu")
    model = _materialise(cfg, sd, dtype, target, _load_tokenizer(tokenizer, default_tokenizer), foreign)
    if plan is not None:
        from hooked_attn.scale.dispatch import place

        model = place(model, plan, offload_folder)
    where = type(model_name_or_path).__name__ if in_memory else model_name_or_path
    logger.info("loaded %s from %s with processing %s", arch.hf_architecture, where, cfg.processing)
    return model


def _materialise(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
    tokenizer: PreTrainedTokenizerBase | None, foreign: set[int],
) -> HookedTransformer:
    """Build the model on the meta device and adopt ``sd``'s tensors as its parameters.

    A tensor is adopted as it is when it already has the parameter's dtype, device and memory layout and
    is not in ``foreign`` storage (a caller's model); otherwise it is copied into a fresh one. Each tensor
    leaves ``sd`` as it is placed, so nothing is held twice.
    """
    with torch.device("meta"):
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
    if missing or unexpected:
        raise StateDictError(f"converted weights do not fit the model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    for name, meta in params.items():
        tensor = sd.pop(name)
        if tensor.shape != meta.shape:
            raise StateDictError(f"converted weight {name!r} has shape {tuple(tensor.shape)}, the model needs "
                                 f"{tuple(meta.shape)}")
        adopt = (tensor.dtype == dtype and tensor.device == device and _layout_fits(tensor, meta)
                 and tensor.untyped_storage().data_ptr() not in foreign)
        if not adopt:
            fresh = torch.empty_strided(meta.shape, meta.stride(), dtype=dtype, device=device)
            tensor = fresh.copy_(tensor)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_parameter(leaf, nn.Parameter(tensor, requires_grad=meta.requires_grad))
    return model


def _layout_fits(tensor: torch.Tensor, meta: torch.Tensor) -> bool:
    """Whether ``tensor`` can be the parameter ``meta`` as it is laid out: the same strides, or, for a
    matrix, either dense layout (GPT-2's Conv1D ``[in, out]`` or nn.Linear's ``[out, in]``), which the
    forward's ``F.linear`` reads equally well."""
    if tensor.stride() == meta.stride():
        return True
    if tensor.ndim != 2 or tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != tensor.nbytes:
        return False
    return tensor.is_contiguous() or tensor.T.is_contiguous()


def from_pretrained_no_processing(model_name_or_path: Source, **kwargs: Any) -> HookedTransformer:
    """``from_pretrained`` with every weight-processing step off: the weights exactly as HF has them."""
    flags = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
             "refactor_factored_attn_matrices")
    return from_pretrained(model_name_or_path, **{**{f: False for f in flags}, **kwargs})


def _resolve(
    source: Source, gguf_file: str | None, revision: str | None, cache_dir: str | os.PathLike | None,
    dtype: torch.dtype | None = None,
) -> tuple[PretrainedConfig, str | None, Mapping[str, torch.Tensor], Any]:
    """(HF config, HF architecture name, HF state dict, where the tokenizer is) for any source.

    A folder's state dict is lazy: each tensor is read from disk (in ``dtype``) when a converter asks.
    """
    if _is_hf_model(source):
        name = getattr(source, "name_or_path", "")
        folder = name if name and Path(name).is_dir() else None  # Path("") is the current directory
        return source.config, type(source).__name__, source.state_dict(), folder
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path, a hub id or a PreTrainedModel, got {type(source).__name__}")
    path = Path(source)
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        path, gguf_file = path.parent, path.name
    if gguf_file is not None:
        return _resolve_gguf(str(path), gguf_file, revision, cache_dir)
    if not path.is_dir():
        if _looks_local(str(source)):
            raise FileNotFoundError(f"no such model folder or file: {str(source)!r}")
        path = _download(str(source), revision, cache_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: it is not an HF model folder")
    hf_config = AutoConfig.from_pretrained(path)
    arch_name = (hf_config.architectures or [None])[0]
    return hf_config, arch_name, _with_base_prefix(_read_weights(path, dtype), arch_name), path


def _resolve_gguf(
    where: str, gguf_file: str, revision: str | None, cache_dir: str | os.PathLike | None,
) -> tuple[PretrainedConfig, str | None, StateDict, Any]:
    # transformers dequantises GGUF tensors to ordinary float tensors while building its model.
    from transformers import AutoModelForCausalLM

    from hooked_attn.checkpoint import check_gguf

    if Path(where, gguf_file).is_file():
        check_gguf(Path(where, gguf_file))
    hf_model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=torch.float32,
                                                    revision=revision, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file, revision=revision, cache_dir=cache_dir)
    return hf_model.config, type(hf_model).__name__, hf_model.state_dict(), tokenizer


def _is_hf_model(source: object) -> bool:
    """Whether ``source`` is an HF ``PreTrainedModel``, without importing transformers' modeling code: no
    such model can exist before that code is imported."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(source, modeling.PreTrainedModel)


def _looks_local(name: str) -> bool:
    """A path, not a hub id (``org/name``): absolute, relative with ./ or ~, or deeper than one slash."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _download(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=_HUB_PATTERNS))
    except Exception as err:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder or file, and fetching it from the HuggingFace hub failed "
            f"({type(err).__name__}: {err})"
        ) from err


class _Prefixed(Mapping[str, torch.Tensor]):
    """A checkpoint saved from the base model (``BloomModel``: ``h.0...``) seen with the keys the task
    model has (``BloomForCausalLM``: ``transformer.h.0...``), as HF's own loader sees it."""

    def __init__(self, inner: Mapping[str, torch.Tensor], prefix: str) -> None:
        self._inner, self._prefix = inner, prefix

    def __getitem__(self, key: str) -> torch.Tensor:
        if not key.startswith(self._prefix):
            raise KeyError(key)
        return self._inner[key[len(self._prefix):]]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.startswith(self._prefix) and key[len(self._prefix):] in self._inner

    def __iter__(self) -> Iterator[str]:
        return (self._prefix + key for key in self._inner)

    def __len__(self) -> int:
        return len(self._inner)


def _with_base_prefix(sd: Mapping[str, torch.Tensor], arch_name: str | None) -> Mapping[str, torch.Tensor]:
    """Add the task model's base-model prefix when no key has it (a checkpoint saved from the base model)."""
    import transformers

    # Only task models (a head around the base model) carry the prefix; a base model's own keys never do.
    is_task_model = "For" in (arch_name or "") or (arch_name or "").endswith("LMHeadModel")
    # A base model's layers sit at the top (``h.0.``, ``layers.0.``), a task model's one level down
    # (``model.layers.0.``). Only the former needs HF's prefix, whose lookup imports HF's modeling code.
    top_level_layers = any(key.split(".")[1:2] and key.split(".")[1].isdigit() for key in sd)
    if not (is_task_model and top_level_layers):
        return sd
    prefix = getattr(getattr(transformers, arch_name or "", None), "base_model_prefix", "")
    if not prefix or any(key.startswith(prefix + ".") for key in sd):
        return sd
    logger.info("the checkpoint's keys lack the %r prefix (saved from the base model); reading them under it", prefix)
    return _Prefixed(sd, prefix + ".")


def _read_weights(folder: Path, dtype: torch.dtype | None) -> Mapping[str, torch.Tensor]:
    """The folder's safetensors checkpoint, read lazily, or else its ``pytorch_model*.bin`` files."""
    files = safetensors_files(folder)
    return LazySafetensors(files, dtype) if files else read_torch_bin(folder, dtype)


def _load_tokenizer(tokenizer: TokenizerArg, default: Any) -> PreTrainedTokenizerBase | None:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    if isinstance(default, PreTrainedTokenizerBase) or default is None:
        return default
    if not any((Path(default) / name).is_file() for name in _TOKENIZER_FILES):
        logger.info("%s has no tokenizer files; pass tokenizer= to use text input", default)
        return None
    try:
        loaded = AutoTokenizer.from_pretrained(default)
    except (OSError, ValueError, TypeError) as err:
        logger.warning("no tokenizer loaded from %s (%s); pass tokenizer= to use text input", default, err)
        return None
    if len(loaded) == 0:  # transformers 5 can build an empty tokenizer instead of failing
        logger.warning("the tokenizer in %s has an empty vocabulary; ignoring it", default)
        return None
    return loaded
