"""Language runtimes whose frames the CPU profiler names beside the native ones.

``RUNTIMES`` is the registration table: one row per runtime, in the order of their
``unwind_programs`` slots (slot = place in the table + 1; slot 0 is the native walker). Each row is
a ``Runtime`` subclass (``base.py``) from a module of this package, whose kernel walker is the
``bpf/runtimes/<name>.bpf.h`` it names. See CONTRIBUTING.md, "A new runtime".
"""

from __future__ import annotations

from .base import RecordedFrames, Region, Runtime, Runtimes, slot_of
from .cpython import CPython
from .hotspot import HotSpot
from .v8 import V8

__all__ = ["RUNTIMES", "Runtime", "Runtimes", "Region", "RecordedFrames", "slot_of"]

RUNTIMES: tuple[type[Runtime], ...] = (
    CPython,
    V8,
    HotSpot,
)
