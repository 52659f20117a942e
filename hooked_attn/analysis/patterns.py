"""Pure functions over attention patterns: rows, top-k keys, averages, entropy and a row-sum check.

A pattern is the post-softmax ``hook_pattern`` of one layer: ``[batch head q_pos k_pos]`` as
``cache["pattern", layer]`` stores it, or ``[head q_pos k_pos]`` from a cache without a batch axis.
Each function says which shapes it takes. Queries are aligned to the last keys (as in the model's
causal mask), so with a KV cache, where ``k_pos > q_pos``, query ``i`` sits at key position
``i + k_pos - q_pos``. Indices may be negative, counting from the end as in Python.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

PATTERN_AXES = "[batch head q_pos k_pos] or [head q_pos k_pos]"


def index_in_range(value: int, size: int, name: str, axis: str) -> int:
    """``value`` made non-negative, or a ValueError naming the argument and the axis's bound."""
    if not -size <= value < size:
        raise ValueError(f"{name}={value} is out of range: {axis} has size {size} (valid: {-size}..{size - 1})")
    return value % size


def as_batched(
    pattern: Float[Tensor, "*batch head q_pos k_pos"], name: str = "pattern",
) -> Float[Tensor, "batch head q_pos k_pos"]:
    """The pattern with a batch axis: ``[head q_pos k_pos]`` becomes a batch of one.

    Raises:
        ValueError: the pattern is not 3-D or 4-D (the message names ``name`` and its shape).
    """
    if pattern.ndim not in (3, 4):
        raise ValueError(f"{name} must be {PATTERN_AXES}, got shape {tuple(pattern.shape)} ({pattern.ndim}-D)")
    return pattern if pattern.ndim == 4 else pattern[None]


def _head_row(pattern: Tensor, query: int, batch: int) -> Tensor:
    """``[head k_pos]``: every head's row for one query of one sequence, indices validated."""
    full = as_batched(pattern)
    b = index_in_range(batch, full.shape[0], "batch", "batch")
    q = index_in_range(query, full.shape[2], "query", "q_pos")
    return full[b, :, q]


def query_distribution(
    pattern: Float[Tensor, "*batch head q_pos k_pos"], query: int, head: int, batch: int = 0,
) -> Float[Tensor, " k_pos"]:
    """How one head's query at position ``query`` spreads its attention over the keys.

    Args:
        pattern: ``[batch head q_pos k_pos]`` or ``[head q_pos k_pos]``.
        query: the query position (negative counts from the end).
        head: the head.
        batch: the sequence, for a batched pattern.
    """
    rows = _head_row(pattern, query, batch)
    return rows[index_in_range(head, rows.shape[0], "head", "head")]


def query_all_heads(
    pattern: Float[Tensor, "*batch head q_pos k_pos"], query: int, batch: int = 0,
) -> Float[Tensor, "head k_pos"]:
    """Every head's distribution over keys for one query, side by side (one row per head).

    Args:
        pattern: ``[batch head q_pos k_pos]`` or ``[head q_pos k_pos]``.
        query: the query position (negative counts from the end).
        batch: the sequence, for a batched pattern.
    """
    return _head_row(pattern, query, batch)


@dataclass(frozen=True)
class AttendedKey:
    """One key a query attends to: its position, the weight on it, and its token (None if unknown)."""

    position: int
    weight: float
    token: str | None = None


def _top_k(row: Tensor, k: int, str_tokens: Sequence[str] | None) -> list[AttendedKey]:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if str_tokens is not None and len(str_tokens) != row.shape[-1]:
        raise ValueError(f"str_tokens has {len(str_tokens)} tokens but the pattern has k_pos={row.shape[-1]} keys")
    weights, positions = row.float().topk(min(k, row.shape[-1]))
    return [AttendedKey(position=int(p), weight=float(w), token=None if str_tokens is None else str_tokens[int(p)])
            for w, p in zip(weights, positions)]


def top_k_keys(
    pattern: Float[Tensor, "*batch head q_pos k_pos"], query: int, head: int, k: int = 5,
    str_tokens: Sequence[str] | None = None, batch: int = 0,
) -> list[AttendedKey]:
    """The ``k`` keys one head's query attends to most, heaviest first (ties: lower position first).

    Args:
        pattern: ``[batch head q_pos k_pos]`` or ``[head q_pos k_pos]``.
        query: the query position (negative counts from the end).
        head: the head.
        k: how many keys (fewer when there are fewer keys).
        str_tokens: one string per key position, to label each key.
        batch: the sequence, for a batched pattern.
    """
    return _top_k(query_distribution(pattern, query, head, batch), k, str_tokens)


