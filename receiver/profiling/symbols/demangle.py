"""C++ and Rust symbol names made readable (``_ZN3foo3barEi`` → ``foo::bar(int)``) for profiles.

binutils' ``c++filt`` does it, once per drain for all names not seen before (one process, names on
stdin), with a bounded cache. Without ``c++filt`` names stay mangled, which a backend can still
demangle, and that is said once in the log.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from itertools import chain
from operator import attrgetter

from ..model import CpuProfile, Frame

__all__ = ["Demangler", "is_mangled"]

log = logging.getLogger(__name__)

_FUNCTION = attrgetter("function")
_FRAMES = attrgetter("frames")
_PREFIXES = ("_Z", "_R")   # Itanium C++ ABI (also Rust's legacy scheme), Rust v0


def is_mangled(name: str) -> bool:
    return name.startswith(_PREFIXES) and "\n" not in name


class Demangler:
    def __init__(self, max_entries: int = 65536, tool: str | None = None, timeout: float = 10.0):
        self._tool = tool if tool is not None else shutil.which("c++filt")
        self._max_entries = max_entries
        self._timeout = timeout
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._warned = False
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def limit(self) -> int:
        return self._max_entries

    def names(self, mangled: Iterable[str]) -> dict[str, str]:
        """Readable form of each mangled name (the name itself where it cannot be demangled)."""
        wanted = {n for n in mangled if is_mangled(n)}
        missing = [n for n in wanted if n not in self._cache]
        if missing:
            for name, readable in zip(missing, self._run(missing)):
                self._cache[name] = readable
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
                self.evictions += 1
        out = {}
        for n in wanted:
            readable = self._cache.get(n, n)
            if n in self._cache:
                self._cache.move_to_end(n)
            out[n] = readable
        return out

    def _run(self, names: list[str]) -> list[str]:
        if not self._tool:
            if not self._warned:
                self._warned = True
                log.info("c++filt (binutils) not found: C++/Rust function names stay mangled")
            return names
        try:
            result = subprocess.run([self._tool], input="\n".join(names) + "\n", capture_output=True,
                                    text=True, timeout=self._timeout, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            if not self._warned:
                self._warned = True
                log.warning("c++filt failed (%s): C++/Rust function names stay mangled", e)
            return names
        lines = result.stdout.split("\n")[: len(names)]
        return lines if len(lines) == len(names) else names

    def apply(self, profile: CpuProfile) -> None:
        """Replaces mangled function names in ``profile``'s frames, in place."""
        # Distinct names first, iterated in C: a drain has tens of thousands of frame
        # occurrences but a few hundred functions.
        functions = set(map(_FUNCTION, chain.from_iterable(map(_FRAMES, profile.samples))))
        readable = self.names(functions)
        if not readable:
            return
        renamed: dict[Frame, Frame] = {}
        for sample in profile.samples:
            if any(f.function in readable for f in sample.frames):
                sample.frames = tuple(self._renamed(f, readable, renamed) for f in sample.frames)

    @staticmethod
    def _renamed(frame: Frame, readable: dict[str, str], renamed: dict[Frame, Frame]) -> Frame:
        new = readable.get(frame.function)
        if new is None or new == frame.function:
            return frame
        out = renamed.get(frame)
        if out is None:
            out = renamed[frame] = replace(frame, function=new, _hash=0)
        return out
