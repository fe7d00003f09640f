"""CPython frames in CPU profiles: which processes run CPython, where their interpreter state is
(``py_processes`` for the kernel's walk), and what the recorded code objects are called.

A runtime of the profiler (``Runtime``, runtimes/base.py). The kernel walk (``walk_cpython`` in
bpf/runtimes/cpython.bpf.h) records, per Python frame, the address of its code object and its
instruction offset, and marks where each C-level ``_PyEval_EvalFrameDefault`` call's frames end.
Here:

* ``find_interpreter`` finds ``_PyRuntime`` (exported in ``.dynsym``, also in Debian's stripped
  ``/usr/bin/python3.11``), ``Py_Version`` and ``PyCode_Type`` in the process's executable or
  libpython, reads the version from the process, and picks the version's ``Layout``: the
  offsets are data (``LAYOUTS``; 3.13+ take them from the ``_Py_DebugOffsets`` CPython places
  at the start of ``_PyRuntime`` for out-of-process tools). Symbols are cached per build id.
* ``CodeNames`` reads a code object's ``co_qualname``, ``co_filename``, ``co_firstlineno`` and
  ``co_linetable`` from /proc/PID/mem (checking its type is ``PyCode_Type``), caches them per
  (process, code object) in an LRU, and maps an instruction offset to its line.
* ``interleave`` puts each eval call's Python frames on top of that call's native
  ``_PyEval_EvalFrameDefault`` frame, so a stack reads native → Python → native.
* ``CPython`` is the runtime: it recognises a process, hands the kernel its ``PyProcess``, reads
  announced code objects on its own thread, and names recorded frames at drain time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from array import array
from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ...config import CachesConfig, ProfilerSourceConfig
from ...kernel.bcc import header_defines, header_enum
from ..abi import RUNTIME_AUX_LAST, RUNTIME_MAX_FRAMES
from ..model import Frame
from ..symbols.elf import ElfError, dynamic_symbols_fd
from ..work_queue import QueueWorker
from ._memory import SymbolCache, mapped_file_symbols
from .base import QueuedRuntime, RecordedFrames, Region, Runtime

__all__ = ["Layout", "LAYOUTS", "PyProcess", "Interpreter", "find_interpreter", "CodeNames",
           "CPython", "interleave", "parse_linetable", "EVAL_FUNCTIONS", "MAX_FRAMES"]

log = logging.getLogger(__name__)

BPF_HEADER = "runtimes/cpython.bpf.h"
_D = header_defines(BPF_HEADER)
MAX_FRAMES = RUNTIME_MAX_FRAMES          # Python frames a walked stack holds
LASTI_ENTRY = RUNTIME_AUX_LAST           # a recorded frame ends its eval call's group
LASTI_UNKNOWN = _D["PY_LASTI_UNKNOWN"]
ENTRY_FLAG, ENTRY_SHIM = _D["PY_ENTRY_FLAG"], _D["PY_ENTRY_SHIM"]
NO_OFFSET = _D["PY_NO_OFFSET"]
EVAL_FUNCTIONS = frozenset({"_PyEval_EvalFrameDefault"})
MAX_CODES = 16384              # code objects kept named, all processes together
MAX_FILES = 1024               # interpreter binaries whose symbols are cached
MAX_STRING = 1024              # longest name or path read
MAX_LINETABLE = 1 << 16        # largest co_linetable read
QUEUE_SIZE = 8192
DEBUG_COOKIE = b"xdebugpy"
_SYMBOLS = {b"_PyRuntime", b"Py_Version", b"PyCode_Type"}


@dataclass(frozen=True, slots=True)
class Layout:
    """Offsets of one CPython minor version (x86-64), from its headers: the kernel's walk uses
    the first group, the code-object reader the rest."""

    interpreters_head: int      # _PyRuntimeState.interpreters.head
    threads_head: int           # PyInterpreterState.threads.head
    ts_next: int                # PyThreadState.next
    ts_native_thread_id: int    # PyThreadState.native_thread_id
    ts_frame: int               # PyThreadState.cframe (3.11, 3.12) / .current_frame (3.13)
    frame_in_cframe: int        # _PyCFrame.current_frame, or NO_OFFSET
    fr_code: int                # _PyInterpreterFrame.f_code / .f_executable
    fr_instr: int               # .prev_instr / .instr_ptr
    fr_previous: int            # .previous
    fr_entry: int               # .is_entry (3.11) / .owner (3.12+)
    entry_kind: int             # ENTRY_FLAG or ENTRY_SHIM
    entry_value: int            # FRAME_OWNED_BY_CSTACK for ENTRY_SHIM
    code_adaptive: int          # PyCodeObject.co_code_adaptive
    co_filename: int
    co_qualname: int
    co_linetable: int
    co_firstlineno: int
    unicode_ascii_size: int     # sizeof(PyASCIIObject): where compact ASCII data starts
    unicode_compact_size: int   # sizeof(PyCompactUnicodeObject)


# Computed with offsetof() against each version's headers (Py_BUILD_CORE), x86-64.
LAYOUTS: dict[tuple[int, int], Layout] = {
    (3, 11): Layout(interpreters_head=40, threads_head=16, ts_next=8, ts_native_thread_id=160,
                    ts_frame=56, frame_in_cframe=8, fr_code=32, fr_instr=56, fr_previous=48,
                    fr_entry=68, entry_kind=ENTRY_FLAG, entry_value=0, code_adaptive=184,
                    co_filename=112, co_qualname=128, co_linetable=136, co_firstlineno=72,
                    unicode_ascii_size=48, unicode_compact_size=72),
    (3, 12): Layout(interpreters_head=40, threads_head=72, ts_next=8, ts_native_thread_id=144,
                    ts_frame=56, frame_in_cframe=0, fr_code=0, fr_instr=56, fr_previous=8,
                    fr_entry=70, entry_kind=ENTRY_SHIM, entry_value=3, code_adaptive=192,
                    co_filename=112, co_qualname=128, co_linetable=136, co_firstlineno=68,
                    unicode_ascii_size=40, unicode_compact_size=56),
    (3, 13): Layout(interpreters_head=632, threads_head=7344, ts_next=8, ts_native_thread_id=160,
                    ts_frame=72, frame_in_cframe=NO_OFFSET, fr_code=0, fr_instr=56, fr_previous=8,
                    fr_entry=70, entry_kind=ENTRY_SHIM, entry_value=3, code_adaptive=200,
                    co_filename=112, co_qualname=128, co_linetable=136, co_firstlineno=68,
                    unicode_ascii_size=40, unicode_compact_size=56),
}

# _Py_DebugOffsets (3.13+): u64 fields from the start of _PyRuntime, by index.
_DEBUG_FIELDS = {"interpreters_head": 5, "threads_head": 9, "ts_next": 21, "ts_frame": 23,
                 "ts_native_thread_id": 25, "fr_previous": 29, "fr_code": 30, "fr_instr": 31,
                 "fr_entry": 33, "co_filename": 35, "co_qualname": 37, "co_linetable": 38,
                 "co_firstlineno": 39, "code_adaptive": 43}


def layout_from_debug_offsets(blob: bytes, base: Layout) -> Layout:
    """``base`` with the offsets a 3.13+ interpreter publishes in ``_Py_DebugOffsets`` (the
    cookie checked by the caller); fields it does not publish (string layout) stay."""
    values = struct.unpack_from(f"<{max(_DEBUG_FIELDS.values()) + 1}Q", blob)
    return replace(base, frame_in_cframe=NO_OFFSET,
                   **{name: values[i] for name, i in _DEBUG_FIELDS.items()})


class PyProcess(ctypes.Structure):
    """Mirror of ``struct py_process`` (bpf/runtimes/cpython.bpf.h): the runtime's per-process data."""

    _fields_ = [("interpreters_head", ctypes.c_uint64), ("pidns_dev", ctypes.c_uint64),
                ("pidns_ino", ctypes.c_uint64), ("threads_head", ctypes.c_uint16),
                ("ts_next", ctypes.c_uint16), ("ts_native_thread_id", ctypes.c_uint16),
                ("ts_frame", ctypes.c_uint16), ("frame_in_cframe", ctypes.c_uint16),
                ("fr_code", ctypes.c_uint16), ("fr_instr", ctypes.c_uint16),
                ("fr_previous", ctypes.c_uint16), ("fr_entry", ctypes.c_uint16),
                ("code_adaptive", ctypes.c_uint16), ("entry_kind", ctypes.c_uint8),
                ("entry_value", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 6)]


