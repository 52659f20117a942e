"""Spread a HookedTransformer over devices with accelerate's hooks, one placement unit per device.

accelerate's ``dispatch_model`` moves each unit's weights to its device (or leaves them in an offload
folder, brought in for each forward) and moves every unit's inputs to where it runs. The one thing
it cannot move is the ``AttentionContext`` every block shares (masks, positions, rotary tables): a
small hook of ours gives each device its own copy, made once per forward.
"""

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hooked_attn.components.attention import AttentionContext
from hooked_attn.scale.placement import Device, DeviceMap, normalize_device, placement_units


def torch_device(device: Device) -> torch.device:
    """The torch device a unit on ``device`` computes on (disk- and cpu-offloaded units: see ``main_device``)."""
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def main_device(device_map: Mapping[str, Device]) -> Device:
    """Where the input goes and offloaded units compute: the first accelerator of the map, else the CPU."""
    return next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")


def check_devices_exist(device_map: Mapping[str, Device]) -> None:
    """Refuse a map naming GPUs (or other devices: "mps"...) this machine does not have (planning alone may
    name any)."""
    n_cuda = torch.cuda.device_count()
    missing = {unit: d for unit, d in device_map.items() if isinstance(d, int) and d >= n_cuda}
    if missing:
        raise ValueError(f"the device map puts {sorted(missing)[:4]} on GPU(s) {sorted(set(missing.values()))}, but "
                         f"this machine has {n_cuda} CUDA device(s)")
    for device in {d for d in device_map.values() if isinstance(d, str) and d not in ("cpu", "disk")}:
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as err:
            units = [unit for unit, d in device_map.items() if d == device]
            raise ValueError(f"the device map puts {units[:4]} on {device!r}, which this machine cannot use "
                             f"({err})") from err


class _ContextMover:
    """Per-device copies of one forward's AttentionContext, made the first time a device asks."""

    def __init__(self) -> None:
        self._source: AttentionContext | None = None
        self._copies: dict[torch.device, AttentionContext] = {}

    def on(self, ctx: AttentionContext, device: torch.device) -> AttentionContext:
        if ctx is not self._source:
            self._source, self._copies = ctx, {}
        if ctx.positions.device == device:
            return ctx
        if device not in self._copies:
            # Every field is carried (dataclasses.replace): tensors moved, flags such as ``causal`` as they
            # are. The KV cache stays one object: each layer's keys and values live on that layer's device.
            # The per-forward tables (rope_cache, masks) start empty: rebuilt on this device when asked.
            self._copies[device] = dataclasses.replace(
                ctx, attend=None if ctx.attend is None else ctx.attend.to(device),
                positions=ctx.positions.to(device), key_positions=ctx.key_positions.to(device),
                rope_cache={}, masks={},
                query_key_pos=None if ctx.query_key_pos is None else ctx.query_key_pos.to(device))
        return self._copies[device]

    def release(self) -> None:
        self._source, self._copies = None, {}


def _context_hook(mover: _ContextMover, device: torch.device) -> Any:
    from accelerate.hooks import ModelHook

    class MoveContext(ModelHook):
        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
            args = tuple(mover.on(a, device) if isinstance(a, AttentionContext) else a for a in args)
            return args, kwargs

    return MoveContext()


def _release_hook(mover: _ContextMover) -> Any:
    from accelerate.hooks import ModelHook

    class Release(ModelHook):
        def post_forward(self, module: nn.Module, output: Any) -> Any:
            mover.release()  # the copies live for one forward only
            return output

    return Release()


