"""Reading HF checkpoints one tensor at a time: a lazy mapping over safetensors files, and ``.bin`` files.

``LazySafetensors`` parses each file's header once and reads a tensor's bytes only when a converter asks
for it, straight into a fresh tensor (converted to the target dtype at once). Nothing is memory-mapped, so
what a load keeps resident is exactly the tensors still referenced: a converted, processed model is never
held twice. The format (a little-endian u64 header length, a JSON header of ``{name: {dtype, shape,
data_offsets}}``, then the data) is checked as it is read, and every error names the file and the tensor.
"""

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100_000_000  # the format's own bound on the JSON header
_CHUNK_ELEMENTS = 1 << 21  # a dtype conversion reads through a buffer of this many elements


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated or in a format this reader does not know."""


class LazySafetensors(Mapping[str, Tensor]):
    """Every tensor of a (possibly sharded) safetensors checkpoint, read on access.

    Floating-point tensors come back in ``dtype`` when given (one conversion per tensor, while it is
    read); integer and boolean tensors keep theirs. Each access reads the file again and returns a tensor
    nobody else holds.
    """

    def __init__(self, files: list[Path], dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self._chunk: Tensor | None = None
        self._where: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for path in files:
            for name, entry in _read_header(path).items():
                if name in self._where:
                    raise CheckpointError(f"{str(path)!r}: tensor {name!r} is also in {str(self._where[name][0])!r}")
                self._where[name] = (path, *entry)

    def __getitem__(self, key: str) -> Tensor:
        path, dtype, shape, start, end = self._where[key]
        target = self.dtype if self.dtype is not None and dtype.is_floating_point and dtype != self.dtype else dtype
        tensor = torch.empty(shape, dtype=target)
        got = 0
        with path.open("rb") as f:
            f.seek(start)
            if not tensor.numel():
                pass
            elif target == dtype:  # straight into the tensor
                got = f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            else:  # through a bounded buffer, converting as it goes: never a full-size copy in the file's dtype
                flat = tensor.view(-1)
                buffer = self._buffer(dtype)[:min(flat.numel(), _CHUNK_ELEMENTS)]
                for at in range(0, flat.numel(), buffer.numel()):
                    part = buffer[:min(buffer.numel(), flat.numel() - at)]
                    n = f.readinto(memoryview(part.view(torch.uint8).numpy()))
                    got += n
                    if n != part.numel() * part.element_size():
                        break
                    flat[at:at + part.numel()].copy_(part)
        if got != end - start:
            raise CheckpointError(f"{str(path)!r} is truncated: tensor {key!r} needs {end - start} bytes, {got} are there")
        return tensor

    def _buffer(self, dtype: torch.dtype) -> Tensor:
        """The conversion buffer for the file's ``dtype``, made once and reused for every tensor: a fresh
        one per tensor fragments glibc's heap, and the load's RSS grows by a buffer per weight."""
        if self._chunk is None or self._chunk.dtype != dtype:
            self._chunk = torch.empty(_CHUNK_ELEMENTS, dtype=dtype)
        return self._chunk

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def meta(self, key: str) -> Tensor:
        """A ``meta`` tensor with the shape and dtype ``self[key]`` has; nothing is read."""
        _, dtype, shape, _, _ = self._where[key]
        target = self.dtype if self.dtype is not None and dtype.is_floating_point else dtype
        return torch.empty(shape, dtype=target, device="meta")

    def nbytes(self, key: str) -> int:
        """Bytes of ``key`` as stored in the file."""
        _, _, _, start, end = self._where[key]
        return end - start


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """{name: (dtype, shape, absolute start, absolute end)} from a safetensors file's header, checked
    against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {size} bytes, shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"cannot read safetensors file {str(path)!r}: its header claims {n} bytes and the "
                                  f"file has {size}; the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_refuse_duplicate_keys)
        except _DuplicateKey as err:
            raise CheckpointError(f"safetensors file {str(path)!r}: its header names tensor {err.args[0]!r} twice") from err
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read safetensors file {str(path)!r}: its header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors file {str(path)!r}: its header is not a JSON object")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"safetensors file {str(path)!r}: bad header entry for {name!r}: {entry!r} "
                                  f"({type(err).__name__}: {err})") from err
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or begin < 0 or end < begin:
            raise CheckpointError(f"safetensors file {str(path)!r}: tensor {name!r} of shape {shape} {entry['dtype']} "
                                  f"needs {expected} bytes, its offsets {begin}..{end} give {end - begin}")
        if 8 + n + end > size:
            raise CheckpointError(f"cannot read safetensors file {str(path)!r}: it is truncated (tensor {name!r} ends "
                                  f"at byte {8 + n + end}, the file has {size})")
        out[name] = (dtype, shape, 8 + n + begin, 8 + n + end)
    _check_layout(path, out, 8 + n, size)
    return out


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _check_layout(path: Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], data_start: int,
                  size: int) -> None:
    """The tensors must tile the data region exactly, in order of their offsets: no overlap, no gap, nothing
    after the last one (what the safetensors library itself requires). An overlap or a shifted offset would
    otherwise load as another tensor's bytes."""
    at = data_start
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else "leaves a gap before it"
            raise CheckpointError(f"safetensors file {str(path)!r}: tensor {name!r} starts at data offset "
                                  f"{begin - data_start}, expected {at - data_start}: it {what} (corrupt offsets)")
        at = end
    if at != size:
        raise CheckpointError(f"safetensors file {str(path)!r}: the tensors end at byte {at}, but the file has "
                              f"{size} bytes (corrupt offsets or trailing data)")


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors shards, from its index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{str(index)!r} is not a safetensors index ({type(err).__name__}: {err})") from err
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(index)!r} names shards that are not in the folder: {missing}")
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def read_torch_bin(folder: Path, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Every tensor of a (possibly sharded) ``pytorch_model*.bin`` checkpoint, loaded as plain tensors."""
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{str(folder)!r} has no weights (.safetensors or pytorch_model.bin)")
    sd: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        try:
            part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {err}") from err
        if not isinstance(part, dict):
            raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(part).__name__}, not a state dict")
        for key, tensor in part.items():
            if key in sd:
                raise CheckpointError(f"{str(path)!r}: tensor {key!r} is also in {str(origin[key])!r}; "
                                      "a key may appear in one shard only")
            origin[key] = path
            floating = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
            sd[key] = tensor.to(dtype) if floating else tensor
    return sd


def check_gguf(path: Path) -> None:
    """Refuse a GGUF file that is truncated or corrupt, naming it (the reader's own struct and reshape errors
    do not say which file, or that it is cut short)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is unusable
        raise CheckpointError(f"cannot read GGUF file {str(path)!r} ({path.stat().st_size} bytes): it is truncated "
                              f"or corrupt ({type(err).__name__}: {err})") from err
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(f"GGUF file {str(path)!r} is truncated: tensor {tensor.name!r} ends at byte "
                                  f"{tensor.data_offset + tensor.n_bytes}, the file has {size}")