def top_k_per_head(
    pattern: Float[Tensor, "*batch head q_pos k_pos"], query: int, k: int = 5,
    str_tokens: Sequence[str] | None = None, batch: int = 0,
) -> list[list[AttendedKey]]:
    """``top_k_keys`` for every head at once: one list per head, in head order."""
    return [_top_k(row, k, str_tokens) for row in query_all_heads(pattern, query, batch)]


def head_mean(pattern: Float[Tensor, "*batch head q_pos k_pos"]) -> Float[Tensor, "*batch q_pos k_pos"]:
    """The average over heads: ``[batch q_pos k_pos]`` (or ``[q_pos k_pos]`` for an unbatched pattern).

    Each row of the average still sums to 1.
    """
    as_batched(pattern)  # validates the rank
    return pattern.mean(dim=-3)


def pattern_names(cache: Mapping[str, Tensor]) -> dict[int, str]:
    """Layer number -> hook name of every pattern the cache holds, in layer order.

    ``blocks.{L}.attn.hook_pattern`` for a ``HookedTransformer``; for a wrapped model (``wrap``), the
    position in its ``attention_layers`` (the order of its attention calls); otherwise every name
    ending in ``hook_pattern``, numbered in cache order.
    """
    blocks = {int(name.split(".")[1]): name for name in cache
              if name.startswith("blocks.") and name.endswith(".attn.hook_pattern")}
    if blocks:
        return dict(sorted(blocks.items()))
    layers = getattr(getattr(cache, "model", None), "attention_layers", None)
    if layers is not None:
        names = [f"{prefix}.hook_pattern" if prefix else "hook_pattern" for prefix in layers]
        return {layer: name for layer, name in enumerate(names) if name in cache}
    return dict(enumerate(name for name in cache if name.endswith("hook_pattern")))


def stack_patterns(
    cache: Mapping[str, Tensor], layers: Sequence[int] | None = None,
) -> Float[Tensor, "layer batch head q_pos k_pos"]:
    """The cached patterns of several layers, stacked: ``[layer batch head q_pos k_pos]``.

    Args:
        cache: an ``ActivationCache`` (or any mapping of hook name to tensor) holding
            ``blocks.{L}.attn.hook_pattern``, or a wrapped model's cache (see ``pattern_names``);
            a cache without a batch axis gives a batch of one.
        layers: which layers, in this order; by default every layer the cache holds, in order.

    Raises:
        KeyError: a requested layer's pattern is not in the cache, or the cache holds none.
        ValueError: the chosen layers' patterns differ in shape (pick layers of one shape).
    """
    names = pattern_names(cache)
    if layers is None:
        layers = list(names)
        if not layers:
            raise KeyError("the cache holds no attention patterns: run the model with "
                           "run_with_cache(..., names_filter=lambda name: name.endswith('hook_pattern'))")
    missing = [layer for layer in layers if layer not in names]
    if missing:
        expected = ", ".join(f"blocks.{layer}.attn.hook_pattern" for layer in missing)
        raise KeyError(f"the cache has no pattern for layers {missing}: {expected} (it holds layers {list(names)})")
    patterns = [as_batched(cache[names[layer]], f"pattern of layer {layer} ({names[layer]})") for layer in layers]
    shapes = {layer: tuple(p.shape) for layer, p in zip(layers, patterns)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the patterns of these layers differ in shape, so they cannot be stacked: {shapes}; "
                         "pass layers=[...] of one shape")
    return torch.stack(patterns)


def layer_mean(
    patterns: Float[Tensor, "layer batch head q_pos k_pos"] | Mapping[str, Tensor],
) -> Float[Tensor, "batch head q_pos k_pos"]:
    """The average over layers, head by head: ``[batch head q_pos k_pos]``.

    Args:
        patterns: a ``[layer batch head q_pos k_pos]`` stack, or a cache (every cached layer is used;
            see ``stack_patterns``).
    """
    stack = stack_patterns(patterns) if isinstance(patterns, Mapping) else patterns
    return stack.mean(dim=0)


