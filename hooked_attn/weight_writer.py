"""WeightWriter: rewrites the tensors of a state dict with bounded memory, for the processing steps.

A step states its math over whole tensors (``W * scale - mean``, a float32 sum over an axis); the writer
computes it slice by slice along each tensor's outermost storage axis, so no float32 copy of a large
weight is ever whole, and either overwrites the tensor (when the caller owns it and no other entry of the
dict shares its storage) or replaces it with a fresh one, handing the old one's pages back before the next
is made. Arithmetic runs in at least float32; results keep each tensor's dtype and memory layout.
"""

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from hooked_attn.memory import release_free_memory

SLICE_ELEMENTS = 1 << 21  # float32 temporaries stay under ~8 MB per slice, whatever the tensor's size

Owned = Callable[[Tensor], bool] | None


def at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _slices(t: Tensor) -> Iterator[tuple[int, int, int]]:
    """(axis, start, size) of bounded slices of ``t`` along its outermost storage axis, so that each slice
    is one run of memory (a tied ``W_U`` stored as ``W_E`` is sliced along d_vocab, not d_model)."""
    axis = max(range(t.ndim), key=lambda a: t.stride(a) if t.shape[a] > 1 else -1)
    n = t.shape[axis]
    # A meta tensor (a stand-in while loading onto a device map) has no data to bound: one slice.
    step = max(1, n) if t.is_meta else max(1, SLICE_ELEMENTS // max(1, t.numel() // max(1, n)))
    for start in range(0, n, step):
        yield axis, start, min(step, n - start)


def _part(b: Tensor, axis: int, start: int, size: int) -> Tensor:
    """The piece of ``b`` (broadcast against a tensor) that meets that tensor's slice."""
    return b.narrow(axis, start, size) if b.shape[axis] > 1 else b


_lent = threading.local()  # the float32 buffer lent to the slices of one processing run


@contextlib.contextmanager
def lend_work_buffer() -> Iterator[None]:
    """Give every slice computed inside one float32 buffer of ``SLICE_ELEMENTS`` to reuse. A fresh
    temporary per slice fragments glibc's heap (small results land in the freed holes, so the next
    temporary no longer fits): load RSS then grows by a slice per weight."""
    previous = getattr(_lent, "buffer", None)
    _lent.buffer = torch.empty(SLICE_ELEMENTS)
    try:
        yield
    finally:
        _lent.buffer = previous


def _work(t: Tensor, slices: list[tuple[int, int, int]]) -> Tensor:
    """A float32 tensor (float64 for a float64 ``t``) shaped and ordered in memory like ``t``'s first slice:
    in the lent buffer when there is one and it fits, else fresh. Later slices use a narrowed view of it."""
    like = t.narrow(*slices[0])
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    flat = getattr(_lent, "buffer", None)
    if flat is None or flat.numel() < like.numel() or flat.device != t.device or flat.dtype != dtype:
        flat = torch.empty(like.numel(), dtype=dtype, device=t.device)
    strides, step = [0] * like.ndim, 1
    for d in sorted(range(like.ndim), key=lambda d: (like.stride(d), -d)):  # innermost axis first
        strides[d], step = step, step * like.shape[d]
    return flat[:like.numel()].as_strided(like.shape, strides)


def bounded_sum(t: Tensor, axis: int, scale: Tensor | None = None) -> Tensor:
    """float32 sum over ``axis`` (kept, size 1) of ``t``, times ``scale`` (broadcast against ``t``) when
    given, computed slice by slice: no float32 copy of ``t`` is ever whole."""
    axis, total, parts, along = axis % t.ndim, None, [], 0
    slices = list(_slices(t))
    if not slices:  # an empty tensor
        shape = [1 if a == axis else n for a, n in enumerate(t.shape)]
        return torch.zeros(shape, dtype=at_least_float32(t).dtype, device=t.device)
    work = _work(t, slices) if scale is not None or t.dtype not in (torch.float32, torch.float64) else None
    for along, start, size in slices:
        x = t.narrow(along, start, size)
        if work is not None:
            x = work.narrow(along, 0, size).copy_(x)  # (a mixed-dtype torch.mul(out=) may make a temporary)
            if scale is not None:
                x.mul_(_part(scale, along, start, size))
        s = x.sum(axis, keepdim=True)  # x is float32 (or 64) here; sum(dtype=) would copy it first
        if along == axis:
            total = s if total is None else total + s
        else:
            parts.append(s)
    return total if total is not None else torch.cat(parts, dim=along)


def _affine(t: Tensor, scale: Tensor | None, shift: Tensor | None, overwrite: bool) -> Tensor:
    """``t * scale - shift`` (each broadcast against ``t``, in at least float32), into a fresh tensor of
    ``t``'s dtype and layout or, with ``overwrite``, back into ``t``; by slices, so the float32
    temporaries are bounded by a slice (a float32 ``t`` needs none)."""
    out = t if overwrite else torch.empty_like(t)
    slices = list(_slices(t))
    same = t.dtype in (torch.float32, torch.float64)  # then the arithmetic runs in the destination
    work = None if same or not slices else _work(t, slices)
    for axis, start, size in slices:
        src, dst = t.narrow(axis, start, size), out.narrow(axis, start, size)
        if same and not overwrite:
            dst.copy_(src)
        x = dst if same else work.narrow(axis, 0, size).copy_(src)
        if scale is not None:
            x.mul_(_part(scale, axis, start, size))
        if shift is not None:
            x.sub_(_part(shift, axis, start, size))
        if x is not dst:
            dst.copy_(x)
    return out


class WeightWriter:
    """The state dict one processing step rewrites.

    ``sd`` is written to (pass a copy to keep the original). A tensor is overwritten, instead of
    replaced, only when ``owned`` accepts it and no other entry shares its storage (GPT-2's W_Q, W_K and
    W_V are views of one c_attn weight; a tied W_U is a view of W_E). Sharing is counted once, when the
    writer is made: a step only ever adds fresh tensors, so nothing it does can make a storage shared.
    With ``release``, each replaced tensor's pages go back to the OS before the next is made (the load
    does this: the old tensors are nobody else's).
    """

    def __init__(self, sd: dict[str, Tensor], owned: Owned = None, release: bool = False) -> None:
        self.sd = sd
        self._owned, self._release = owned, release
        self._sharing = Counter(t.untyped_storage().data_ptr() for t in sd.values()) if owned is not None else None

    def may_overwrite(self, t: Tensor) -> bool:
        if self._owned is None or self._sharing is None:
            return False
        return self._sharing[t.untyped_storage().data_ptr()] == 1 and self._owned(t)

    def __getitem__(self, key: str) -> Tensor:
        return self.sd[key]

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def set(self, key: str, value: Tensor) -> None:
        """``sd[key] = value`` cast to the old tensor's dtype (small tensors: biases, folded sums)."""
        self.sd[key] = value.to(self.sd[key].dtype)

    def pop(self, key: str) -> Tensor | None:
        return self.sd.pop(key, None)

    def scale_and_center(self, key: str, scale: Tensor | None = None, center_axis: int | None = None) -> None:
        """``sd[key] = W * scale`` (broadcast), then less its mean over ``center_axis`` when given."""
        old = self.sd[key]
        mean = None if center_axis is None else bounded_sum(old, center_axis, scale) / old.shape[center_axis]
        self.sd[key] = _affine(old, scale, mean, overwrite=self.may_overwrite(old))
        if self._release and self.sd[key] is not old:
            del old
            release_free_memory()
