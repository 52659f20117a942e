"""``transformer_lens.ActivationCache``: hooked_attn's ActivationCache plus TransformerLens' batch-axis rules.

A cache may hold entries whose first axis is not the batch: broadcast entries (first axis 1 in a
batch of several) and position-indexed ones (such as a ``[pos pos]`` relative position bias).
Here the batch size of a cache is the first-axis length most of its entries share (the larger on a
tie); ``remove_batch_dim`` and ``apply_slice_to_batch_dim`` change only the entries of that length
and leave the others as they are. TransformerLens decides the same cases its own way; this rule is
hooked_attn's and is stated here so a mixed cache is never handled silently differently.
"""

from collections import Counter
from typing import Any

import torch
from torch import Tensor

from hooked_attn.cache import ActivationCache as _ActivationCache


class CacheBatchError(ValueError, AssertionError):
    """A batch-axis operation that does not fit this cache (a ValueError, and an AssertionError as
    TransformerLens raises)."""


class ActivationCache(_ActivationCache):
    def batch_size(self) -> int | None:
        """The length of the batch axis (None for an empty cache or one without a batch axis)."""
        if not self.has_batch_dim:
            return None
        counts = Counter(t.shape[0] for t in self.cache_dict.values() if t.ndim > 0)
        if not counts:
            return None
        return max(counts, key=lambda n: (counts[n], n))

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch axis of a batch-of-one cache; entries with another first axis stay as they are.

        Raises:
            CacheBatchError: the cache's batch is not of size one, or its batch axis is already gone.
        """
        if not self.has_batch_dim:
            raise CacheBatchError("this cache has no batch dimension left to remove")
        batch = self.batch_size()
        if batch is not None and batch != 1:
            raise CacheBatchError(f"cannot remove the batch dimension: the cache holds a batch size {batch}, not 1")
        self.cache_dict = {name: t[0] if t.ndim > 0 and t.shape[0] == 1 else t for name, t in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> "ActivationCache":
        """A new cache with ``batch_slice`` (an int, ``(start, stop[, step])``, indices or a ``Slice``)
        applied to the batch axis of every batched entry; an int drops the axis."""
        from hooked_attn.compat.transformer_lens.utilities import Slice

        if not self.has_batch_dim:
            raise CacheBatchError("this cache has no batch dimension to slice")
        sl = Slice.unwrap(batch_slice)
        batch = self.batch_size()

        def cut(t: Tensor) -> Tensor:
            return sl.apply(t, dim=0) if t.ndim > 0 and t.shape[0] == batch else t

        return ActivationCache({name: cut(t) for name, t in self.cache_dict.items()}, self.model,
                               has_batch_dim=sl.mode != "int")


    # -- TransformerLens 3.x's logit lens: the final norm recomputed for each component ------------

    def _is_final(self, layer: Any) -> bool:
        return layer is None or (not isinstance(layer, bool) and layer in (-1, self._model().cfg.n_layers))

    def apply_ln_to_stack(self, residual_stack: Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: Any = None, recompute_ln: bool = False) -> Tensor:
        """hooked_attn's ``apply_ln_to_stack`` (each component centred and divided by the cached scale);
        with ``recompute_ln=True`` at the final layer, as TransformerLens 3.x, each component instead
        goes through ``ln_final`` itself (its own statistics, then the gain and bias)."""
        if recompute_ln and not mlp_input and self._is_final(layer):
            ln_final = self._model().ln_final
            return torch.stack([ln_final(part) for part in residual_stack])
        return super().apply_ln_to_stack(residual_stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: Any = None, mlp_input: bool = False, return_labels: bool = False) -> Any:
        """hooked_attn's ``accumulated_resid``; with ``apply_ln=True`` up to the final layer each stream
        passes through ``ln_final`` with its own statistics (TransformerLens 3.x's logit lens), not
        the final stream's cached scale."""
        if not (apply_ln and not mlp_input and self._is_final(layer)):
            return super().accumulated_resid(layer, incl_mid, apply_ln, pos_slice, mlp_input, return_labels)
        stack, labels = super().accumulated_resid(layer, incl_mid, False, pos_slice, mlp_input, return_labels=True)
        stack = self.apply_ln_to_stack(stack, layer, recompute_ln=True)
        return (stack, labels) if return_labels else stack


def as_transformer_lens(cache: _ActivationCache) -> ActivationCache:
    """The same cache object, as this subclass (it adds methods only)."""
    if type(cache) is _ActivationCache:
        cache.__class__ = ActivationCache
    return cache  # type: ignore[return-value]


__all__ = ["ActivationCache", "CacheBatchError"]
