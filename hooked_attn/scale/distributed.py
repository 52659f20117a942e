"""Patching sweeps and activation harvests split over torch.distributed ranks (torchrun), gathered so
that every rank ends with exactly what one process would have computed.

Launch with ``torchrun --nproc-per-node N script.py``; without a process group (plain ``python``)
every function runs the whole job in one process. gloo on CPUs, NCCL on GPUs (``init_distributed``).
"""

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hooked_attn.cache import ActivationCache
from hooked_attn.hook_points import NamesFilter
from hooked_attn.model import HookedTransformer
from hooked_attn.patching import Metric, PatchSetter, generic_activation_patch


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (its environment variables), once; return
    ``(rank, world_size)``. Outside torchrun: ``(0, 1)`` and no group. Default backend: NCCL when
    CUDA is there (each rank then uses GPU ``LOCAL_RANK``), gloo otherwise."""
    import os

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` without a process group)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _sweep_shape(model: HookedTransformer, activation_name: str, index_axis_names: Sequence[str],
                 n_pos: int) -> tuple[int, ...]:
    """The result shape ``generic_activation_patch`` gives for these axes (it validates the names)."""
    cfg = model.cfg
    heads = cfg.n_kv_heads if activation_name in ("k", "v", "rot_k") else cfg.n_heads
    sizes = {"layer": cfg.n_layers, "pos": n_pos, "dest_pos": n_pos, "src_pos": n_pos,
             "head_index": heads, "head": heads}
    unknown = [a for a in index_axis_names if a not in sizes]
    if unknown:
        raise ValueError(f"unknown index axes {unknown}; known: {sorted(sizes)}")
    return tuple(sizes[a] for a in index_axis_names)


def sharded_activation_patch(
    model: HookedTransformer, corrupted_tokens: Tensor, clean_cache: ActivationCache, patching_metric: Metric,
    patch_setter: PatchSetter, activation_name: str, index_axis_names: Sequence[str], **kwargs: Any,
) -> Tensor:
    """``hooked_attn.patching.generic_activation_patch`` over every index of ``index_axis_names``, with
    the indices dealt out to the ranks in turn (rank r takes indices r, r+N, ...: every rank gets
    early and late layers alike) and the metrics gathered back into the full result on every rank.

    Every rank must hold the same model, tokens and clean cache. Other keyword arguments go to
    ``generic_activation_patch`` (``batch_size``, ``attention_mask``...).
    """
    if not index_axis_names or index_axis_names[0] != "layer":
        raise ValueError("the first index axis must be 'layer'")
    shape = _sweep_shape(model, activation_name, index_axis_names, corrupted_tokens.shape[-1])
    rank, world = rank_and_world()
    indices = list(itertools.product(*(range(n) for n in shape)))
    mine = indices[rank::world]
    values = (generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, patch_setter,
                                       activation_name, index_axis_names=index_axis_names, index_df=mine,
                                       **{"progress": False, **kwargs})
              if mine else torch.empty(0, dtype=torch.float64))
    out = torch.empty(len(indices), dtype=torch.float64)
    for r, part in enumerate(_all_gather(values.cpu())):
        out[r::world] = part
    return out.reshape(shape)


def harvest_activations(
    model: HookedTransformer, tokens: Tensor, names_filter: NamesFilter, *, batch_size: int = 8,
    device: torch.device | str = "cpu", attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """This rank's share of an activation harvest: ``run_with_cache`` over its contiguous slice of
    ``tokens``' rows, ``batch_size`` rows per forward, stored on ``device``. Combine the ranks'
    shares with ``gather_harvest``.

    Returns:
        hook name -> ``[rows_of_this_rank, ...]`` activations (``ActivationCache`` shapes).
    """
    rank, world = rank_and_world()
    rows = tokens.shape[0]
    start, stop = rank * rows // world, (rank + 1) * rows // world
    parts: dict[str, list[Tensor]] = {}
    for first in range(start, stop, batch_size):
        last = min(first + batch_size, stop)
        mask = None if attention_mask is None else attention_mask[first:last]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[first:last], names_filter=names_filter, device=device,
                                            attention_mask=mask, return_type=None)
        for name, act in cache.items():
            parts.setdefault(name, []).append(act)
    if not parts:  # no rows for this rank: names and trailing shapes from a one-row run
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[:1], names_filter=names_filter, device=device, return_type=None)
        return {name: act[:0] for name, act in cache.items()}
    return {name: torch.cat(acts) for name, acts in parts.items()}


def gather_harvest(mine: dict[str, Tensor], dst: int | None = None) -> dict[str, Tensor] | None:
    """The whole harvest, rows in the order of the original ``tokens``: on every rank (``dst=None``),
    or only on rank ``dst`` (the others get None, and send their share there alone)."""
    rank, world = rank_and_world()
    if world == 1:
        return mine
    shares = {name: t.cpu() for name, t in mine.items()}
    if dst is None:
        gathered = _all_gather(shares)
    else:
        gathered = [None] * world if rank == dst else None
        dist.gather_object(shares, gathered, dst=dst)
        if rank != dst:
            return None
    return {name: torch.cat([share[name] for share in gathered]) for name in mine}  # type: ignore[index]


def harvest_to_store(model: HookedTransformer, tokens: Tensor, hooks: Sequence[str], out_dir: str | Path,
                     **kwargs: Any) -> Path:
    """``hooked_attn.saes.store.harvest_activations`` with the shards dealt out to the ranks (shard i to
    rank i mod N): the folder ends as one process would write it, and resumes the same way.

    Rank 0 first writes the manifest (or checks the folder's) and clears stale partial files; the
    others wait, then every rank writes its shards. Keyword arguments go to the store.
    """
    from hooked_attn.saes.store import MANIFEST
    from hooked_attn.saes.store import harvest_activations as store_harvest

    rank, world = rank_and_world()
    kwargs = {"progress": False, **kwargs}
    error = None
    if rank == 0:
        try:
            store_harvest(model, tokens, hooks, out_dir, shards=[], **kwargs)
        except Exception as err:  # every rank must learn of it, or the others would wait forever
            error = f"{type(err).__name__}: {err}"
    errors = [e for e in _all_gather(error) if e is not None]
    if errors:
        raise ValueError(f"rank 0 could not start the harvest in {str(out_dir)!r}: {errors[0]}")
    n_shards = json.loads((Path(out_dir) / MANIFEST).read_text())["n_shards"]
    store_harvest(model, tokens, hooks, out_dir, shards=range(rank, n_shards, world), **kwargs)
    _all_gather(None)  # a barrier: the folder is complete on every rank's return
    return Path(out_dir)