def entropy(pattern: Float[Tensor, "*batch head q_pos k_pos"]) -> Float[Tensor, "*batch head q_pos"]:
    """The entropy of each row, in nats: 0 for a query that attends to one key, ``log n`` for one
    that spreads evenly over ``n`` keys. Zero weights (masked keys) contribute nothing.

    Args:
        pattern: ``[batch head q_pos k_pos]`` or ``[head q_pos k_pos]``.
    """
    as_batched(pattern)
    p = pattern.float()
    return -torch.special.xlogy(p, p).sum(dim=-1).to(pattern.dtype)


def attendable(
    q_pos: int, k_pos: int, causal: bool = True, attention_mask: Int[Tensor, "batch k_pos"] | None = None,
) -> Bool[Tensor, "#batch q_pos k_pos"]:
    """Which keys each query may attend to: earlier keys and itself when ``causal`` (queries aligned to
    the last keys), and only real tokens where ``attention_mask`` (1 real, 0 padding) is given.
    The batch axis is 1 without ``attention_mask``.
    """
    if k_pos < q_pos:
        raise ValueError(f"a pattern has at least as many keys as queries; got q_pos={q_pos}, k_pos={k_pos}")
    allowed = torch.ones(q_pos, k_pos, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(k_pos - q_pos)
    allowed = allowed[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool().cpu()[:, None, :]
    return allowed


@dataclass(frozen=True)
class RowSumCheck:
    """Whether every row of a pattern sums to 1 over the keys it may attend to.

    ``worst`` is the (batch, head, query) of the row furthest from that, ``worst_sum`` its sum over
    attendable keys and ``worst_masked`` the weight it puts on keys it may not attend to.
    """

    ok: bool
    max_error: float
    worst: tuple[int, int, int]
    worst_sum: float
    worst_masked: float
    atol: float

    def __str__(self) -> str:
        batch, head, query = self.worst
        verdict = "OK" if self.ok else "FAIL"
        return (f"{verdict}: max |row sum - 1| = {self.max_error:.2e} (atol {self.atol:.0e}); worst row "
                f"batch {batch} head {head} query {query}: sum {self.worst_sum:.6f} over attendable keys, "
                f"{self.worst_masked:.2e} on masked keys")


def check_row_sums(
    pattern: Float[Tensor, "*batch head q_pos k_pos"],
    attention_mask: Int[Tensor, "mask_batch mask_k_pos"] | None = None,  # checked against the pattern below
    causal: bool = True, atol: float = 1e-5,
) -> RowSumCheck:
    """Check that each row sums to 1 over its attendable keys and puts no weight elsewhere.

    The error of a row is ``|sum over attendable keys - 1| + sum of |weight| on the other keys``.
    Rows whose query is padding (``attention_mask`` 0) are not checked: their values mean nothing.

    Args:
        pattern: ``[batch head q_pos k_pos]`` or ``[head q_pos k_pos]``.
        attention_mask: ``[batch k_pos]``, 1 for real tokens and 0 for padding, as given to the model.
        causal: whether queries may only attend to earlier keys and themselves (False for an encoder).
        atol: the largest error that passes.

    Returns:
        A ``RowSumCheck``; ``str()`` of it is a one-line report naming the worst row.
    """
    full = as_batched(pattern).float().cpu()
    n_batch, _, q_pos, k_pos = full.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (n_batch, k_pos):
        raise ValueError(f"attention_mask must be [batch k_pos] = {(n_batch, k_pos)}, "
                         f"got {tuple(attention_mask.shape)}")
    allowed = attendable(q_pos, k_pos, causal, attention_mask)[:, None]  # [batch 1 q_pos k_pos]
    inside = (full * allowed).sum(-1)
    outside = (full.abs() * ~allowed).sum(-1)
    error = (inside - 1).abs() + outside  # [batch head q_pos]
    if attention_mask is not None:
        real_query = attention_mask.bool().cpu()[:, k_pos - q_pos:]
        error = error * real_query[:, None, :]
    flat = int(error.flatten().argmax())
    batch, head, query = (int(i) for i in torch.unravel_index(torch.tensor(flat), error.shape))
    max_error = float(error[batch, head, query])
    return RowSumCheck(ok=max_error <= atol, max_error=max_error, worst=(batch, head, query),
                       worst_sum=float(inside[batch, head, query]), worst_masked=float(outside[batch, head, query]),
                       atol=atol)


__all__ = ["AttendedKey", "RowSumCheck", "as_batched", "attendable", "check_row_sums", "entropy", "head_mean",
           "index_in_range", "layer_mean", "pattern_names", "query_all_heads", "query_distribution", "stack_patterns", "top_k_keys",
           "top_k_per_head"]
