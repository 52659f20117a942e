"""Models larger than memory: processed weights in a safetensors folder, one file per block, read back
block by block by accelerate's offload hooks during each forward.

The folder holds ``hooked_attn_offload.json`` (the model config and where each weight is), one
``<unit>.safetensors`` per placement unit (``embed``, ``blocks.0``, ...), and the tokenizer if the
model had one. It is written once, after weight processing; loading it never processes again.
"""

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hooked_attn import config as config_module
from hooked_attn.config import ModelConfig
from hooked_attn.scale.placement import Device, placement_units

MANIFEST = "hooked_attn_offload.json"
TOKENIZER = "tokenizer"


def _encode(value: Any) -> Any:
    """JSON for a config value: dataclasses and tuples tagged so that ``_decode`` rebuilds them exactly."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__dataclass__": type(value).__name__, **fields}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot write config value {value!r} ({type(value).__name__}) to {MANIFEST}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if isinstance(value, dict) and "__dataclass__" in value:
        cls = getattr(config_module, value["__dataclass__"], None)
        if cls is None or not dataclasses.is_dataclass(cls):
            raise ValueError(f"{MANIFEST} names {value['__dataclass__']!r}, which is not a config class of hooked_attn")
        return cls(**{k: _decode(v) for k, v in value.items() if k != "__dataclass__"})
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _unit_params(model: nn.Module, unit: str) -> dict[str, torch.Tensor]:
    return {f"{unit}.{name}": p for name, p in model.get_submodule(unit).named_parameters()}


def save_offloaded(model: nn.Module, folder: str | Path, units: list[str] | None = None) -> Path:
    """Write ``model``'s weights (as they are: processed or not) to ``folder``, one safetensors file per
    placement unit (by default every unit), with the config and the tokenizer. Returns the folder.

    Units already written there are written again. Weights on the ``meta`` device cannot be saved.
    """
    folder = Path(folder)
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    chosen = placement_units(model) if units is None else units
    unknown = sorted(set(chosen) - set(placement_units(model)))
    if unknown:
        raise ValueError(f"{unknown} are not placement units of the model: {placement_units(model)}")
    for unit in chosen:
        on_meta = [n for n, p in _unit_params(model, unit).items() if p.device.type == "meta"]
        if on_meta:
            raise ValueError(f"cannot save {unit!r}: its weights {on_meta[:3]} are on the meta device (not loaded)")
    entries = {}
    for unit in chosen:
        entries |= write_unit(folder, unit, _unit_params(model, unit))
    write_manifest(folder, cfg, entries, getattr(model, "tokenizer", None))
    return folder


def write_unit(folder: str | Path, unit: str, params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Write one unit's weights to ``folder/<unit>.safetensors``; return their manifest entries (for
    ``write_manifest``). Each weight is stored in its storage order and read back with the same view."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # A per-head weight (W_Q [head d_model d_head]) is a view of a fused storage layout; the file
    # holds that storage, and reading it back applies the same view, so the forward runs as in memory.
    layouts = {name: _storage_order(p) for name, p in params.items()}
    save_file({n: p.detach().permute(layouts[n]).to("cpu").contiguous() for n, p in params.items()},
              folder / f"{unit}.safetensors")
    return {name: {"file": f"{unit}.safetensors", "dtype": str(p.dtype).removeprefix("torch."),
                   "shape": list(p.shape), "view": _inverse(layouts[name])} for name, p in params.items()}


def write_manifest(folder: str | Path, cfg: ModelConfig, entries: Mapping[str, Any], tokenizer: Any = None) -> None:
    """Write (or update) the folder's manifest with the config and ``entries`` of ``write_unit``, and the
    tokenizer when there is one. Entries of weights already in the manifest are replaced."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    weights = json.loads(manifest_path.read_text())["weights"] if manifest_path.is_file() else {}
    manifest = {"config": _encode(cfg), "weights": {**weights, **entries}}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / TOKENIZER)


def _storage_order(t: torch.Tensor) -> list[int]:
    """The permutation of ``t``'s dims that is contiguous in memory (outermost stride first)."""
    return sorted(range(t.ndim), key=lambda d: -t.stride(d))


def _inverse(order: list[int]) -> list[int]:
    return sorted(range(len(order)), key=lambda d: order[d])


class FolderWeights(Mapping[str, torch.Tensor]):
    """The weights of some units of an offload folder, each read from its file when asked (what
    accelerate's offload hooks call for every forward), in the layout the model's parameter has."""

    def __init__(self, folder: str | Path, units: list[str]) -> None:
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(f"{str(folder)!r} holds no offloaded model ({MANIFEST} is missing): write it with "
                             "save_offloaded or from_pretrained(..., offload_folder=)")
        weights = json.loads(manifest_path.read_text())["weights"]
        self._folder = folder
        self._info = {name: info for name, info in weights.items()
                      if any(name.startswith(unit + ".") for unit in units)}
        absent = [u for u in units if not any(name.startswith(u + ".") for name in self._info)]
        if absent:
            raise ValueError(f"{str(folder)!r} does not hold the weights of {absent[:4]}")

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self._info[name]
        with safe_open(self._folder / info["file"], framework="pt") as f:
            return f.get_tensor(name).permute(info["view"])

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)
