"""Unwind tables for the profiler's in-kernel stack walker: which rows of ``unwind_rows`` belong
to which file, and which files each process has mapped where (``unwind_processes``).

A worker thread does the work, off the event loop: for a newly noticed process it takes the
executable mappings the symbolizer captured, builds each file's table once per build id
(``unwind_table``), writes it into one free range of the kernel's row array, and then publishes
the process's mapping list. Tables stay loaded while a process uses them and afterwards until
their rows are needed (least recently used first), so a binary that starts again costs nothing.
Everything that does not fit (rows, processes, mappings beyond ``UNWIND_MAX_MAPPINGS``) and every
file without usable call-frame information is counted; such code is walked with frame pointers.
Go code has no ``.eh_frame``: its rows come from ``.gopclntab`` (``go_table.py``), merged with the
``.eh_frame`` rows of a cgo binary's C code.
"""

from __future__ import annotations

import ctypes
import logging
import os
import stat
import threading
from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from ..abi import ROW, SET_TABLES_USER, UNWIND_MAX_MAPPINGS, UNWIND_STOP, UnwindMapping, UnwindProcess, UnwindRow
from ..runtimes import Runtimes
from ..symbols.elf import ElfError, section_sizes
from ..symbols.gopclntab import GoTableError
from ..symbols.symbolizer import Symbolizer, vdso_image
from ..work_queue import QueueWorker
from .cfi_table import ReadelfMissingError, UnwindTable, UnwindTableError, build_table
from .go_table import go_table_of_fd, merge_tables

__all__ = ["MAX_MAPPINGS", "UnwindTables", "RowAllocator"]

log = logging.getLogger(__name__)

MAX_MAPPINGS = UNWIND_MAX_MAPPINGS   # a process's mappings the kernel walk can know
STOP = UNWIND_STOP           # table_start of a file whose table did not fit
MAX_FAILED_FILES = 4096      # files remembered as having no usable table
# A file's CFI may use at most this share of the row array: one huge library (libLLVM's
# .eh_frame runs to a million rows) must not evict everything else or stall the worker.
MAX_TABLE_SHARE = 0.25
CFI_BYTES_PER_ROW = 4        # .eh_frame bytes per row: libc 5.4, libpython 4.6, node 7.4 (an estimate before readelf)
ESTIMATE_SLACK = 2           # a file estimated at up to twice the share is built, then checked by its rows
_CFI_SECTIONS = (b".eh_frame", b".debug_frame")
QUEUE_SIZE = 4096
MAX_RETRIES = 3              # re-captures of a process whose mappings changed while loading