@dataclass(frozen=True, slots=True)
class Interpreter:
    """One process's interpreter: where ``_PyRuntime`` and ``PyCode_Type`` are, which layout."""

    version: tuple[int, int, int]
    runtime: int                # address of _PyRuntime in the process
    code_type: int              # address of PyCode_Type (0: unknown, code objects unchecked)
    layout: Layout

    def kernel_entry(self, pidns: tuple[int, int]) -> PyProcess:
        lay = self.layout
        return PyProcess(
            self.runtime + lay.interpreters_head, pidns[0], pidns[1], lay.threads_head, lay.ts_next,
            lay.ts_native_thread_id, lay.ts_frame, lay.frame_in_cframe, lay.fr_code, lay.fr_instr,
            lay.fr_previous, lay.fr_entry, lay.code_adaptive, lay.entry_kind, lay.entry_value)


class UnsupportedPython(Exception):
    """A CPython whose version has no layout here (counted, its stacks stay native)."""


def _read_mem(pid: int, address: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, address)
    finally:
        os.close(fd)


def find_interpreter(pid: int, regions: Sequence[Region],
                     symbol_cache: OrderedDict[Hashable, dict[bytes, int]]) -> Interpreter | None:
    """The CPython interpreter of ``pid`` from its executable mappings (the symbolizer's
    ``executable_regions``), or None when none exports ``_PyRuntime``. Raises
    ``UnsupportedPython`` for a version without a layout."""
    seen: set[str] = set()
    for start, end, bias, path, build_id, anonymous in regions:
        if anonymous or bias is None or path in seen or not path.startswith("/"):
            continue
        seen.add(path)
        symbols = _symbols(pid, start, end, path, build_id, symbol_cache)
        if b"_PyRuntime" not in symbols or b"Py_Version" not in symbols:
            continue
        runtime = symbols[b"_PyRuntime"] + bias
        hexversion = struct.unpack("<I", _read_mem(pid, symbols[b"Py_Version"] + bias, 4))[0]
        version = (hexversion >> 24, (hexversion >> 16) & 0xFF, (hexversion >> 8) & 0xFF)
        layout = LAYOUTS.get(version[:2])
        if version[:2] >= (3, 13):
            blob = _read_mem(pid, runtime, 8 * 48)
            if blob[:8] == DEBUG_COOKIE:
                layout = layout_from_debug_offsets(blob, layout or LAYOUTS[(3, 13)])
        if layout is None:
            raise UnsupportedPython(f"CPython {'.'.join(map(str, version))}")
        code_type = symbols.get(b"PyCode_Type")
        return Interpreter(version, runtime, code_type + bias if code_type else 0, layout)
    return None


