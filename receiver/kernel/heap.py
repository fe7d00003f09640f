"""Giving freed heap memory back to the kernel.

glibc keeps what Python frees in its arenas (one per thread that allocated, up to 8 per core),
so a transient, such as the profiler's first drain parsing symbol tables, would stay resident
for the agent's life. ``malloc_trim(0)`` returns the free pages of every arena
(``MADV_DONTNEED``); fewer arenas leave fewer partly used pages."""

from __future__ import annotations

import ctypes
import functools
from typing import Any

__all__ = ["limit_arenas", "trim"]

_M_ARENA_MAX = -8


@functools.lru_cache(maxsize=2)
def _glibc(name: str, argtypes: tuple[Any, ...]) -> Any:
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):   # not glibc (musl has neither function)
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def limit_arenas(n: int) -> bool:
    """At most ``n`` malloc arenas; call before threads start. The agent's threads (event
    loop, workers, gRPC's) mostly wait, so sharing arenas costs no measurable time."""
    fn = _glibc("mallopt", (ctypes.c_int, ctypes.c_int))
    return bool(fn is not None and fn(_M_ARENA_MAX, n))


def trim() -> bool:
    """Returns free heap pages to the kernel; False where the C library cannot."""
    fn = _glibc("malloc_trim", (ctypes.c_size_t,))
    return bool(fn is not None and fn(0))
