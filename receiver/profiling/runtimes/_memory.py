"""What the runtimes read from a process: the symbols of the files it maps, cached per build."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

__all__ = ["SymbolCache", "mapped_file_read", "mapped_file_symbols"]

T = TypeVar("T")

# Symbols found in a mapped file, by its build id (or path), least recently used first
SymbolCache = OrderedDict[Hashable, dict[bytes, int]]


def mapped_file_symbols(pid: int, start: int, end: int, path: str, build_id: str, cache: SymbolCache,
                        read: Callable[[int], dict[bytes, int]],
                        errors: type[Exception] | tuple[type[Exception], ...], limit: int) -> dict[bytes, int]:
    """``read(fd)`` of the file ``pid`` maps at ``start``-``end``, once per build (its build id,
    else its path): ``mapped_file_read`` keyed by that."""
    return mapped_file_read(pid, start, end, path, build_id or path, cache, read, errors, limit, {})


def mapped_file_read(pid: int, start: int, end: int, path: str, key: Hashable, cache: OrderedDict[Hashable, T],
                     read: Callable[[int], T], errors: type[Exception] | tuple[type[Exception], ...], limit: int,
                     empty: T) -> T:
    """``read(fd)`` of the file ``pid`` maps at ``start``-``end`` (through its map_files link, else
    its path under the process's root), kept in ``cache`` under ``key`` (at most ``limit`` files)
    so that every mapped file is looked at once; ``empty`` when it cannot be opened or ``read``
    raises one of ``errors``."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    found = empty
    for candidate in (f"/proc/{pid}/map_files/{start:x}-{end:x}", f"/proc/{pid}/root{path}"):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            found = read(fd)
            break
        except errors:
            continue
        finally:
            os.close(fd)
    cache[key] = found
    while len(cache) > limit:
        cache.popitem(last=False)
    return found