def _symbols(pid: int, start: int, end: int, path: str, build_id: str, cache: SymbolCache) -> dict[bytes, int]:
    return mapped_file_symbols(pid, start, end, path, build_id, cache, lambda fd: dynamic_symbols_fd(fd, _SYMBOLS),
                               ElfError, MAX_FILES)


# ---------------------------------------------------------------------------- code objects


def parse_linetable(table: bytes, firstlineno: int) -> list[tuple[int, int, int]]:
    """``co_linetable`` (3.11+ location table) as (start byte, end byte, line) ranges; line -1
    where an instruction has no line. Format: Objects/locations.md."""
    out: list[tuple[int, int, int]] = []
    line = firstlineno
    offset = 0
    i = 0
    n = len(table)

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while i < n:
            b = table[i]
            i += 1
            value |= (b & 63) << shift
            shift += 6
            if not b & 64:
                break
        return value

    def svarint() -> int:
        v = varint()
        return -(v >> 1) if v & 1 else v >> 1

    while i < n:
        head = table[i]
        i += 1
        code = (head >> 3) & 15
        length = ((head & 7) + 1) * 2
        if code == 15:                     # no location
            out.append((offset, offset + length, -1))
            offset += length
            continue
        if code == 14:                     # long form
            line += svarint()
            varint()
            varint()
            varint()
        elif code == 13:                   # no column
            line += svarint()
        elif code >= 10:                   # one-line forms: line delta in the code
            line += code - 10
            i += 2
        else:                              # short forms: same line, one column byte
            i += 1
        out.append((offset, offset + length, line))
        offset += length
    return out