class RowAllocator:
    """First-fit ranges of the row array; freed ranges merge with their neighbours."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]   # (start, length), sorted

    @property
    def free_rows(self) -> int:
        return sum(n for _, n in self._free)

    def allocate(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                return start
        return None

    def release(self, start: int, n: int) -> None:
        self._free.append((start, n))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self._free = merged


@dataclass(slots=True)
class _Loaded:
    start: int
    rows: int
    users: int = 0


class UnwindTables:
    """Keeps ``unwind_rows``/``unwind_processes`` of one loaded profiler program in step with the
    processes the profiler has noticed. ``request``/``forget`` only queue work; one worker
    thread applies it in order."""

    def __init__(self, bpf: object, symbolizer: Symbolizer, capacity: int, max_processes: int,
                 runtimes: Runtimes | None = None) -> None:
        """``runtimes``: told of every process loaded or forgotten here (runtime frames)."""
        self._runtimes = runtimes
        self._bpf = bpf
        self._rows = bpf["unwind_rows"]            # type: ignore[index]
        self._procs = bpf["unwind_processes"]      # type: ignore[index]
        self._settings = bpf["settings"]           # type: ignore[index]
        self._tables_version = 0                   # settings[SET_TABLES_USER]: renewed per change
        self._mappings = bpf["unwind_mappings"]    # type: ignore[index]
        self._free_slots = list(range(max_processes - 1, -1, -1))
        self._epoch = 0                   # last epoch given to a process (UnwindProcess.epoch)
        self._slot_of: dict[int, int] = {}
        self._symbolizer = symbolizer
        self._allocator = RowAllocator(capacity)
        self._max_processes = max_processes
        self._loaded: OrderedDict[Hashable, _Loaded] = OrderedDict()   # LRU: unused ones first out
        self._failed: OrderedDict[Hashable, str] = OrderedDict()
        self._process_files: dict[int, list[Hashable]] = {}
        self._retries: dict[int, int] = {}        # pid → re-captures after stale mappings
        self._lock = threading.Lock()
        self.stats: Counter[str] = Counter()       # monotonic counters, read by self-metrics
        self._worker = QueueWorker("unwind-tables", self._apply, QUEUE_SIZE, self.stats)
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> UnwindTables:
        self._worker.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the worker. A table still being built when the timeout passes is dropped at its
        next map write: the maps' descriptors are closed right after this returns."""
        self._stopped.set()
        self._worker.stop(timeout)

    def request(self, pid: int) -> None:
        """Load tables for ``pid`` (noticed, or exec'd): queued, never blocks the caller."""
        self._put("load", pid)

    def forget(self, pid: int) -> None:
        """``pid`` is gone: drop its mapping list and release its tables."""
        self._put("forget", pid)

    def wait_idle(self, timeout: float) -> bool:
        """For tests and tools: whether the queue drained within ``timeout`` seconds, and the
        walkers that read the tables are loaded (a compile-cache hit loads them after sampling
        starts: until then samples carry frame-pointer stacks)."""
        wait_loaded = getattr(self._bpf, "wait_loaded", None)
        return self._worker.wait_idle(timeout) and (wait_loaded is None or wait_loaded(timeout))

    def gauges(self) -> dict[str, int]:
        with self._lock:
            return {"rows_used": self._allocator.capacity - self._allocator.free_rows,
                    "rows_capacity": self._allocator.capacity,
                    "tables_loaded": len(self._loaded),
                    "processes": len(self._process_files)}

    def _put(self, what: str, pid: int) -> None:
        self._worker.put((what, pid))

    def _apply(self, item: tuple[str, int]) -> None:
        what, pid = item
        if self._stopped.is_set():
            return
        if what == "load":
            if self._load(pid, build_all=False):
                self._put("load_rest", pid)
        elif what == "load_rest":
            self._load(pid, build_all=True)
        elif what == "forget":
            self._forget(pid)

    # ------------------------------------------------------------------ work

    def _load(self, pid: int, build_all: bool) -> bool:
        """Builds the process's mapping list and switches its kernel entry to it in one update
        (a reload never leaves a gap in which its samples fall back to frame pointers).

        In two passes, so one process with a hundred libraries does not keep every other one
        waiting: first with the tables already loaded plus the program's own (walks stop in the
        files still missing), queued again behind the others for the rest. Returns whether
        files were left for that second pass."""
        regions = self._symbolizer.executable_regions(pid)
        if not regions:
            return False
        if not self._free_slots:
            self.stats["processes_over_limit"] += 1
            return False
        program = min((r[0] for r in regions if r[3].startswith("/")), default=None)
        entries: list[tuple[int, int, int, int, int]] = []
        keys: list[Hashable] = []
        pending = False
        for start, end, bias, path, build_id, anonymous in regions:
            if anonymous or bias is None or not (path.startswith("/") or path == "[vdso]"):
                entries.append((start, end, 0, 0, 0))   # JIT code: frame pointers there
                continue
            loaded = self._table_for(pid, start, end, path, build_id,
                                     build=build_all or start == program)
            if loaded == "pending":
                pending = True
                entries.append((start, end, 0, STOP, 0))
                continue
            if loaded is None:
                entries.append((start, end, 0, 0, 0))   # no CFI, unreadable: frame pointers
                continue
            if loaded == "full":
                # Frame pointers would guess in code built without them: walks stop here.
                entries.append((start, end, 0, STOP, 0))
                continue
            key, table = loaded  # type: ignore[misc]
            keys.append(key)
            entries.append((start, end, bias & (2**64 - 1), table.start, table.rows))
        if len(entries) > MAX_MAPPINGS:
            self.stats["mappings_over_limit"] += len(entries) - MAX_MAPPINGS
            # Keep the mappings with tables (and the lowest addresses among the rest).
            entries.sort(key=lambda e: (e[4] == 0, e[0]))
            entries = entries[:MAX_MAPPINGS]
        entries.sort()
        if not _still_mapped(pid, regions):
            # It exec'd (or unmapped code) since the mappings were captured: publishing them now
            # would walk the new image with the old tables. Capture them again and retry (a
            # starting interpreter maps its extension modules just after its first samples).
            self.stats["stale_mappings"] += 1
            self._unpin(keys)
            retries = self._retries.get(pid, 0)
            if retries < MAX_RETRIES and os.path.exists(f"/proc/{pid}"):
                self._retries[pid] = retries + 1
                self._symbolizer.note_process(pid)
                self._put("load", pid)
            return False
        self._retries.pop(pid, None)
        if self._stopped.is_set():
            self._unpin(keys)
            return False
        slot = self._free_slots.pop()
        n = len(entries)
        first_key = slot * MAX_MAPPINGS
        keys_arr = (ctypes.c_uint32 * n)(*range(first_key, first_key + n))
        values = (UnwindMapping * n)(*(UnwindMapping(*e) for e in entries))
        try:
            self._mappings.items_update_batch(keys_arr, values)
        except Exception:   # noqa: BLE001 -- kernels without batch ops
            for i in range(n):
                self._mappings[keys_arr[i]] = values[i]
        try:
            self._epoch = self._epoch % 0xFFFFFFFF + 1   # never 0: the kernel's cache starts zeroed
            self._procs[self._procs.Key(pid)] = UnwindProcess(slot, n, self._epoch)
        except Exception as e:   # noqa: BLE001 -- full map: the process keeps frame pointers
            self.stats["processes_over_limit"] += 1
            log.debug("unwind_processes[%d]: %s", pid, e)
            self._unpin(keys)
            self._free_slots.append(slot)
            return False
        if self._runtimes is not None:
            self._runtimes.load(pid, regions)
        # Before the old slot can be reused: no CPU walks with a cached copy of the old entry.
        self._tables_changed()
        with self._lock:
            old_keys = self._process_files.get(pid)
            old_slot = self._slot_of.get(pid)
            self._process_files[pid] = keys     # pinned by _table_for, released by _forget
            self._slot_of[pid] = slot
        if old_keys is not None and old_slot is not None:
            self._unpin(old_keys)
            self._free_slots.append(old_slot)
        self.stats["processes_loaded" if not pending else "processes_first_pass"] += 1
        return pending

    def _tables_changed(self) -> None:
        """Renews user space's version of unwind_processes/runtime_processes, after writing them: each
        CPU's cached copy of its last process's entries (bpf/profiler.bpf.c, process_cache) is
        then read again. Only this worker thread writes those maps, so a plain write suffices."""
        self._tables_version = self._tables_version % 0xFFFFFFFF + 1
        self._settings[ctypes.c_int(SET_TABLES_USER)] = ctypes.c_uint32(self._tables_version)

    def _unpin(self, keys: list[Hashable]) -> None:
        with self._lock:
            for key in keys:
                loaded = self._loaded.get(key)
                if loaded is not None:
                    loaded.users -= 1

    def _forget(self, pid: int) -> None:
        if self._runtimes is not None:
            self._runtimes.forget(pid)
        self._retries.pop(pid, None)
        with self._lock:
            keys = self._process_files.pop(pid, None)
            if keys is None:
                return
            slot = self._slot_of.pop(pid)
        self._unpin(keys)
        try:
            del self._procs[self._procs.Key(pid)]
        except KeyError:
            pass
        self._tables_changed()
        # The slot is reused only after the kernel's entry is gone (a sample in flight may still
        # read the old mappings, which describe the old process: at worst a truncated walk).
        self._free_slots.append(slot)

    def _table_for(self, pid: int, start: int, end: int, path: str, build_id: str,
                   build: bool = True) -> tuple[Hashable, _Loaded] | str | None:
        """The file's loaded table; "full" when it has one that does not fit; None when it has
        none (or cannot be read); "pending" when it is not loaded yet and ``build`` is off."""
        fd = _vdso_fd(pid, start, end) if path == "[vdso]" else _open_mapped(pid, start, end, path)
        if fd is None:
            self.stats["files_unreadable"] += 1
            return None
        try:
            st = os.fstat(fd)
            key: Hashable = build_id or (st.st_dev, st.st_ino, st.st_mtime_ns)
            with self._lock:
                loaded = self._loaded.get(key)
                if loaded is not None:          # pinned until the process is forgotten
                    loaded.users += 1
                    self._loaded.move_to_end(key)
            if loaded is not None:
                return key, loaded
            if key in self._failed:     # too large: stop there; no CFI: frame pointers
                return "full" if self._failed[key] == "too large" else None
            if not build:
                return "pending"
            limit = int(self._allocator.capacity * MAX_TABLE_SHARE)
            try:
                cfi_bytes = max(section_sizes(fd, _CFI_SECTIONS).values(), default=0)
            except ElfError:
                cfi_bytes = 0
            if cfi_bytes // CFI_BYTES_PER_ROW > ESTIMATE_SLACK * limit:
                self._remember_failed(key, "too large")
                self.stats["tables_too_large"] += 1
                return "full"
            go_rows = self._go_rows(fd, path)
            try:
                if go_rows is not None and cfi_bytes == 0:   # pure Go: no readelf run
                    table = go_rows
                else:
                    table = build_table(fd)
                    if go_rows is not None:                   # cgo: C rows and Go rows
                        table = merge_tables(table, go_rows)
            except ReadelfMissingError as e:
                if not self.stats["readelf_missing"]:
                    log.warning("profiler: %s: user stacks are walked with frame pointers only", e)
                self.stats["readelf_missing"] += 1
                if go_rows is None:
                    return None
                table = go_rows
            except UnwindTableError as e:
                if go_rows is None:
                    self._remember_failed(key, str(e))
                    self.stats["files_without_cfi"] += 1
                    log.debug("no unwind table for %s: %s", path, e)
                    return None
                table = go_rows
        finally:
            os.close(fd)
        if len(table) > limit:           # a large Go program: its size is known only once built
            self._remember_failed(key, "too large")
            self.stats["tables_too_large"] += 1
            return "full"
        loaded = self._store(key, table.rows)
        if loaded is None:
            self.stats["tables_full"] += 1
            return "full"
        self.stats["tables_built"] += 1
        self.stats["rows_written"] += len(table)
        return key, loaded

    def _go_rows(self, fd: int, path: str) -> UnwindTable | None:
        """Rows from the file's ``.gopclntab`` (Go code), None when it has none or it cannot be
        read (counted as ``go_tables_unreadable``)."""
        try:
            rows = go_table_of_fd(fd)
        except (GoTableError, ElfError) as e:
            self.stats["go_tables_unreadable"] += 1
            log.debug("no Go unwind rows for %s: %s", path, e)
            return None
        if rows is not None:
            self.stats["go_tables_built"] += 1
        return rows

    def _remember_failed(self, key: Hashable, reason: str) -> None:
        self._failed[key] = reason
        while len(self._failed) > MAX_FAILED_FILES:
            self._failed.popitem(last=False)

    def _store(self, key: Hashable, rows: bytes) -> _Loaded | None:
        """Writes rows into a free range, evicting unused tables (oldest first) to make room."""
        n = len(rows) // ROW.size
        if n > self._allocator.capacity * MAX_TABLE_SHARE:
            self.stats["tables_too_large"] += 1
            return None
        with self._lock:
            first = self._allocator.allocate(n)
            evictable = sum(t.rows for t in self._loaded.values() if t.users <= 0)
            if first is None and self._allocator.free_rows + evictable < n:
                return None                     # evicting could not make room: keep what is loaded
            while first is None:
                unused = next((k for k, t in self._loaded.items() if t.users <= 0), None)
                if unused is None:
                    return None
                gone = self._loaded.pop(unused)
                self._allocator.release(gone.start, gone.rows)
                self.stats["tables_evicted"] += 1
                first = self._allocator.allocate(n)
        if self._stopped.is_set():     # stopping: the map may be closed any moment
            with self._lock:
                self._allocator.release(first, n)
            return None
        keys = (ctypes.c_uint32 * n)(*range(first, first + n))
        values = (UnwindRow * n).from_buffer_copy(rows)
        try:
            self._rows.items_update_batch(keys, values)
        except Exception:   # noqa: BLE001 -- kernels without batch ops: one row at a time
            for i in range(n):
                self._rows[keys[i]] = values[i]
        loaded = _Loaded(first, n, users=1)     # pinned by the load that built it
        with self._lock:
            self._loaded[key] = loaded
        return loaded


