"""Models larger than memory: processed weights in a safetensors folder, one file per block, read back
block by block by accelerate's offload hooks during each forward.

The folder holds ``hooked_attn_offload.json`` (the model config and where each weight is), one
``<unit>.safetensors`` per placement unit (``embed``, ``blocks.0``, ...), and the tokenizer if the
model had one. It is written once, after weight processing; loading it never processes again. Which
files are whose, and what writing over an earlier model does: ``folder.py``.
"""

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hooked_attn import config as config_module
from hooked_attn.config import ModelConfig
from hooked_attn.scale.folder import WRITE_ID, FolderWriter, OffloadFolderError, check_file, read_complete
from hooked_attn.scale.placement import placement_units


def _encode(value: Any) -> Any:
    """JSON for a config value: dataclasses and tuples tagged so that ``_decode`` rebuilds them exactly."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__dataclass__": type(value).__name__, **fields}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot write config value {value!r} ({type(value).__name__}) to an offload manifest")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if isinstance(value, dict) and "__dataclass__" in value:
        cls = getattr(config_module, value["__dataclass__"], None)
        if cls is None or not dataclasses.is_dataclass(cls):
            raise ValueError(f"the offload manifest names {value['__dataclass__']!r}, which is not a config class of hooked_attn")
        return cls(**{k: _decode(v) for k, v in value.items() if k != "__dataclass__"})
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _unit_params(model: nn.Module, unit: str) -> dict[str, torch.Tensor]:
    return {f"{unit}.{name}": p for name, p in model.get_submodule(unit).named_parameters()}


def save_offloaded(model: nn.Module, folder: str | Path, units: list[str] | None = None) -> Path:
    """Write ``model``'s weights (as they are: processed or not) to ``folder``, one safetensors file per
    placement unit (by default every unit), with the config and the tokenizer. Returns the folder.

    A model written there before is replaced: its files that this one does not have are removed (only
    files its manifest lists). Weights on the ``meta`` device cannot be saved.

    Raises:
        OffloadFolderError: ``folder`` is a file or cannot be written, or holds files of someone else that
            this would overwrite (checked before anything is written).
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
    tokenizer = getattr(model, "tokenizer", None)
    writer = FolderWriter(folder, chosen, tokenizer=tokenizer is not None)
    entries = {}
    for unit in chosen:
        entries |= write_unit(writer, unit, _unit_params(model, unit))
    write_manifest(writer, cfg, entries, tokenizer)
    return folder


def write_unit(writer: FolderWriter, unit: str, params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Write one unit's weights with ``writer``; return their manifest entries (for ``write_manifest``).
    Each weight is stored in its storage order and read back with the same view."""
    # A per-head weight (W_Q [head d_model d_head]) is a view of a fused storage layout; the file
    # holds that storage, and reading it back applies the same view, so the forward runs as in memory.
    layouts = {name: _storage_order(p) for name, p in params.items()}
    file = writer.save(unit, {n: p.detach().permute(layouts[n]).to("cpu").contiguous() for n, p in params.items()})
    return {name: {"file": file, "dtype": str(p.dtype).removeprefix("torch."),
                   "shape": list(p.shape), "view": _inverse(layouts[name])} for name, p in params.items()}


def write_manifest(writer: FolderWriter, cfg: ModelConfig, entries: Mapping[str, Any], tokenizer: Any = None) -> None:
    """Finish ``writer``'s folder: the config, the ``entries`` of ``write_unit`` and the tokenizer."""
    writer.finish({"config": _encode(cfg), "weights": dict(entries)}, tokenizer)


def read_config(manifest: Mapping[str, Any]) -> ModelConfig:
    return _decode(manifest["config"])


def _storage_order(t: torch.Tensor) -> list[int]:
    """The permutation of ``t``'s dims that is contiguous in memory (outermost stride first)."""
    return sorted(range(t.ndim), key=lambda d: -t.stride(d))


def _inverse(order: list[int]) -> list[int]:
    return sorted(range(len(order)), key=lambda d: order[d])


class FolderWeights(Mapping[str, torch.Tensor]):
    """The weights of some units of an offload folder, each read from its file when asked (what
    accelerate's offload hooks call for every forward), in the layout the model's parameter has.

    Every file is checked against the manifest when the mapping is made (``folder.check_file``), and its
    write id again at every read: a folder written over since, by this process or another, is refused
    rather than read as a mix of two models.
    """

    def __init__(self, folder: str | Path, units: list[str], cfg: ModelConfig | None = None) -> None:
        folder = Path(folder)
        manifest = read_complete(folder)
        self._folder, self._write_id = folder, manifest["write_id"]
        saved = read_config(manifest)
        if cfg is not None and cfg != saved:  # a model of another config: refused before its units are sought
            diff = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(saved, f.name)]
            raise ValueError(f"{str(folder)!r} holds a model of another config (fields {diff[:4]} differ)")
        self._info = {name: info for name, info in manifest["weights"].items()
                      if any(name.startswith(unit + ".") for unit in units)}
        absent = [u for u in units if not any(name.startswith(u + ".") for name in self._info)]
        if absent:
            raise ValueError(f"{str(folder)!r} does not hold the weights of {absent[:4]} (the device map it was "
                             "written with kept them off disk)")
        for file in sorted({info["file"] for info in self._info.values()}):
            check_file(folder, file, self._write_id, [n for n, info in self._info.items() if info["file"] == file])

    def check_fits(self, params: Mapping[str, torch.Tensor]) -> None:
        """Refuse a model whose parameters' shapes or dtypes differ from the folder's."""
        for name, info in self._info.items():
            p = params.get(name)
            if p is None or list(p.shape) != info["shape"] or str(p.dtype).removeprefix("torch.") != info["dtype"]:
                got = None if p is None else (list(p.shape), str(p.dtype).removeprefix("torch."))
                raise ValueError(f"{str(self._folder)!r} holds {name} as {info['shape']} {info['dtype']}; the model "
                                 f"has {got}: load the model in the folder's dtype (or with load_offloaded)")

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self._info[name]
        with safe_open(self._folder / info["file"], framework="pt") as f:
            if (f.metadata() or {}).get(WRITE_ID) != self._write_id:
                raise OffloadFolderError(f"{str(self._folder / info['file'])!r} was written over after this model "
                                         f"was loaded from {str(self._folder)!r}; load it again")
            return f.get_tensor(name).permute(info["view"])

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)
