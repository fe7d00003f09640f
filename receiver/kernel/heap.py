"""Giving freed heap memory back to the kernel, and keeping Python's collector off the objects
that live as long as the agent.

glibc keeps what Python frees in its arenas (one per thread that allocated, up to 8 per core),
so a transient, such as the profiler's first drain parsing symbol tables, would stay resident
for the agent's life. ``malloc_trim(0)`` returns the free pages of every arena
(``MADV_DONTNEED``); fewer arenas leave fewer partly used pages."""

from __future__ import annotations

import ctypes
import functools
import gc
from typing import Any

__all__ = ["freeze_startup_objects", "limit_arenas", "trim"]

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


# Young-generation threshold: a drain allocates tens of thousands of tuples and frames that die
# by reference count within the drain; at the default 700 the collector ran ~30 times per drain.
GC_YOUNG_THRESHOLD = 10_000


def freeze_startup_objects() -> None:
    """Once the sources run: what start-up made (modules, protobuf descriptors, gRPC, the syscall
    table, BPF map handles) is kept for the agent's life, so it is moved out of the cyclic
    collector's reach (``gc.freeze``); each full collection then walks only what came after."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, gen1, gen2)
