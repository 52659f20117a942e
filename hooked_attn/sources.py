"""Where a model's weights come from: a local HF folder, a ``.gguf`` file, a hub id, or an in-memory
``PreTrainedModel``. ``read_source`` turns any of them into an HF config, a (lazy) HF state dict and where
the tokenizer is; ``load_tokenizer`` loads it. No conversion happens here."""

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from hooked_attn.checkpoint import LazySafetensors, check_gguf, read_torch_bin, safetensors_files

logger = logging.getLogger(__name__)

# An in-memory model is an HF PreTrainedModel (checked by is_hf_model). It is typed as nn.Module so that
# loading from a folder never imports transformers' modeling code (and the scipy it pulls in: ~1 s).
Source = str | os.PathLike | nn.Module
TokenizerArg = PreTrainedTokenizerBase | str | os.PathLike | None
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class SourceWeights:
    """An HF model's config and weights, as read from any source (nothing converted yet)."""

    hf_config: PretrainedConfig
    hf_architecture: str | None
    state_dict: Mapping[str, torch.Tensor]  # lazy for a folder: each tensor is read when asked for
    tokenizer: Any  # a loaded tokenizer (GGUF), the folder it is in, or None


def read_source(
    source: Source, gguf_file: str | None = None, revision: str | None = None,
    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
) -> SourceWeights:
    """The HF config, HF architecture name, HF state dict and where the tokenizer is, for any source.

    A folder's state dict is lazy: each tensor is read from disk (in ``dtype``) when a converter asks.
    """
    if is_hf_model(source):
        name = getattr(source, "name_or_path", "")
        folder = name if name and Path(name).is_dir() else None  # Path("") is the current directory
        return SourceWeights(source.config, type(source).__name__, source.state_dict(), folder)
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
    return SourceWeights(hf_config, arch_name, _with_base_prefix(_read_weights(path, dtype), arch_name), path)


def _resolve_gguf(
    where: str, gguf_file: str, revision: str | None, cache_dir: str | os.PathLike | None,
) -> SourceWeights:
    # transformers dequantises GGUF tensors to ordinary float tensors while building its model.
    from transformers import AutoModelForCausalLM

    if Path(where, gguf_file).is_file():  # a truncated file is named here, not by a struct or reshape error
        check_gguf(Path(where, gguf_file))
    hf_model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=torch.float32,
                                                    revision=revision, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file, revision=revision, cache_dir=cache_dir)
    return SourceWeights(hf_model.config, type(hf_model).__name__, hf_model.state_dict(), tokenizer)


def is_hf_model(source: object) -> bool:
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

    def meta(self, key: str) -> torch.Tensor:
        """A ``meta`` tensor shaped like ``self[key]``, read from nothing when the inner mapping can say."""
        inner = key[len(self._prefix):] if key.startswith(self._prefix) else key
        if hasattr(self._inner, "meta"):
            return self._inner.meta(inner)
        return torch.empty_like(self[key], device="meta")


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


def load_tokenizer(tokenizer: TokenizerArg, default: Any) -> PreTrainedTokenizerBase | None:
    """``tokenizer`` itself, or loaded from where it says; else the source's own (``default``), if any.

    Raises:
        TypeError: ``tokenizer`` is neither a tokenizer, a path or hub id, nor None.
    """
    check_tokenizer_arg(tokenizer)
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


def check_tokenizer_arg(tokenizer: object) -> None:
    """Refuse a ``tokenizer=`` argument that is no tokenizer and names none."""
    if tokenizer is not None and not isinstance(tokenizer, (PreTrainedTokenizerBase, str, os.PathLike)):
        raise TypeError(f"tokenizer must be a PreTrainedTokenizerBase, a path or hub id, or None; got "
                        f"{type(tokenizer).__name__}")
