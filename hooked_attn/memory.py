"""Handing freed heap memory back to the operating system while a load is under way.

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
def _trim():  # the C function, or None where there is no glibc
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); a no-op elsewhere."""
    trim = _trim()
    if trim is not None:
        trim(0)
