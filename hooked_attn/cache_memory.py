"""What cached activations keep alive: byte counts that count each shared storage once, and the exact
estimate of what ``run_with_cache`` will store for a longer input (``HookedTransformer.estimate_cache_memory``).
``hooked_attn.cache`` re-exports these names."""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


def storage_nbytes(tensors: Iterable[Tensor]) -> int:
    """The bytes the tensors keep alive: each distinct storage counted once, whole.

    Cached activations often share storage (``blocks.0.hook_resid_post`` is ``blocks.1.hook_resid_pre``),
    and a view keeps its whole storage alive.
    """
    seen: dict[tuple[torch.device, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class CacheMemory:
    """What ``run_with_cache`` will store for an input: each entry's shape and dtype, and in all
    ``nbytes``, the value ``ActivationCache.nbytes`` will report (shared storage counted once)."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    nbytes: int

    def __str__(self) -> str:
        return f"{len(self.shapes)} activations, {self.nbytes / 2**20:.2f} MiB"


def estimate_cache_memory(run: Callable[[int], Mapping[str, Tensor]], n_pos: int) -> CacheMemory:
    """Scale two short runs up to ``n_pos`` positions, exactly.

    ``run(p)`` caches the first ``p`` positions. Runs at 2 and 3 positions tell which axes of each
    entry grow with the sequence (by one per position: ``pos``, ``q_pos``, ``k_pos``), which entries
    share a storage, and each storage's size relative to its largest entry.
    """
    if n_pos <= 3:
        cache = run(n_pos)
        return CacheMemory({k: tuple(t.shape) for k, t in cache.items()}, {k: t.dtype for k, t in cache.items()},
                           storage_nbytes(cache.values()))
    short, longer = run(2), run(3)
    shapes = {}
    for name, a in short.items():
        b = longer[name]
        if a.ndim != b.ndim or any(y - x not in (0, 1) for x, y in zip(a.shape, b.shape)):
            raise RuntimeError(f"cannot scale {name}: its shape went from {tuple(a.shape)} to {tuple(b.shape)}")
        shapes[name] = tuple(x + (n_pos - 2) * (y - x) for x, y in zip(a.shape, b.shape))
    total = 0
    for group_short, group_long in zip(_storage_groups(short), _storage_groups(longer), strict=True):
        if group_short != group_long:
            raise RuntimeError(f"entries share storage differently at 2 and 3 positions: {group_short}, {group_long}")
        largest = max(group_short, key=lambda name: short[name].numel())
        ratio = [storage_nbytes([c[largest]]) / (c[largest].numel() * c[largest].element_size()) for c in (short, longer)]
        if ratio[0] != ratio[1]:
            raise RuntimeError(f"the storage behind {largest} does not scale with it")
        n_elements = torch.Size(shapes[largest]).numel()
        total += round(ratio[0] * n_elements * short[largest].element_size())
    return CacheMemory(shapes, {k: t.dtype for k, t in short.items()}, total)


def _storage_groups(cache: Mapping[str, Tensor]) -> list[list[str]]:
    """The entries of ``cache`` grouped by shared storage, in first-seen order."""
    groups: dict[tuple[torch.device, int], list[str]] = {}
    for name, t in cache.items():
        groups.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
    return list(groups.values())
