"""The loading pipeline: source -> HF config -> check -> convert -> check -> process, ending in data.

``open_source`` checks the arguments and reads and converts the config (``OpenedSource``: nothing read
yet, so a caller can plan with the config, a device map say); ``load_weights`` converts and processes the
weights into a ``LoadedWeights`` (our config, our processed state dict, the tokenizer, where the weights
are to live); ``materialise`` builds any model class from it without a second copy. Model classes call
the three from their ``from_pretrained``; this module knows no model class.

Every argument and every refusal (dtype, device, tokenizer, a processing step that cannot preserve the
model, a non-finite weight that processing would spread) is checked before any weight is rewritten, so an
in-memory source is left as it was whenever the load fails on what it was given.
"""

import logging
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from hooked_attn.architectures import get_architecture
from hooked_attn.architectures.base import Architecture, StateDictError, check_hf_config
from hooked_attn.config import ModelConfig, Processing
from hooked_attn.memory import release_free_memory
from hooked_attn.processing import DEFAULT_PROCESSING, plan_processing, process_weights
from hooked_attn.sources import Source, TokenizerArg, check_tokenizer_arg, is_hf_model, load_tokenizer, read_source
from hooked_attn.weight_writer import SLICE_ELEMENTS

logger = logging.getLogger(__name__)