class _Code:
    """A code object's names and its location table as three arrays (a tuple of 3-tuples per
    range cost ~100 bytes a range: 4.6 MB for a few hundred code objects)."""

    __slots__ = ("qualname", "filename", "firstlineno", "_starts", "_ends", "_lines")

    def __init__(self, qualname: str, filename: str, firstlineno: int,
                 lines: Iterable[tuple[int, int, int]]) -> None:
        """``lines``: (start byte, end byte, line) ranges, sorted, as ``parse_linetable`` gives."""
        self.qualname, self.filename, self.firstlineno = qualname, filename, firstlineno
        self._starts, self._ends, self._lines = array("i"), array("i"), array("i")
        for start, end, line in lines:
            self._starts.append(start)
            self._ends.append(end)
            self._lines.append(line)

    @property
    def lines(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(zip(self._starts, self._ends, self._lines, strict=True))

    def line_at(self, lasti: int) -> int:
        if lasti == LASTI_UNKNOWN:
            return self.firstlineno
        i = bisect_right(self._starts, lasti) - 1
        if i >= 0 and lasti < self._ends[i] and self._lines[i] >= 0:
            return self._lines[i]
        return self.firstlineno


class CodeNames:
    """Code objects of live processes named from their memory; LRU over all processes."""

    def __init__(self, max_codes: int = MAX_CODES) -> None:
        self._max = max_codes
        self._codes: OrderedDict[tuple[int, int], _Code | None] = OrderedDict()
        self._lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.evictions = 0                      # least recently used codes dropped at the bound

    def __len__(self) -> int:
        return len(self._codes)

    @property
    def limit(self) -> int:
        return self._max

    def learn(self, pid: int, code: int, interp: Interpreter) -> _Code | None:
        """Reads (once) and returns the code object's names; None when it cannot be read."""
        key = (pid, code)
        with self._lock:
            if key in self._codes:
                self._codes.move_to_end(key)
                return self._codes[key]
        try:
            named: _Code | None = _read_code(pid, code, interp)
        except (OSError, ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
            log.debug("code object %#x of pid %d: %s", code, pid, e)
            named = None
        self.stats["codes_read" if named is not None else "codes_unreadable"] += 1
        with self._lock:
            self._codes[key] = named
            while len(self._codes) > self._max:
                self._codes.popitem(last=False)
                self.evictions += 1
        return named

    def known(self, pid: int, code: int) -> tuple[bool, _Code | None]:
        with self._lock:
            if (pid, code) in self._codes:
                return True, self._codes[(pid, code)]
        return False, None

    def forget(self, pid: int) -> None:
        with self._lock:
            for key in [k for k in self._codes if k[0] == pid]:
                del self._codes[key]


def _read_code(pid: int, code: int, interp: Interpreter) -> _Code | None:
    lay = interp.layout
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        def read(address: int, size: int) -> bytes:
            data = os.pread(fd, size, address)
            if len(data) != size:
                raise ValueError("short read")
            return data

        head = read(code, lay.co_linetable + 8)
        if interp.code_type and struct.unpack_from("<Q", head, 8)[0] != interp.code_type:
            raise ValueError("not a code object")
        filename, qualname, linetable = (struct.unpack_from("<Q", head, o)[0]
                                         for o in (lay.co_filename, lay.co_qualname, lay.co_linetable))
        firstlineno = struct.unpack_from("<i", head, lay.co_firstlineno)[0]
        size = struct.unpack("<q", read(linetable + 16, 8))[0]      # PyVarObject.ob_size
        if not 0 <= size <= MAX_LINETABLE:
            raise ValueError("implausible co_linetable")
        table = read(linetable + 32, size) if size else b""         # PyBytesObject.ob_sval
        return _Code(_read_str(read, qualname, lay), _read_str(read, filename, lay), firstlineno,
                     parse_linetable(table, firstlineno))
    finally:
        os.close(fd)


def _read_str(read, address: int, lay: Layout) -> str:  # type: ignore[no-untyped-def]
    """A compact str object (what CPython makes names and paths): ASCII data follows the
    PyASCIIObject header, other kinds follow PyCompactUnicodeObject."""
    head = read(address, 40)
    length = struct.unpack_from("<q", head, 16)[0]
    state = struct.unpack_from("<I", head, 32)[0]
    kind, compact, ascii_ = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
    if not compact or kind not in (1, 2, 4) or not 0 <= length <= MAX_STRING:
        raise ValueError("not a compact str")
    if ascii_:
        return read(address + lay.unicode_ascii_size, length).decode("ascii")
    data = read(address + lay.unicode_compact_size, length * kind)
    return data.decode({1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind])


# ---------------------------------------------------------------------------- processes


class CPython(QueuedRuntime):
    """CPython 3.11+ processes: their ``runtime_processes`` data, code names and frames.

    ``recognise``/``forget`` run on the unwinder's worker thread; ``notice`` (from the ring
    buffer) queues work for this class's own thread, which reads code objects while their
    process lives; ``frames`` runs at drain time."""

    name = "cpython"
    frame_type = "cpython"
    bpf_header = BPF_HEADER
    program = "walk_cpython"
    stats_map = "py_stats"
    stat_names = header_enum(BPF_HEADER, "PY_STAT")
    mirrors = (("mirror_py_process", "Leaf", PyProcess),)
    caches = ("python_codes", "python_frames")

    def __init__(self, bpf: Any, caches: CachesConfig | None = None) -> None:
        super().__init__(bpf, caches or CachesConfig())
        max_codes = (caches or CachesConfig()).python_codes
        self._interpreters: dict[int, Interpreter] = {}
        self._symbols: OrderedDict[Hashable, dict[bytes, int]] = OrderedDict()
        self.codes = CodeNames(max_codes)
        self._frames: dict[tuple[int, int, int], Frame] = {}   # (pid, code, lasti) → frame
        self.max_frames = 4 * max_codes
        self.frame_evictions = 0                # frames dropped when the cache was cleared at its bound
        self._worker = QueueWorker("cpython-codes", self._learn, QUEUE_SIZE, self.stats)

    @classmethod
    def enabled(cls, config: ProfilerSourceConfig) -> bool:
        return bool(config.python_frames)

    @property
    def processes(self) -> int:
        return len(self._interpreters)

    @property
    def cached_frames(self) -> int:
        return len(self._frames)

    def recognise(self, pid: int, regions: Sequence[Region]) -> bytes | None:
        """A noticed process: if it runs CPython, where its interpreter state is."""
        try:
            interp = find_interpreter(pid, regions, self._symbols)
        except UnsupportedPython as e:
            self.stats["unsupported_versions"] += 1
            log.debug("pid %d: %s has no layout here", pid, e)
            return None
        except (OSError, struct.error) as e:
            self.stats["unreadable"] += 1
            log.debug("pid %d: %s", pid, e)
            return None
        if interp is None:
            return None
        # Known here before the kernel walks it: its first code notices follow at once.
        self._interpreters[pid] = interp
        return bytes(interp.kernel_entry(_pid_namespace(pid)))

    def forget(self, pid: int) -> None:
        """``pid`` is gone: its code names and frames go (nothing to do for processes that never
        ran CPython: code objects are named only for known interpreters)."""
        if self._interpreters.pop(pid, None) is None:
            return
        self.codes.forget(pid)
        if self._frames:
            self._frames = {k: f for k, f in list(self._frames.items()) if k[0] != pid}

    def notice(self, pid: int, frame_id: int) -> None:
        """The kernel saw code object ``frame_id`` in ``pid``'s stacks first now: name it soon."""
        self._worker.put((pid, frame_id))

    def _learn(self, item: tuple[int, int]) -> None:
        pid, code = item
        interp = self._interpreters.get(pid)
        if interp is not None:
            self.codes.learn(pid, code, interp)
        else:
            self.stats["codes_of_unknown_process"] += 1

    def frames(self, pid: int, recorded: RecordedFrames) -> list[tuple[Frame, bool]]:
        """The recorded (code, lasti) frames, innermost first, as (frame, last of its eval call).
        A code object not named yet is read now if its process lives; one that cannot be named
        keeps its address (function "") and is counted."""
        interp = self._interpreters.get(pid)
        out = []
        cache = self._frames
        unresolved = 0
        for code, lasti in recorded:
            entry = bool(lasti & LASTI_ENTRY)
            frame = cache.get((pid, code, lasti))
            if frame is None:
                known, named = self.codes.known(pid, code)
                if not known and interp is not None:
                    named = self.codes.learn(pid, code, interp)
                if named is None:               # not cached: it may be readable next time
                    unresolved += 1
                    out.append((Frame(code, "", self.frame_type), entry))
                    continue
                frame = Frame(0, named.qualname, self.frame_type, None, named.filename,
                              named.line_at(lasti & ~LASTI_ENTRY))
                if len(cache) >= self.max_frames:
                    self.frame_evictions += len(cache)
                    cache.clear()
                cache[(pid, code, lasti)] = frame
            out.append((frame, entry))
        self.stats["frames_unresolved"] += unresolved
        self.stats["frames_resolved"] += len(out) - unresolved
        return out

    def place(self, native: Sequence[Frame], frames: Sequence[tuple[Frame, bool]]) -> tuple[tuple[Frame, ...], bool]:
        return interleave(native, frames)

    def counters(self) -> dict[str, int]:
        return {**self.stats, **self.codes.stats}

    @classmethod
    def watch(cls, telemetry: Any, runtime: Callable[[], Runtime | None], caches: CachesConfig) -> None:
        def stats() -> dict[str, int]:
            rt = runtime()
            return rt.all_stats() if rt is not None else {}

        def python() -> CPython | None:
            rt = runtime()
            return rt if isinstance(rt, CPython) else None

        def stacks() -> dict[str, int]:
            p = stats()
            return {"walked": p.get("walked", 0), "no_thread": p.get("no_thread", 0),
                    "truncated": p.get("truncated", 0), "misaligned": p.get("misaligned_samples", 0)} if p else {}

        def frames() -> dict[str, int]:
            p = stats()
            return {"recorded": p.get("frames", 0), "resolved": p.get("frames_resolved", 0),
                    "unresolved": p.get("frames_unresolved", 0)} if p else {}

        def events() -> dict[str, int]:
            rt = runtime()
            return rt.counters() if rt is not None else {}

        telemetry.watch_counters(
            "profiler_python_stacks", "Samples of CPython processes by their Python walk: walked (the "
            "thread's state found), no_thread (not a Python thread), truncated (chain beyond 64 frames "
            "or unreadable), misaligned (Python runs and _PyEval_EvalFrameDefault frames differ in "
            "number: a truncated native walk)", "result", stacks)
        telemetry.watch_counters(
            "profiler_python_frames", "Python frames: recorded in the kernel, and named at drain "
            "(resolved) or not (unresolved: the code object could not be read; kept by address)",
            "result", frames)
        telemetry.watch_counters(
            "profiler_python", "CPython interpreters and code objects by event: processes_loaded, "
            "unsupported_versions, unreadable, processes_over_limit, codes_read, codes_unreadable, "
            "queue_full", "event", events)
        telemetry.watch_cache("python_codes", lambda: len(p.codes) if (p := python()) else 0,
                              caches.python_codes, lambda: p.codes.evictions if (p := python()) else 0)
        telemetry.watch_cache("python_frames", lambda: p.cached_frames if (p := python()) else 0,
                              4 * caches.python_codes, lambda: p.frame_evictions if (p := python()) else 0)


def _pid_namespace(pid: int) -> tuple[int, int]:
    """(device, inode) of the process's pid namespace, for thread ids as it numbers them."""
    try:
        st = os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return 0, 0
    return st.st_dev, st.st_ino


def interleave(frames: Sequence[Frame], python: Sequence[tuple[Frame, bool]]) -> tuple[tuple[Frame, ...], bool]:
    """``frames`` (kernel then user, leaf first) with each eval call's Python frames placed just
    above (leaf-side of) its ``_PyEval_EvalFrameDefault`` frame, innermost call first. Returns
    the stack and whether the groups and eval frames matched one to one; groups beyond the
    native eval frames (a truncated native walk) go at the root end."""
    groups: list[list[Frame]] = [[]]
    for frame, last in python:
        groups[-1].append(frame)
        if last:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if not groups:
        return tuple(frames), True
    out: list[Frame] = []
    g = evals = 0
    for frame in frames:
        if frame.function in EVAL_FUNCTIONS and frame.frame_type == "native":
            evals += 1
            if g < len(groups):
                out.extend(groups[g])
                g += 1
        out.append(frame)
    for rest in groups[g:]:
        out.extend(rest)
    return tuple(out), evals == len(groups)
