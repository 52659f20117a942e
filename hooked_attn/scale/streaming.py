"""Loading onto a device map one group of weights at a time: each block is read from the source, converted
and processed on the device the map gives it (or processed on the CPU, written to the offload folder and
dropped), so no device, the CPU included, ever holds the whole model.

Converters and processing steps are written over a whole state dict. Here they run once per *group*, over
a state dict in which only that group's tensors are real and every other one is a ``meta`` stand-in
(shape and dtype, no data). Converting and processing a block reads only that block's weights, so the
group's results are the ones a whole-model run gives, bit for bit. The groups are each block
``blocks.{i}`` (the HF keys whose first number is ``i``) and the rest (embeddings, final norm,
unembedding: the final norm folds into the unembedding, and a tied unembedding is the embedding). A
group's result left on ``meta``, or an error from mixing devices, would mean a step reads across groups:
the load then stops with ``StreamingError`` naming the group.

Everything that can refuse the load (the conversion's keys and shapes, the processing steps, the fit of
the weights to the model) is checked first on stand-ins alone, before any weight is read; the
non-finite check (``check_finite``) reads the unembedding, which is in the first group processed.
"""

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hooked_attn.config import ModelConfig, Processing
from hooked_attn.loading import OpenedSource, as_parameter, check_finite, check_fits
from hooked_attn.memory import release_free_memory
from hooked_attn.processing import plan_processing, process_weights
from hooked_attn.scale.dispatch import dispatch, torch_device
from hooked_attn.scale.folder import FolderWriter
from hooked_attn.scale.offload import write_manifest, write_unit
from hooked_attn.scale.placement import Device, placement_units
from hooked_attn.sources import load_tokenizer

logger = logging.getLogger(__name__)

REST = "rest"  # the group of every weight outside the blocks
Build = Callable[[ModelConfig, Any], nn.Module]  # (processed config, tokenizer) -> a model, built on meta


class StreamingError(RuntimeError):
    """A family's conversion or processing reads weights across groups, so it cannot load group by group."""


@functools.cache  # called for every key in every group
def hf_group(key: str) -> str:
    """``blocks.{i}`` for an HF key whose first numeric part is ``i`` (``model.layers.3.mlp.up_proj.weight``),
    else ``REST``."""
    number = next((part for part in key.split(".") if part.isdigit()), None)
    return REST if number is None else f"blocks.{int(number)}"