def _still_mapped(pid: int, regions: list[tuple[int, int, int | None, str, str, bool]]) -> bool:
    """Whether every captured executable mapping is still mapped as it was."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return False
    now = set()
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) >= 5 and "x" in fields[1]:
            # Parsed, not compared as text: maps pads addresses to 8 digits (non-PIE executables).
            start_text, _, end_text = fields[0].partition("-")
            now.add((int(start_text, 16), int(end_text, 16),
                     fields[5].removesuffix(" (deleted)") if len(fields) == 6 else ""))
    for start, end, _, path, _, anonymous in regions:
        if (start, end, "" if anonymous and not path.startswith("/") else path) not in now \
                and not anonymous:
            return False
    return True


def _vdso_fd(pid: int, start: int, end: int) -> int | None:
    """The process's vdso image (with its .eh_frame) in a memfd, so readelf reads it like a
    file; identical images share one table (same build id)."""
    image = vdso_image(pid, start, end)
    if image is None:
        return None
    fd = os.memfd_create("vdso", os.MFD_CLOEXEC)
    os.write(fd, image)
    return fd


def _open_mapped(pid: int, start: int, end: int, path: str) -> int | None:
    """The very file mapped at [start, end) (through map_files), else the path in the process's
    root; None when neither is a readable regular file."""
    candidates = [(f"/proc/{pid}/map_files/{start:x}-{end:x}", True)]
    if path.startswith("/"):
        candidates.append((f"/proc/{pid}/root{path}", False))
    for candidate, follow in candidates:
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(candidate, flags)
        except OSError:
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
    return None