class _Both(Mapping[str, torch.Tensor]):
    """Two weight mappings seen as one (their keys never overlap)."""

    def __init__(self, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> None:
        self._first, self._second = first, second

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._first[name] if name in self._first else self._second[name]

    def __contains__(self, name: object) -> bool:
        return name in self._first or name in self._second

    def __iter__(self) -> Iterator[str]:
        yield from self._first
        yield from self._second

    def __len__(self) -> int:
        return len(self._first) + len(self._second)


@contextlib.contextmanager
def _quiet_offload_warning(offloaded: bool) -> Iterator[None]:
    """accelerate warns that CPU units are "offloaded to the cpu" even when everything computes on the
    CPU; keep its warning only when some unit really is offloaded."""
    def drop(record: logging.LogRecord) -> bool:
        return offloaded or "offloaded to the" not in record.getMessage()

    log = logging.getLogger("accelerate.big_modeling")
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def dispatch(
    model: nn.Module, device_map: Mapping[str, Device | torch.device], *,
    offload_folder: str | Path | None = None, execution_device: Device | torch.device | None = None,
) -> nn.Module:
    """Place ``model``'s units as ``device_map`` says (a full map: see ``plan_device_map``) and return it.

    Units mapped to "disk" must already be in ``offload_folder`` (``save_offloaded`` writes them; their
    parameters may then be on the ``meta`` device); each is read from there for every forward it
    takes part in. The input goes to the first accelerator of the map; outputs come back to the
    input's device. ``execution_device`` overrides where the input goes (and offloaded units run), e.g.
    a GPU for a model kept entirely on disk. Hooks fire on the device of the unit that computed their tensor.

    Raises:
        ValueError: the map misses a unit or names a GPU this machine lacks; "disk" units without an
            ``offload_folder`` that holds them, or whose config, shapes or dtypes there differ from the
            model's; a model dispatched already.
        OffloadFolderError: the folder's files do not match its manifest (``hooked_attn.scale.folder``).
    """
    from accelerate import dispatch_model
    from accelerate.hooks import add_hook_to_module
    from accelerate.utils import extract_submodules_state_dict

    from hooked_attn.scale.offload import FolderWeights

    if hasattr(model, "_hf_hook"):
        raise ValueError(f"the model is already dispatched (device map {device_map_of(model)}); load it again to "
                         "place it differently")
    full: DeviceMap = {unit: normalize_device(d, f"device_map[{unit!r}]") for unit, d in device_map.items()}
    missing = [u for u in placement_units(model) if u not in full]
    if missing:
        raise ValueError(f"the device map gives no device to {missing[:4]}: plan it with plan_device_map")
    check_devices_exist(full)
    disk = [unit for unit, d in full.items() if d == "disk"]
    if disk and offload_folder is None:
        raise ValueError(f"the device map sends {disk[:4]} to 'disk': pass offload_folder=")
    main = main_device(full) if execution_device is None else normalize_device(execution_device, "execution_device")
    if main == "disk":
        raise ValueError("execution_device='disk': weights can wait on disk, computation cannot")
    check_devices_exist({"execution_device": main})
    weights: Mapping[str, torch.Tensor] | None = None
    if disk:
        # Offloaded weights come from a mapping accelerate reads for every forward: the folder's for
        # "disk" units, the model's own for "cpu" units computing on an accelerator.
        in_ram = [unit for unit, d in full.items() if d == "cpu"] if main != "cpu" else []
        on_disk = FolderWeights(offload_folder, disk, getattr(model, "cfg", None))  # type: ignore[arg-type]
        on_disk.check_fits(dict(model.named_parameters()))
        weights = _Both(on_disk, extract_submodules_state_dict(model.state_dict(), in_ram) if in_ram else {})
    # offload_index={} (not None) keeps accelerate from writing the disk units to its own .dat files.
    with _quiet_offload_warning(offloaded=bool(disk) or (main != "cpu" and "cpu" in full.values())):
        dispatch_model(model, dict(full), main_device=main, state_dict=weights,
                       offload_index={} if weights is not None else None, force_hooks=True)
    mover = _ContextMover()
    for unit, device in full.items():
        if unit.startswith("blocks."):
            run_on = torch_device(main if device in ("cpu", "disk") else device)
            add_hook_to_module(model.get_submodule(unit), _context_hook(mover, run_on), append=True)
    add_hook_to_module(model, _release_hook(mover), append=True)
    model._dispatched_device = torch_device(main)  # what model.device reports: where inputs go
    _refuse_moves(model, full, main)
    return model


def _refuse_moves(model: nn.Module, device_map: Mapping[str, Device], main: Device) -> None:
    """Make ``.to()``, ``.cuda()``, ``.half()``... (everything that goes through ``nn.Module._apply``) on
    the model or any module in it refuse to change a weight's device or dtype: accelerate's hooks would go
    on moving inputs to the old devices and casting what they read from disk to the new dtype, and a
    unit on disk (its weights on ``meta``) would fail halfway, with the units before it moved already.
    A call that changes nothing (``model.to(model.device)``) is allowed and returns the module."""
    def computes_on(unit_device: Device) -> torch.device:
        offloaded = unit_device == "disk" or (unit_device == "cpu" and main != "cpu")
        return torch_device(main if offloaded else unit_device)

    # By name: accelerate's hooks replace the parameter objects of offloaded units at every forward.
    where = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        unit = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        where[name] = (computes_on(device_map[unit]), p.dtype)

    def refusing(module: nn.Module, prefix: str) -> Any:
        def _apply(fn: Any, recurse: bool = True) -> nn.Module:
            for name, p in module.named_parameters(prefix=prefix):
                device, dtype = where.get(name, (p.device, p.dtype))
                try:
                    moved = fn(torch.empty(0, device=device, dtype=dtype))
                except Exception:  # noqa: BLE001 (e.g. .cuda() without CUDA: a change, refused below)
                    moved = None
                if moved is None or moved.device != device or moved.dtype != dtype:
                    raise ValueError(
                        f"the model is spread over devices by a device map ({sorted(set(map(str, device_map.values())))}"
                        "); it cannot be moved or cast (.to, .cuda, .half...) as a whole: load it again with "
                        "from_pretrained(..., device_map=..., dtype=...) instead")
            return module
        return _apply

    for prefix, module in model.named_modules():
        module._apply = refusing(module, prefix)  # type: ignore[method-assign]


def device_map_of(model: nn.Module) -> DeviceMap:
    """The device map a dispatched model was placed with ({} when it was not)."""
    return dict(getattr(model, "hf_device_map", {}))


def plan_for_model(
    meta: nn.Module, device_map: Any, max_memory: Mapping[Device, int | str] | None, dtype: torch.dtype,
    offload_folder: str | Path | None,
) -> DeviceMap:
    """The device map ``from_pretrained`` will use, planned on a ``meta`` model (built from the config
    before any weight is read), so that a bad map fails before anything is loaded."""
    from hooked_attn.scale.placement import plan_device_map

    plan = plan_device_map(meta, device_map, max_memory=max_memory, dtype=dtype)
    check_devices_exist(plan)
    disk = [unit for unit, d in plan.items() if d == "disk"]
    if disk and offload_folder is None:
        raise ValueError(f"the device map sends {disk[:4]} to 'disk' (they fit in no max_memory budget): pass "
                         "offload_folder= to keep them there")
    return plan