Kind = Literal["decoder", "encoder"]
DtypeArg = torch.dtype | str | None
DeviceArg = torch.device | str | None
M = TypeVar("M", bound=nn.Module)


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or inf, and processing would spread it to every output."""


@dataclass
class OpenedSource:
    """A source whose config is read, checked and converted to ours, and whose weights are not read yet
    (a folder's are read lazily; an in-memory model's are only referred to). Everything that can refuse
    the arguments has been checked."""

    cfg: ModelConfig
    hf_config: PretrainedConfig
    architecture: Architecture
    hf_state_dict: Mapping[str, Tensor]
    tokenizer: TokenizerArg
    default_tokenizer: Any  # the source's own: a loaded tokenizer (GGUF), the folder it is in, or None
    dtype: torch.dtype
    device: torch.device
    source: Source
    release_source: bool
    foreign: frozenset[int]  # storages that a caller's live object holds: copied, never adopted or written


@dataclass
class LoadedWeights:
    """What the pipeline ends in: everything a model class needs to be built, and nothing of one."""

    cfg: ModelConfig  # describes ``state_dict`` (its ``processing`` records the steps applied)
    state_dict: dict[str, Tensor]  # our layout, processed; emptied by ``materialise`` as it adopts each tensor
    tokenizer: PreTrainedTokenizerBase | None
    hf_config: PretrainedConfig
    architecture: Architecture
    dtype: torch.dtype
    device: torch.device
    foreign: frozenset[int]


def open_source(
    source: Source, *, kind: Kind = "decoder", tokenizer: TokenizerArg = None, dtype: DtypeArg = None,
    device: DeviceArg = None, gguf_file: str | None = None, revision: str | None = None,
    cache_dir: str | os.PathLike | None = None, release_source: bool = False,
) -> OpenedSource:
    """Check the arguments, read the HF config, find the family and convert the config (see
    ``HookedTransformer.from_pretrained`` for the arguments). ``kind`` picks the registry: decoder-only
    families or encoders. No weight is read or touched."""
    target_dtype = resolve_dtype(dtype, source)
    target_device = resolve_device(device)
    check_tokenizer_arg(tokenizer)
    in_memory = is_hf_model(source)
    if release_source and not in_memory:
        raise ValueError(f"release_source=True takes the weights of an in-memory PreTrainedModel; got "
                         f"{type(source).__name__} {str(source)!r}")
    if in_memory:
        _check_has_weights(source)  # type: ignore[arg-type]
    # Counted before anything of ours refers to them: what else holds the source's tensors.
    held = _held_elsewhere(source) if release_source else frozenset()  # type: ignore[arg-type]
    read = read_source(source, gguf_file, revision, cache_dir, target_dtype)
    arch = get_architecture(read.hf_architecture, read.hf_config, kind)  # one registry, by kind
    check_hf_config(read.hf_config, arch)
    cfg = arch.config_from_hf(read.hf_config)
    # A caller's in-memory model is copied, never adopted or written to; with release_source, only what
    # something besides it holds is.
    foreign = frozenset(_ptr(t) for t in read.state_dict.values()) if in_memory and not release_source else held
    return OpenedSource(cfg=cfg, hf_config=read.hf_config, architecture=arch, hf_state_dict=read.state_dict,
                        tokenizer=tokenizer, default_tokenizer=read.tokenizer, dtype=target_dtype,
                        device=target_device, source=source, release_source=release_source, foreign=foreign)


def load_weights(opened: OpenedSource, processing: Processing = DEFAULT_PROCESSING) -> LoadedWeights:
    """Convert, check and process the weights of an opened source. A processing step that cannot preserve
    the model, a non-finite weight that processing would spread, and a tokenizer that will not load are
    all refused before an in-memory source is released (``release_source``) or any weight rewritten."""
    cfg, arch = opened.cfg, opened.architecture
    sd = arch.convert_state_dict(opened.hf_state_dict, cfg, opened.hf_config)
    opened.hf_state_dict = {}  # the HF state dict's own references go: only what ``sd`` holds stays
    run, _, _ = plan_processing(sd, cfg, processing)  # a refused step raises here
    check_finite(sd, run, dtype=opened.dtype)
    tokenizer = load_tokenizer(opened.tokenizer, opened.default_tokenizer)
    # Nothing below refuses what it was given: from here on, an in-memory source may be released.
    if opened.release_source:
        opened.source.to_empty(device="meta")  # type: ignore[union-attr]
    release_free_memory()
    for key in sd:  # one tensor at a time, so the old one is freed as the new one is made
        sd[key] = sd[key].to(opened.dtype)
    foreign = opened.foreign
    sd, cfg = process_weights(sd, cfg, processing, inplace=True, owned=lambda t: _ptr(t) not in foreign)
    where = type(opened.source).__name__ if is_hf_model(opened.source) else opened.source
    logger.info("loaded %s from %s with processing %s", arch.hf_architecture, where, cfg.processing)
    return LoadedWeights(cfg=cfg, state_dict=sd, tokenizer=tokenizer, hf_config=opened.hf_config,
                         architecture=arch, dtype=opened.dtype, device=opened.device, foreign=foreign)


def materialise(build: Callable[[LoadedWeights], M], loaded: LoadedWeights) -> M:
    """Build ``build(loaded)`` on the meta device and adopt the loaded tensors as its parameters.

    A tensor is adopted as it is when it already has the parameter's dtype, device and memory layout and
    is not ``foreign``; otherwise it is copied into a fresh one. Each tensor leaves ``loaded.state_dict``
    as it is placed, so nothing is held twice.

    Raises:
        StateDictError: the weights do not fit the model (a name missing or left over, a shape).
    """
    sd = loaded.state_dict
    with torch.device("meta"):
        model = build(loaded)
    params = dict(model.named_parameters())
    check_fits(params, sd)
    for name, meta in params.items():
        tensor = as_parameter(sd.pop(name), meta, loaded.dtype, loaded.device, loaded.foreign)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_parameter(leaf, nn.Parameter(tensor, requires_grad=meta.requires_grad))
    return model


def check_fits(params: Mapping[str, Tensor], sd: Mapping[str, Tensor]) -> None:
    """Refuse weights ``sd`` that are not exactly the parameters ``params`` (names and shapes).

    Raises:
        StateDictError: a name missing or left over, or a shape.
    """
    missing, unexpected = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
    if missing or unexpected:
        raise StateDictError(f"converted weights do not fit the model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    for name, meta in params.items():
        if sd[name].shape != meta.shape:
            raise StateDictError(f"converted weight {name!r} has shape {tuple(sd[name].shape)}, the model needs "
                                 f"{tuple(meta.shape)}")


def as_parameter(tensor: Tensor, meta: Tensor, dtype: torch.dtype, device: torch.device,
                 foreign: frozenset[int]) -> Tensor:
    """``tensor`` as the data of the parameter ``meta``: itself when it already has the dtype, device and
    memory layout and is not ``foreign``, else copied into a fresh tensor laid out like ``meta``."""
    if tensor.dtype == dtype and tensor.device == device and _layout_fits(tensor, meta) and _ptr(tensor) not in foreign:
        return tensor
    return torch.empty_strided(meta.shape, meta.stride(), dtype=dtype, device=device).copy_(tensor)


def resolve_dtype(dtype: DtypeArg, source: object = None) -> torch.dtype:
    """The floating-point dtype to load in: ``dtype`` (a ``torch.dtype`` or its name, ``"bfloat16"``),
    float32 by default. An in-memory source in another floating dtype, loaded by default, is upcast
    with a warning that says how to keep its dtype.

    Raises:
        ValueError: not a floating-point dtype (``torch.int64``), or a name torch does not know.
        TypeError: neither a dtype, a name nor None.
    """
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. torch.bfloat16 or 'bfloat16'")
        dtype = named
    if dtype is None:
        source_dtype = _floating_dtype(source) if is_hf_model(source) else None
        if source_dtype is not None and source_dtype != torch.float32:
            warnings.warn(f"the HF model's weights are {source_dtype}; loading them as torch.float32 (the default). "
                          f"Pass dtype={source_dtype} to keep them as they are.", stacklevel=4)
        return torch.float32
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, its name or None, got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype (torch.float32, torch.bfloat16, ...), got {dtype}")
    return dtype


def resolve_device(device: DeviceArg) -> torch.device:
    """``device`` (CPU by default), checked by making an empty tensor there.

    Raises:
        ValueError: the device string is malformed or the device is not available (``"cuda"`` without CUDA).
    """
    try:
        target = torch.device(device) if device is not None else torch.device("cpu")
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError) as err:  # torch raises AssertionError for a CPU-only build's CUDA
        raise ValueError(f"cannot load onto device {device!r}: {err}") from err
    return target


# The weights whose non-finite values a step would spread beyond where the unprocessed model has them.
# Every other step keeps a NaN or inf inside what it already poisons in HF's model (a NaN in W_Q[h]
# already reaches every output), so a scan of those would cost a read of the whole model (~0.2 s per
# 135M parameters here) and find nothing processing makes worse. Centring the unembedding subtracts
# each row's mean over d_vocab: one bad vocabulary column (an unused, tied embedding row) becomes every
# logit.
SPREAD_BY_STEP = {"center_unembed": ("unembed.W_U", "unembed.b_U")}


def check_finite(sd: Mapping[str, Tensor], run: list[str], dtype: torch.dtype | None = None) -> None:
    """Refuse a NaN or inf that a processing step in ``run`` would spread (``SPREAD_BY_STEP``), naming the
    tensor and the index of the first; with ``dtype``, as the weight will be once cast to it (1e6 is inf
    in float16).

    Raises:
        NonFiniteWeightError: with the tensor, the count, the first index and what to do.
    """
    keys = [key for step in run for key in SPREAD_BY_STEP.get(step, ()) if key in sd]
    bad = [key for key in keys if sd[key].is_floating_point() and not _all_finite(sd[key], dtype)]
    if not bad:
        return
    first = sd[bad[0]] if dtype is None else sd[bad[0]].to(dtype)
    index = tuple(int(i) for i in torch.nonzero(~torch.isfinite(first))[0])
    count = int((~torch.isfinite(first)).sum())
    cast = f" in {dtype}" if dtype is not None and dtype != sd[bad[0]].dtype else ""
    steps = ", ".join(step for step in run if bad[0] in SPREAD_BY_STEP.get(step, ()))
    raise NonFiniteWeightError(
        f"weight {bad[0]!r} {tuple(first.shape)} holds {count} non-finite value(s){cast}; the first is "
        f"{float(first[index])} at index {index}. Processing ({steps}) would spread it to every output: repair "
        f"the weight, or load without that step ({steps}=False, or from_pretrained_no_processing)")


def _all_finite(t: Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether every element of ``t`` is finite: float32 sums over bounded slices (a sum is finite
    exactly when no element is NaN or inf, short of an overflow, which the exact check then clears).
    Slices are views, in memory order when ``t`` is dense, so nothing the size of ``t`` is made; each
    is cast to ``dtype`` first when that differs."""
    t = _in_memory_order(t)
    if t.ndim == 0:
        return bool(torch.isfinite(t if dtype is None else t.to(dtype)))
    n = t.shape[0]
    step = max(1, SLICE_ELEMENTS // max(1, t.numel() // max(1, n)))
    for start in range(0, n, step):
        part = t.narrow(0, start, min(step, n - start))
        if dtype is not None and dtype != t.dtype:
            part = part.to(dtype)
        if not torch.isfinite(part.sum(dtype=torch.float32)) and not bool(torch.isfinite(part).all()):
            return False
    return True


def _in_memory_order(t: Tensor) -> Tensor:
    """``t``'s elements as one contiguous 1-d view when ``t`` is dense in some axis order (a transposed or
    per-head rearranged weight: a reduction over the permuted view is several times slower), else ``t``."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return t
        expected *= size
    return t.as_strided((t.numel(),), (1,))


def _ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _check_has_weights(model: nn.Module) -> None:
    empty = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if empty is not None:
        raise ValueError(f"the {type(model).__name__} has no weights: {empty} is on the meta device (it was "
                         f"emptied by an earlier from_pretrained(..., release_source=True), or built on meta)")


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _held_elsewhere(model: nn.Module) -> frozenset[int]:
    """The storages of ``model``'s parameters and buffers that something besides ``model`` also holds:
    another module given the same parameter, a tensor sharing its storage (another model loaded with
    ``assign=True``, a view), or a variable. Those must never be rewritten in place.

    Python's reference count of each tensor is compared with the slots ``model`` holds it in, and the
    storage's use count with the tensors ``model`` holds on it."""
    slots: Counter[int] = Counter()
    tensors: dict[int, Tensor] = {}
    for module in model.modules():
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                slots[id(t)] += 1
                tensors[id(t)] = t
    on_storage = Counter(_ptr(t) for t in tensors.values())
    held = set()
    for key in list(tensors):
        t = tensors[key]
        storage = t.untyped_storage()  # this Python storage object is one more use of the storage
        # References to t: its slots, ``tensors``' value, the name t, and getrefcount's own argument.
        if sys.getrefcount(t) > slots[key] + 3 or torch._C._storage_Use_Count(storage._cdata) > on_storage[_ptr(t)] + 1:
            held.add(_ptr(t))
        del t, storage
    return frozenset(held)


def _layout_fits(tensor: Tensor, meta: Tensor) -> bool:
    """Whether ``tensor`` can be the parameter ``meta`` as it is laid out: the same strides, or, for a
    matrix, either dense layout (GPT-2's Conv1D ``[in, out]`` or nn.Linear's ``[out, in]``), which the
    forward's ``F.linear`` reads equally well."""
    if tensor.stride() == meta.stride():
        return True
    if tensor.ndim != 2 or tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != tensor.nbytes:
        return False
    return tensor.is_contiguous() or tensor.T.is_contiguous()
