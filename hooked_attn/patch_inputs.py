"""Input handling for activation and path patching: the checks on sweeps, tokens and clean caches
that run before any forward pass (patching.py holds the computation)."""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hooked_attn.cache import ActivationCache
from hooked_attn.model import HookedTransformer
from hooked_attn.tokens import PADDING_MASK_ATTR
from hooked_attn.utils import get_act_name


def auto_batch_size(model: HookedTransformer, tokens: Tensor) -> int:
    # Keep a forward at about 4096 token positions, and never below one variant.
    return max(1, 4096 // max(1, tokens.numel()))


def check_clean_cache(model: HookedTransformer, clean_cache: Any, reference: ActivationCache | None,
                      names: Sequence[str], what: str, *, batch: int | None = None) -> None:
    """Refuse a clean cache that cannot be patched into this run: made by another model, without a batch
    axis, missing a name, holding another ``batch`` (checked before any forward), or holding activations
    whose shape (batch, positions) differs from the ``reference`` run's."""
    cache_model = getattr(clean_cache, "model", model)
    if cache_model is not model:
        raise ValueError(f"the clean cache was made by another model ({cache_model!r}); run the clean input through "
                         "this model (model.run_with_cache) to patch into it")
    if not getattr(clean_cache, "has_batch_dim", True):
        raise ValueError("the clean cache was made with remove_batch_dim=True; patching needs the batch axis")
    for name in names:
        if name not in clean_cache:
            raise KeyError(f"the clean cache has no {name!r}: cache it (names_filter) or cache everything")
        clean = clean_cache[name]
        if batch is not None and clean.shape[0] != batch:
            raise ValueError(f"the clean cache's {name} has batch {clean.shape[0]}, but {what} has batch {batch}: "
                             "the clean and corrupted runs need the same batch and positions")
        if reference is None:
            continue
        here = reference[name]
        if clean.shape != here.shape:
            raise ValueError(f"the clean cache's {name} has shape {tuple(clean.shape)}, but on {what} it has shape "
                             f"{tuple(here.shape)}: the clean and corrupted runs need the same batch and positions")


def _index(value: Any) -> int:
    """One entry of an ``index_df`` row: an integer (1.7 used to be truncated to 1)."""
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"index_df entries must be integers, got {value!r}")
    return int(value)


def check_path_heads(model: HookedTransformer, sender_heads: Sequence[tuple[int, int]],
                     receivers: Sequence[str | tuple[str, int]]) -> None:
    """Refuse path-patching senders and receiver heads outside the model (a sender in layer 99 was
    silently never patched)."""
    cfg = model.cfg
    for layer, head in sender_heads:
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(f"sender head ({layer}, {head}) is outside the model: layers 0..{cfg.n_layers - 1}, "
                             f"heads 0..{cfg.n_heads - 1}")
    for receiver in receivers:
        if isinstance(receiver, tuple):
            name, head = receiver
            n = cfg.n_kv_heads if name.rsplit(".", 1)[-1] in ("hook_k", "hook_v", "hook_rot_k") else cfg.n_heads
            if not 0 <= head < n:
                raise ValueError(f"receiver head {head} of {name!r} is outside 0..{n - 1}")


@dataclass(frozen=True)
class SweepPlan:
    """A checked activation-patching sweep: what runs, before anything has."""

    tokens: Tensor  # [batch pos]
    attention_mask: Tensor | None
    indices: list[tuple[int, ...]]  # one row per patched variant, layer first
    shape: tuple[int, ...]  # the result's shape
    names: dict[int, str]  # layer -> the hook patched there
    chunk: int  # variants per forward


def plan_sweep(
    model: HookedTransformer, corrupted_tokens: Tensor, clean_cache: ActivationCache, activation_name: str,
    index_axis_names: Sequence[str] | None, index_df: Any, batch_size: int | None, attention_mask: Tensor | None,
) -> SweepPlan:
    """The sweep ``generic_activation_patch`` will run, after every check on its inputs that needs no
    forward pass: axes, index rows in range, hook names, batch size, attention mask, and the clean
    cache's model, names and batch."""
    cfg = model.cfg
    n_pos = corrupted_tokens.shape[-1]
    heads = cfg.n_kv_heads if activation_name in ("k", "v", "rot_k") else cfg.n_heads
    sizes = {"layer": cfg.n_layers, "pos": n_pos, "dest_pos": n_pos, "src_pos": n_pos, "head_index": heads, "head": heads}
    if index_df is not None:
        rows = index_df.itertuples(index=False) if hasattr(index_df, "itertuples") else index_df
        indices = [tuple(_index(x) for x in row) for row in rows]
        if index_axis_names is None:
            index_axis_names = list(index_df.columns) if hasattr(index_df, "columns") else None
        shape: tuple[int, ...] = (len(indices),)
    elif not index_axis_names:
        raise ValueError("give index_axis_names (e.g. ['layer', 'pos']) or index_df")
    if not index_axis_names or index_axis_names[0] != "layer":
        raise ValueError("the first index axis must be 'layer'")
    unknown = [a for a in index_axis_names if a not in sizes]
    if unknown:
        raise ValueError(f"unknown index axes {unknown}; known: {sorted(sizes)}")
    if index_df is None:
        shape = tuple(sizes[a] for a in index_axis_names)
        indices = list(itertools.product(*(range(n) for n in shape)))
    for row in indices:
        if len(row) != len(index_axis_names) or any(not 0 <= i < sizes[a] for i, a in zip(row, index_axis_names)):
            raise ValueError(f"index row {row} does not fit the axes {list(index_axis_names)} of sizes "
                             f"{[sizes[a] for a in index_axis_names]}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r}: give a positive number of variants per forward, or None")
    tokens = corrupted_tokens if corrupted_tokens.ndim == 2 else corrupted_tokens[None]
    if attention_mask is None:  # ids that to_tokens padded carry their mask; the repeats below would not
        attention_mask = getattr(corrupted_tokens, PADDING_MASK_ATTR, None)
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(tokens.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the tokens {tuple(tokens.shape)}")
    names = {layer: get_act_name(activation_name, layer) for layer in sorted({index[0] for index in indices})}
    for name in names.values():
        if name not in model.hook_dict:
            model._raise_unknown_hook(name)
    check_clean_cache(model, clean_cache, None, sorted(set(names.values())), "corrupted_tokens",
                      batch=tokens.shape[0])
    return SweepPlan(tokens=tokens, attention_mask=attention_mask, indices=indices, shape=shape, names=names,
                      chunk=batch_size or auto_batch_size(model, tokens))
