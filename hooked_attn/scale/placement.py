"""Which part of a HookedTransformer goes on which device: accelerate's planners over our module tree.

A device map names *placement units*: each top-level module that holds weights (``embed``,
``pos_embed``, ``ln_final``, ``unembed``...) and each block ``blocks.{i}``. A block is never split
across devices. Planning reads only parameter shapes, so it runs on a model built on the ``meta``
device, before any weight exists.
"""

from collections.abc import Mapping
from typing import Literal, TypeAlias

import torch
from torch import nn

# accelerate's spelling of a device: a GPU index, or "cpu" / "disk" ("mps" passes through).
Device: TypeAlias = int | str
DeviceMap: TypeAlias = dict[str, Device]
Strategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
# The module class accelerate must keep whole: one transformer block.
NO_SPLIT = ["TransformerBlock"]


def placement_units(model: nn.Module) -> list[str]:
    """The names a full device map gives a device, in forward order: weight-holding top-level modules
    and every block."""
    units = []
    for name, child in model.named_children():
        if name == "blocks":
            units += [f"blocks.{i}" for i in range(len(child))]  # type: ignore[arg-type]
        elif any(True for _ in child.parameters()):
            units.append(name)
    return units


def normalize_device(device: Device | torch.device, where: str = "device_map") -> Device:
    """accelerate's spelling of ``device``: ``torch.device("cuda:1")`` and ``"cuda:1"`` become 1."""
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise ValueError(f"{where}: {device!r} is not a device (use a GPU index, 'cuda:N', 'cpu' or 'disk')")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"{where}: GPU index {device} is negative")
        return device
    if device == "disk":
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{where}: {device!r} is not a device (use a GPU index, 'cuda:N', 'cpu' or 'disk')") from err
    if parsed.type == "cuda":
        return parsed.index or 0
    if parsed.type == "meta":
        raise ValueError(f"{where}: 'meta' holds no weights; use 'disk' to keep weights off memory")
    if parsed.type == "cpu":  # "cpu:0" is the one CPU; accelerate knows it as "cpu" only
        return "cpu"
    return parsed.type if parsed.index is None else str(parsed)


def plan_device_map(
    model: nn.Module, device_map: Strategy | str | Mapping[str, Device | torch.device], *,
    max_memory: Mapping[Device, int | str] | None = None, dtype: torch.dtype | None = None,
) -> DeviceMap:
    """A device for every placement unit of ``model`` (see ``placement_units``).

    Args:
        model: a HookedTransformer, usually built on the ``meta`` device.
        device_map: "auto" / "balanced" (blocks spread evenly over the GPUs), "balanced_low_0" (GPU 0
            kept light, for generation), "sequential" (fill GPU 0, then 1, ...), or an explicit
            ``{module: device}`` dict whose keys are ``""`` (everything), top-level modules,
            ``"blocks"`` or ``"blocks.{i}"``.
        max_memory: the budget per device, e.g. ``{0: "10GiB", 1: "10GiB", "cpu": "30GiB"}``; units
            that fit nowhere go to "disk" when it is listed. Default: what each device has free.
        dtype: the dtype the weights will have (default: the model's).

    Raises:
        ValueError: an unknown strategy, a key naming no module or a part of a block, weights no key
            covers, or weights that fit in no device of ``max_memory``.
    """
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise ValueError(f"device_map={device_map!r} is not a strategy: use one of {STRATEGIES} or a dict")
        raw = _infer(model, device_map, max_memory, dtype)
    elif isinstance(device_map, Mapping):
        if max_memory is not None:
            raise ValueError("max_memory budgets a planned device map; an explicit device_map dict takes none")
        raw = _check_explicit(model, device_map)
    else:
        raise ValueError(f"device_map must be a strategy name or a dict, got {type(device_map).__name__}")
    return _expand(model, raw)


def _infer(model: nn.Module, strategy: str, max_memory: Mapping[Device, int | str] | None,
           dtype: torch.dtype | None) -> Mapping[str, Device]:
    from accelerate import infer_auto_device_map
    from accelerate.utils import convert_file_size_to_int, get_balanced_memory, get_max_memory

    budget = dict(max_memory) if max_memory is not None else None
    if budget is not None:
        for key in budget:
            if not (isinstance(key, int) or key in ("cpu", "disk", "mps")):
                raise ValueError(f"max_memory key {key!r} is not a device: use GPU indices, 'cpu', 'disk'")
            try:  # accelerate's planner reads a negative budget as none: everything sent on to disk
                size = convert_file_size_to_int(budget[key])
            except ValueError as err:
                raise ValueError(f"max_memory[{key!r}] = {budget[key]!r}: {err}") from err
            if size < 0:
                raise ValueError(f"max_memory[{key!r}] = {budget[key]!r} is negative")
    if strategy == "sequential":
        budget = get_max_memory(budget)
    else:
        # accelerate 1.16's get_balanced_memory cannot parse a "disk" key: balance without it.
        disk = budget.pop("disk", None) if budget is not None else None
        budget = get_balanced_memory(model, budget, no_split_module_classes=NO_SPLIT, dtype=dtype,
                                     low_zero=strategy == "balanced_low_0")
        if disk is not None:
            budget["disk"] = disk
    return infer_auto_device_map(model, max_memory=budget, no_split_module_classes=NO_SPLIT, dtype=dtype)


def _check_explicit(model: nn.Module, device_map: Mapping[str, Device | torch.device]) -> DeviceMap:
    checked: DeviceMap = {}
    for key, device in device_map.items():
        if not isinstance(key, str):
            raise ValueError(f"device_map keys are module names, got {key!r}")
        parts = key.split(".") if key else []
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "blocks"):
            block = ".".join(parts[:2])
            raise ValueError(f"device_map key {key!r} names part of {block!r}: a block or top-level module is "
                             "never split across devices")
        try:
            model.get_submodule(key)
        except AttributeError as err:
            raise ValueError(f"device_map key {key!r} names no module of the model; top-level modules are "
                             f"{[n for n, _ in model.named_children()]}") from err
        checked[key] = normalize_device(device, f"device_map[{key!r}]")
    return checked


def _device_of(name: str, device_map: Mapping[str, Device]) -> Device | None:
    """The device of the longest key of ``device_map`` that is ``name`` or a module above it."""
    best: tuple[int, Device] | None = None
    for key, device in device_map.items():
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > best[0]:
                best = (len(key), device)
    return None if best is None else best[1]


def _expand(model: nn.Module, device_map: Mapping[str, Device]) -> DeviceMap:
    """Name every unit, and check that every weight has a device."""
    uncovered = [name for name, _ in model.named_parameters() if _device_of(name, device_map) is None]
    if uncovered:
        raise ValueError(f"the device map gives no device to {len(uncovered)} weights, e.g. {uncovered[:4]}; "
                         "with max_memory, add 'cpu' or 'disk' budgets for what does not fit")
    return {unit: _device_of(unit, device_map) for unit in placement_units(model)}  # type: ignore[misc]
