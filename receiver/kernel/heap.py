"""Giving freed heap memory back to the kernel.

glibc keeps what Python frees in its arenas (one per thread that allocated), so a transient,
such as the profiler's first drain parsing symbol tables, would stay resident for the agent's
life. ``malloc_trim(0)`` returns the free pages of every arena (``MADV_DONTNEED``)."""

from __future__ import annotations

import ctypes
import functools
from typing import Any

__all__ = ["trim"]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):   # not glibc (musl has no malloc_trim)
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Returns free heap pages to the kernel; False where the C library cannot."""
    fn = _malloc_trim()
    return bool(fn is not None and fn(0))