@functools.cache
def unit_of(key: str) -> str:
    """The placement unit holding our weight ``key``: ``blocks.{i}`` or a top-level module."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


@functools.cache
def group_of(key: str) -> str:
    unit = unit_of(key)
    return unit if unit.startswith("blocks.") else REST


def _stand_in(hf_sd: Mapping[str, Tensor], key: str) -> Tensor:
    """A ``meta`` tensor shaped like ``hf_sd[key]``: from the checkpoint's header when the mapping can
    say (``LazySafetensors.meta``), else from the tensor itself (in memory already)."""
    meta = getattr(hf_sd, "meta", None)
    return meta(key) if callable(meta) else torch.empty_like(hf_sd[key], device="meta")


class _OneGroup(Mapping[str, Tensor]):
    """The HF state dict with the tensors of one group read from the source, every other a stand-in."""

    def __init__(self, hf_sd: Mapping[str, Tensor], stand_ins: Mapping[str, Tensor], group: str) -> None:
        self._hf_sd, self._stand_ins, self._group = hf_sd, stand_ins, group

    def __getitem__(self, key: str) -> Tensor:
        return self._hf_sd[key] if hf_group(key) == self._group else self._stand_ins[key]

    def __contains__(self, key: object) -> bool:
        return key in self._stand_ins

    def __iter__(self) -> Iterator[str]:
        return iter(self._stand_ins)

    def __len__(self) -> int:
        return len(self._stand_ins)


def load_placed(
    build: Build, opened: OpenedSource, processing: Processing, plan: Mapping[str, Device],
    offload_folder: str | Path | None,
) -> nn.Module:
    """Load ``opened`` onto the device map ``plan`` (see ``dispatch.plan_for_model``) group by group and
    dispatch it. A unit mapped to "disk" is processed on the CPU and written to ``offload_folder``; a
    unit on "cpu" or a GPU is processed there and stays there.

    Peak memory: the units kept on the CPU, plus one group's weights about twice over (as read and as
    processed); a GPU holds its own units plus one of its groups while it is processed.

    Raises:
        StateDictError, ProcessingError, NonFiniteWeightError: as ``loading.load_weights``, before any
            weight is read (the non-finite check: before any is processed).
        StreamingError: the family's conversion reads weights across groups.
    """
    cfg, arch, dtype, hf_sd = opened.cfg, opened.architecture, opened.dtype, opened.hf_state_dict
    stand_ins = {key: _stand_in(hf_sd, key) for key in hf_sd}
    # Every check that can refuse, on stand-ins: conversion (keys, shapes), processing, the model's fit.
    converted = {key: t.to(dtype) for key, t in arch.convert_state_dict(stand_ins, cfg, opened.hf_config).items()}
    run, processed_cfg, _ = plan_processing(converted, cfg, processing)
    processed, _ = process_weights(converted, cfg, processing)
    tokenizer = load_tokenizer(opened.tokenizer, opened.default_tokenizer)
    with torch.device("meta"):
        model = build(processed_cfg, tokenizer).to(dtype)
    params = dict(model.named_parameters())
    check_fits(params, processed)
    units = placement_units(model)  # processing may have emptied some (a folded ln_final)
    plan = {unit: device for unit, device in plan.items() if unit in units}
    disk = [unit for unit, device in plan.items() if device == "disk"]
    if disk and offload_folder is None:
        raise ValueError("the device map sends units to 'disk': pass offload_folder=")
    # The folder is checked (a file, not writable, someone else's files in the way) before any weight is read.
    writer = FolderWriter(offload_folder, disk, tokenizer=tokenizer is not None) if disk else None
    last = plan[units[-1]]  # the unembedding's device
    groups = [REST] + [f"blocks.{i}" for i in range(len(model.blocks))]  # type: ignore[arg-type]
    entries: dict[str, Any] = {}
    owned = _owned(opened.foreign)
    from_rest: dict[str, Tensor] = {}
    for group in groups:
        sd = _convert_group(opened, stand_ins, group)
        if group == REST:
            # A block weight the rest's pass makes real depends on the rest's weights alone (the blocks'
            # are stand-ins there): a converter's zero biases made ``like`` the embedding. Its blocks'
            # own passes make it from stand-ins, so it is taken from here.
            from_rest = {key: t for key, t in sd.items() if group_of(key) != REST and not t.is_meta}
        for key, t in sd.items():
            if group_of(key) != group:
                # The stand-in conversion's tensor when it is laid out the same: a fresh meta tensor goes
                # through torch's Python reference ops (~0.2 ms), once per key per group.
                same = converted.get(key)
                fits = same is not None and same.shape == t.shape and same.stride() == t.stride()
                sd[key] = same if fits else torch.empty_like(t, device="meta", dtype=dtype)
                continue
            t = from_rest.pop(key, t) if t.is_meta else t
            if t.is_meta:
                raise StreamingError(f"{arch.hf_architecture}: converting {group} makes {key!r} from weights "
                                     "outside it; load without a device_map and place it with hooked_attn.scale.dispatch")
            # The group's weights move to where they are processed. A unit that processing empties (a
            # folded ln_final) is processed where the unit it folds into (the unembedding) is.
            sd[key] = t.to(device=_processing_device(plan.get(unit_of(key), last)), dtype=dtype)
        if group == REST:
            check_finite({k: t for k, t in sd.items() if not t.is_meta}, run, dtype=dtype)
            # Nothing below refuses what it was given: from here on, an in-memory source may be released.
            if opened.release_source:
                opened.source.to_empty(device="meta")  # type: ignore[union-attr]
        sd = _process_group(sd, cfg, processing, run, group, owned)
        mine = {key: sd.pop(key) for key in [k for k in sd if group_of(k) == group]}
        del sd
        left_on_meta = [key for key, t in mine.items() if t.is_meta]
        if left_on_meta or not mine and group != REST:
            raise StreamingError(f"{arch.hf_architecture}: the weights of {group} ({left_on_meta[:3]}) depend on "
                                 "weights outside it; load without a device_map and place it with "
                                 "hooked_attn.scale.dispatch")
        entries |= _place_group(model, params, mine, plan, writer, dtype, opened.foreign)
        del mine
        release_free_memory()
    if writer is not None:
        write_manifest(writer, processed_cfg, entries, tokenizer)
    logger.info("loaded %s group by group onto %s", arch.hf_architecture, sorted(set(map(str, plan.values()))))
    return dispatch(model, plan, offload_folder=offload_folder)


# The config fields that hold one entry per layer (``ModelConfig``'s per-layer overrides).
PER_LAYER_FIELDS = ("layer_rotary", "attn_windows")


def _process_group(sd: dict[str, Tensor], cfg: ModelConfig, processing: Processing, run: list[str], group: str,
                   owned: Callable[[Tensor], bool]) -> dict[str, Tensor]:
    """Process ``sd`` (``group``'s weights real, the rest stand-ins) in place and return it.

    Processing a block reads nothing outside it, so the steps run over a one-layer model: the group's
    block (or, for the rest, one block of stand-ins) renamed ``blocks.0``, with the rest's weights, and the
    config of that layer. Stand-ins of every other block would cost the same ``meta`` operations in every
    group, a time quadratic in the layers. Should the steps chosen for the one-layer model differ from
    ``run`` (those of the whole model), the whole state dict is processed instead.
    """
    layer = 0 if group == REST else int(group.split(".")[1])
    one = cfg.replace(n_layers=1, **{name: (getattr(cfg, name)[layer],) for name in PER_LAYER_FIELDS
                                      if getattr(cfg, name) is not None})
    prefix = f"blocks.{layer}."
    small = {("blocks.0." + key[len(prefix):] if key.startswith(prefix) else key): t
             for key, t in sd.items() if group_of(key) == REST or key.startswith(prefix)}
    if plan_processing(small, one, processing)[0] != run:
        return process_weights(sd, cfg, processing, inplace=True, owned=owned)[0]
    small, _ = process_weights(small, one, processing, inplace=True, owned=owned)
    for key in [k for k in sd if group_of(k) == REST or k.startswith(prefix)]:
        del sd[key]
    sd |= {(prefix + key[len("blocks.0."):] if key.startswith("blocks.0.") else key): t for key, t in small.items()}
    return sd


def _owned(foreign: frozenset[int]) -> Callable[[Tensor], bool]:
    return lambda t: t.untyped_storage().data_ptr() not in foreign


def _processing_device(device: Device) -> torch.device:
    """Where a unit placed on ``device`` is processed: there, or on the CPU for "disk"."""
    return torch.device("cpu") if device == "disk" else torch_device(device)


def _convert_group(opened: OpenedSource, stand_ins: Mapping[str, Tensor], group: str) -> dict[str, Tensor]:
    """The converted state dict with ``group``'s tensors read from the source and the rest stand-ins."""
    try:
        sd = opened.architecture.convert_state_dict(_OneGroup(opened.hf_state_dict, stand_ins, group), opened.cfg,
                                                    opened.hf_config)
    except (RuntimeError, NotImplementedError) as err:  # a real tensor met a stand-in
        raise StreamingError(f"{opened.architecture.hf_architecture}: converting {group} reads weights outside it "
                             f"({err}); load without a device_map and place it with hooked_attn.scale.dispatch") from err
    if isinstance(opened.hf_state_dict, dict):  # an in-memory source's: drop what this group used
        for key in [k for k in opened.hf_state_dict if hf_group(k) == group]:
            del opened.hf_state_dict[key]
    return sd


def _place_group(
    model: nn.Module, params: Mapping[str, Tensor], weights: dict[str, Tensor], plan: Mapping[str, Device],
    writer: FolderWriter | None, dtype: torch.dtype, foreign: frozenset[int],
) -> dict[str, Any]:
    """Make ``weights`` the model's parameters on their units' devices, or write the units mapped to
    "disk" with ``writer`` (their parameters stay on meta). Returns the manifest entries written."""
    entries: dict[str, Any] = {}
    for unit in sorted({unit_of(key) for key in weights}, key=list(plan).index):
        device = plan[unit]
        names = [key for key in weights if unit_of(key) == unit]
        data = {name: as_parameter(weights.pop(name), params[name], dtype, _processing_device(device), foreign)
                for name in names}
        if device == "disk":
            assert writer is not None
            entries |= write_unit(writer, unit, data)
            continue
        for name, tensor in data.items():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_parameter(
                leaf, nn.Parameter(tensor, requires_grad=params[name].requires_grad))
    return entries
