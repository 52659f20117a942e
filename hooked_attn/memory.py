"""What glibc does with freed memory: hand it back while a load is under way, or keep it for reuse.

Tensors of a few megabytes live on glibc's heap; freed in the middle of it, their pages stay resident
until something asks for them back, so a load that frees as it goes would still show the peak RSS of
everything it ever held. ``malloc_trim(0)`` returns those free pages (it also unmaps whole free pages
inside the heap). Elsewhere than glibc this does nothing.
"""

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``malloc_trim`` and ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  (musl and others lack them)
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # the most glibc accepts on 64-bit systems
_KEEP_BELOW = 2**31 - 1  # mallopt takes an int


def keep_freed_memory(keep: bool = True) -> bool:
    """Have glibc keep freed memory for reuse rather than hand it back to the OS, for this process.

    A ``run_with_cache`` of everything keeps every activation alive, so each call needs as much fresh
    memory as its cache, and by default glibc returns a dropped cache's pages to the OS: the next call
    faults them in again, a page at a time (on the LLaMA-shaped benchmark, a tenth to a fifth of the
    call). With ``keep_freed_memory()`` blocks under 32 MiB come from the heap and the heap is not
    trimmed, so a loop of ``run_with_cache`` calls reuses the same pages; the process's RSS then stays
    at its high-water mark. ``keep_freed_memory(False)`` sets glibc's initial thresholds back (128 KiB;
    its adaptive threshold stays off). ``release_free_memory()`` still hands free pages back on demand.

    Returns whether the allocator took the setting: False where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    mmap_threshold, trim_threshold = (_MMAP_THRESHOLD_MAX, _KEEP_BELOW) if keep else (128 << 10, 128 << 10)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
