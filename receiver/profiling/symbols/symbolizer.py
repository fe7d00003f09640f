"""Stack addresses to ``Frame``s: kernel names from kallsyms, user names from ELF symbol tables
and JIT perf maps.

A process's executable mappings are captured when the source first hears of it
(``note_process``), and the ELF files behind them are parsed then, through
/proc/PID/map_files (which reaches files in other mount namespaces and deleted files), so a
process that exits before its samples are drained is still symbolized. Parsed files are shared
between processes in an LRU cache keyed by build id (else device+inode+mtime); each process
keeps the tables its mappings use. An address in no known mapping (dlopen) re-reads the maps of a
live process, at most once per ``REFRESH_AFTER_S``. Frames are cached per process and address,
within one global budget, so a stack seen again costs a dict lookup per frame.

Nothing raised by /proc or by a malformed file leaves ``symbolize``: such frames are unresolved,
keeping their address and mapping (path, build id, file offset) for a backend to symbolize.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from operator import attrgetter

from ..model import Frame, Mapping
from .elf import ElfError, ElfFile, SymbolTable, parse_elf_bytes, read_elf_fd, read_symtab_fd
from .gopclntab import GoFrame, GoTable
from .kallsyms import KernelSymbols

__all__ = ["Symbolizer", "SymbolizerStats", "REFRESH_AFTER_S", "vdso_image"]

log = logging.getLogger(__name__)

# Where distributions install separate debug files, by GNU build id (Debian's *-dbgsym, Fedora's
# *-debuginfo): /usr/lib/debug/.build-id/ab/cdef….debug.
DEBUG_DIRS = ("/usr/lib/debug",)
REFRESH_AFTER_S = 1.0               # least time between two re-reads of one process's maps/perf map
_MAX_PERF_MAP_BYTES = 256 << 20
_ANON_PATH = "//anon"               # perf's name for anonymous executable memory without a perf map
_DELETED = " (deleted)"
_FUNCTION = attrgetter("function")
_Frames = Frame | tuple[Frame, ...]    # what one address stands for


@dataclass(slots=True)
class SymbolizerStats:
    """Monotonic counters for self-metrics."""

    frames_resolved: int = 0
    frames_unresolved: int = 0
    file_cache_hits: int = 0
    file_cache_misses: int = 0        # files parsed
    file_cache_evictions: int = 0
    file_errors: int = 0              # files that were not readable ELF
    process_evictions: int = 0        # processes dropped by the max_processes bound
    frame_evictions: int = 0          # cached frames dropped at the max_cached_frames bound
    maps_reads: int = 0               # /proc/PID/maps reads (first sight and refreshes)


class _FileCache:
    """Parsed ELF files, LRU-bounded, keyed by build id (else the file's identity).

    ``_by_identity`` maps device+inode+mtime to that key so a file already parsed is found with
    one stat; a file that is not readable ELF is remembered as None so it is not re-parsed."""

    def __init__(self, max_files: int, stats: SymbolizerStats) -> None:
        self._max = max_files
        self._stats = stats
        self._files: OrderedDict[Hashable, ElfFile | None] = OrderedDict()
        self._by_identity: dict[Hashable, Hashable] = {}

    def __len__(self) -> int:
        return len(self._files)

    def get(self, identity: Hashable, read: Callable[[], ElfFile]) -> ElfFile | None:
        key = self._by_identity.get(identity)
        if key is not None and key in self._files:
            self._files.move_to_end(key)
            self._stats.file_cache_hits += 1
            return self._files[key]
        self._stats.file_cache_misses += 1
        try:
            elf: ElfFile | None = read()
        except ElfError as e:
            self._stats.file_errors += 1
            log.debug("no symbols from %r: %s", identity, e)
            elf = None
        key = elf.build_id if elf is not None and elf.build_id else identity
        if key in self._files:                 # the same build, parsed from another copy
            elf = self._files[key]
            self._files.move_to_end(key)
        else:
            self._files[key] = elf
            while len(self._files) > self._max:
                self._files.popitem(last=False)
                self._stats.file_cache_evictions += 1
        if len(self._by_identity) >= 4 * self._max:
            self._by_identity = {i: k for i, k in self._by_identity.items() if k in self._files}
        self._by_identity[identity] = key
        return elf


class _PerfMap:
    """JIT symbols from a ``/tmp/perf-PID.map`` (lines ``START SIZE name``, hex)."""

    __slots__ = ("starts", "ends", "names")

    def __init__(self, text: str) -> None:
        entries: dict[int, tuple[int, str]] = {}
        for line in text.splitlines():
            fields = line.split(None, 2)
            if len(fields) != 3:
                continue
            try:
                start, size = int(fields[0], 16), int(fields[1], 16)
            except ValueError:
                continue
            entries[start] = (start + size, fields[2].strip())   # a later entry wins (re-JIT)
        ordered = sorted(entries.items())
        self.starts = [s for s, _ in ordered]
        self.ends = [e for _, (e, _) in ordered]
        self.names = [n for _, (_, n) in ordered]

    def lookup(self, address: int) -> str:
        i = bisect_right(self.starts, address) - 1
        return self.names[i] if i >= 0 and address < self.ends[i] else ""


@dataclass(slots=True)
class _Region:
    """One executable mapping and how to name addresses in it."""

    start: int
    end: int
    mapping: Mapping
    symbols: SymbolTable | None    # the ELF file's (or the vdso's) symbols
    bias: int                      # ELF virtual address = address - bias
    anonymous: bool                # JIT code: named by the perf map
    go: GoTable | None = None      # a Go binary's table: Go frames, inlined calls expanded


class _Process:
    """What is known about one process: its executable mappings, perf map and frame caches."""

    __slots__ = ("pid", "starts", "regions", "alive", "refreshed_at", "perf_map",
                 "perf_map_path", "perf_map_signature", "perf_map_checked_at",
                 "leaf_frames", "return_frames")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.starts: list[int] = []
        self.regions: list[_Region] = []
        self.alive = True
        self.refreshed_at = float("-inf")
        self.perf_map: _PerfMap | None = None
        self.perf_map_path = ""                  # as the process sees it: /tmp/perf-NSPID.map
        self.perf_map_signature: tuple[int, int, int] | None = None
        self.perf_map_checked_at = float("-inf")
        self.leaf_frames: dict[int, _Frames] = {}   # sampled addresses
        self.return_frames: dict[int, _Frames] = {}  # return addresses (named by address - 1)

    def region_at(self, address: int) -> _Region | None:
        i = bisect_right(self.starts, address) - 1
        if i >= 0 and address < self.regions[i].end:
            return self.regions[i]
        return None

    def cached_frames(self) -> int:
        return len(self.leaf_frames) + len(self.return_frames)


class Symbolizer:
    """Turns (pid, user addresses, kernel addresses) into ``Frame``s, leaf first.

    Thread-safe: the source may note processes from its event loop while another thread
    symbolizes a drained interval."""

    def __init__(self, max_files: int = 256, max_processes: int = 4096,
                 max_cached_frames: int = 1 << 16,
                 kernel_symbols: KernelSymbols | None = None,
                 debug_dirs: Sequence[str] = DEBUG_DIRS) -> None:
        """``max_cached_frames`` bounds the per-address frame caches of all processes and the
        kernel together; ``kernel_symbols`` defaults to /proc/kallsyms, read on first use;
        ``debug_dirs`` are searched for ``.build-id/xx/rest.debug`` files of stripped binaries."""
        self.stats = SymbolizerStats()
        self._debug_dirs = tuple(debug_dirs)
        self._files = _FileCache(max_files, self.stats)
        self._max_processes = max_processes
        self._processes: OrderedDict[int, _Process] = OrderedDict()
        self._kernel = kernel_symbols
        self._kernel_leaf: dict[int, _Frames] = {}
        self._kernel_return: dict[int, _Frames] = {}
        self._max_cached_frames = max_cached_frames
        self._cached_frames = 0
        self._lock = threading.Lock()

    # -- public API -------------------------------------------------------------------------

    def note_process(self, pid: int) -> None:
        """Captures /proc/PID/maps and parses the ELF files behind it now, while the process
        lives. Noting a known pid again (exec, pid reuse) replaces what was known."""
        with self._lock:
            self._forget(pid)
            self._add_process(pid)

    def symbolize(self, pid: int, user_addrs: Sequence[int],
                  kernel_addrs: Sequence[int]) -> tuple[Frame, ...]:
        """Kernel frames then user frames, each leaf first as the BPF stack maps give them. The
        first address of each list is the sampled one; the others are return addresses, named
        by ``address - 1`` (the call) but reported as given."""
        with self._lock:
            frames: list[Frame] = []
            if kernel_addrs:
                self._kernel_frames(kernel_addrs, frames)
            if user_addrs:
                self._user_frames(self._process(pid), user_addrs, frames)
            unresolved = list(map(_FUNCTION, frames)).count("")
            self.stats.frames_resolved += len(frames) - unresolved
            self.stats.frames_unresolved += unresolved
            if self._cached_frames > self._max_cached_frames:
                self._drop_frame_caches()
            return tuple(frames)

    def executable_regions(self, pid: int) -> list[tuple[int, int, int | None, str, str, bool]]:
        """The executable mappings captured for ``pid`` (none when it was never noted): (start,
        end, load bias or None, path, build id, anonymous), sorted by start. The unwinder
        builds its tables from these, so unwinding and naming agree on every mapping."""
        with self._lock:
            proc = self._processes.get(pid)
            if proc is None:
                return []
            return [(r.start, r.end, r.bias if r.symbols is not None else None, r.mapping.path,
                     r.mapping.build_id, r.anonymous) for r in proc.regions]

    def forget(self, pid: int) -> None:
        """Drops what is known about ``pid`` (after its last samples were symbolized)."""
        with self._lock:
            self._forget(pid)

    def cache_sizes(self) -> dict[str, tuple[int, int, int]]:
        """(entries, limit, evictions) of the file, process and frame caches, for self-metrics."""
        s = self.stats
        return {"symbol_files": (len(self._files), self._files._max, s.file_cache_evictions),
                "symbol_processes": (len(self._processes), self._max_processes, s.process_evictions),
                "symbol_frames": (self._cached_frames, self._max_cached_frames, s.frame_evictions)}

    # -- kernel -----------------------------------------------------------------------------

    def load_kernel_symbols(self) -> None:
        """Reads kallsyms now, not at the first kernel frame: the profiler calls this in its
        first drain, so the ~0.1 s read is part of its start-up, not of a later interval that
        happens to see the first sample taken in the kernel."""
        with self._lock:
            self._kernel_symbols()

    def _kernel_symbols(self) -> KernelSymbols:
        if self._kernel is None:
            self._kernel = KernelSymbols()
        return self._kernel

    def _kernel_frames(self, addrs: Sequence[int], out: list[Frame]) -> None:
        kernel = self._kernel_symbols()
        _cached_stack(addrs, self._kernel_leaf, self._kernel_return,
                      lambda addr, is_return: self._kernel_frame(kernel, addr, is_return), out)

    def _kernel_frame(self, kernel: KernelSymbols, addr: int, is_return: bool) -> Frame:
        frame = Frame(addr, kernel.lookup(addr - 1 if is_return else addr), "kernel",
                      kernel.mapping)
        (self._kernel_return if is_return else self._kernel_leaf)[addr] = frame
        self._cached_frames += 1
        return frame

    # -- user -------------------------------------------------------------------------------

    def _user_frames(self, proc: _Process, addrs: Sequence[int], out: list[Frame]) -> None:
        _cached_stack(addrs, proc.leaf_frames, proc.return_frames,
                      lambda addr, is_return: self._user_frame(proc, addr, is_return), out)

    def _user_frame(self, proc: _Process, addr: int, is_return: bool) -> _Frames:
        """Names ``addr`` and caches the frame, unless a later refresh could still name it
        (no mapping yet, or JIT code not yet in the perf map)."""
        lookup = addr - 1 if is_return else addr
        region = proc.region_at(lookup)
        if region is None and self._may_refresh(proc):
            self._read_maps(proc)
            region = proc.region_at(lookup)
        if region is None:
            return Frame(addr, "", "native", None)
        if region.go is not None:
            go_frames = region.go.frames(lookup - region.bias)
            if go_frames:
                return self._go_frames(proc, addr, is_return, region.mapping, go_frames)
        if region.symbols is not None:
            name = region.symbols.lookup(lookup - region.bias)
        elif region.anonymous:
            name = self._jit_name(proc, lookup)
            if not name:
                return Frame(addr, "", "native", region.mapping)
        else:
            name = ""
        frame = Frame(addr, name, "native", region.mapping)
        (proc.return_frames if is_return else proc.leaf_frames)[addr] = frame
        self._cached_frames += 1
        return frame

    def _go_frames(self, proc: _Process, addr: int, is_return: bool, mapping: Mapping,
                   go_frames: list[GoFrame]) -> Frame | tuple[Frame, ...]:
        """A Go pc's frames, innermost first: the functions inlined at it, then its own (one
        frame when nothing is inlined there), each with its file and line."""
        made = tuple(Frame(addr, g.function, "go", mapping, g.file, g.line) for g in go_frames)
        frame: Frame | tuple[Frame, ...] = made[0] if len(made) == 1 else made
        (proc.return_frames if is_return else proc.leaf_frames)[addr] = frame
        self._cached_frames += len(made)
        return frame

    def _jit_name(self, proc: _Process, address: int) -> str:
        name = proc.perf_map.lookup(address) if proc.perf_map is not None else ""
        now = time.monotonic()
        if name or not proc.alive or now - proc.perf_map_checked_at < REFRESH_AFTER_S:
            return name
        self._read_perf_map(proc)
        return proc.perf_map.lookup(address) if proc.perf_map is not None else ""

    # -- processes --------------------------------------------------------------------------

    def _process(self, pid: int) -> _Process:
        proc = self._processes.get(pid)
        if proc is None:
            return self._add_process(pid)
        self._processes.move_to_end(pid)
        return proc

    def _add_process(self, pid: int) -> _Process:
        proc = _Process(pid)
        self._read_maps(proc)
        self._processes[pid] = proc
        while len(self._processes) > self._max_processes:
            _, evicted = self._processes.popitem(last=False)
            self._cached_frames -= evicted.cached_frames()
            self.stats.process_evictions += 1
        return proc

    def _forget(self, pid: int) -> None:
        proc = self._processes.pop(pid, None)
        if proc is not None:
            self._cached_frames -= proc.cached_frames()

    def _may_refresh(self, proc: _Process) -> bool:
        return proc.alive and time.monotonic() - proc.refreshed_at >= REFRESH_AFTER_S

    def _drop_frame_caches(self) -> None:
        self.stats.frame_evictions += self._cached_frames
        for proc in self._processes.values():
            proc.leaf_frames.clear()
            proc.return_frames.clear()
        self._kernel_leaf.clear()
        self._kernel_return.clear()
        self._cached_frames = 0

    def _read_maps(self, proc: _Process) -> None:
        """(Re)reads the executable mappings. A process that is gone, or a zombie whose maps are
        already empty, keeps what was captured before."""
        proc.refreshed_at = time.monotonic()
        self.stats.maps_reads += 1
        try:
            with open(f"/proc/{proc.pid}/maps", "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            proc.alive = False
            return
        if not lines:
            proc.alive = False          # zombie or kernel thread: nothing to map, now or later
            return
        executable = []
        for line in lines:
            fields = line.split(None, 5)
            if len(fields) >= 5 and "x" in fields[1]:
                executable.append(fields)
        if any(len(f) == 5 or f[5].startswith("[anon:") for f in executable):
            self._read_perf_map(proc)
        old = {(r.start, r.end, r.mapping.file_offset, r.mapping.path): r for r in proc.regions}
        regions = []
        for fields in executable:
            region = self._region(proc, fields, old)
            if region is not None:
                regions.append(region)
        regions.sort(key=lambda r: r.start)
        proc.regions = regions
        proc.starts = [r.start for r in regions]
        self._cached_frames -= proc.cached_frames()
        proc.leaf_frames.clear()
        proc.return_frames.clear()

    def _region(self, proc: _Process, fields: list[str],
                old: dict[tuple[int, int, int, str], _Region]) -> _Region | None:
        try:
            start_text, end_text = fields[0].split("-")
            start, end, offset = int(start_text, 16), int(end_text, 16), int(fields[2], 16)
        except ValueError:
            return None
        name = fields[5] if len(fields) == 6 else ""
        if not name or name.startswith("[anon:"):
            path = proc.perf_map_path if proc.perf_map is not None else _ANON_PATH
            return _Region(start, end, Mapping(start, end, offset, path), None, 0, True)
        path = name.removesuffix(_DELETED)
        reused = old.get((start, end, offset, path))
        if reused is not None:
            return reused
        if name == "[vdso]":
            elf = self._vdso(proc.pid, start, end)
        elif name.startswith("["):             # [vsyscall] and the like: no symbols to read
            elf = None
        else:
            elf = self._mapped_file(proc.pid, fields[0], path, name.endswith(_DELETED))
        build_id = elf.build_id if elf is not None else ""
        go_build_id = elf.go.build_id if elf is not None and elf.go is not None else ""
        mapping = Mapping(start, end, offset, path, build_id, go_build_id)
        bias = elf.load_bias(start, offset) if elf is not None else None
        if elf is None or bias is None:
            return _Region(start, end, mapping, None, 0, False)
        return _Region(start, end, mapping, elf.symbols, bias, False, elf.go)

    def _mapped_file(self, pid: int, address_range: str, path: str,
                     deleted: bool) -> ElfFile | None:
        """The parsed ELF file behind a mapping: through /proc/PID/map_files (the very file
        mapped, whatever mount namespace or deletion), else the path under /proc/PID/root."""
        candidates = [(f"/proc/{pid}/map_files/{address_range}", True)]
        if not deleted and path.startswith("/"):
            candidates.append((f"/proc/{pid}/root{path}", False))
        for candidate, follow in candidates:
            try:
                st = os.stat(candidate, follow_symlinks=follow)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            return self._files.get((st.st_dev, st.st_ino, st.st_mtime_ns),
                                   lambda: self._with_debug_symbols(self._read_file(candidate, follow), pid))  # noqa: B023 (called at once)
        return None

    def _with_debug_symbols(self, elf: ElfFile, pid: int) -> ElfFile:
        """A stripped file (only .dynsym, or nothing) takes the symbols of its separate debug
        file, found by build id, when one is installed: in the process's own root first (a
        container image's debug files), then on this host."""
        if not elf.build_id or len(elf.build_id) < 3:
            return elf
        for directory in [f"/proc/{pid}/root{d}" for d in self._debug_dirs] + list(self._debug_dirs):
            path = f"{directory}/.build-id/{elf.build_id[:2]}/{elf.build_id[2:]}.debug"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                symbols = read_symtab_fd(fd)
            except ElfError as e:
                log.debug("debug file %s: %s", path, e)
                continue
            finally:
                os.close(fd)
            if len(symbols) > len(elf.symbols):
                return ElfFile(build_id=elf.build_id, segments=elf.segments, symbols=symbols, go=elf.go)
        return elf

    @staticmethod
    def _read_file(path: str, follow: bool) -> ElfFile:
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise ElfError(f"{path}: {e}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ElfError(f"{path}: not a regular file")
            return read_elf_fd(fd)
        finally:
            os.close(fd)

    def _vdso(self, pid: int, start: int, end: int) -> ElfFile | None:
        """The vdso is an ELF image in the process's memory; identical images share one parse."""
        image = vdso_image(pid, start, end)
        if image is None:
            return None
        return self._files.get(("[vdso]", image), lambda: parse_elf_bytes(image))

    def _read_perf_map(self, proc: _Process) -> None:
        """Loads /tmp/perf-NSPID.map as the process sees it, when it changed since last read.

        The file is opened without following a final symlink and only if regular, so a
        process cannot point the agent at a FIFO or at a file outside its own /tmp."""
        proc.perf_map_checked_at = time.monotonic()
        if not proc.perf_map_path:
            proc.perf_map_path = f"/tmp/perf-{_namespace_pid(proc.pid)}.map"
        host_path = f"/proc/{proc.pid}/root{proc.perf_map_path}"
        try:
            fd = os.open(host_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            if not stat.S_ISREG(st.st_mode) or signature == proc.perf_map_signature:
                return
            with os.fdopen(os.dup(fd), "rb") as f:
                text = f.read(_MAX_PERF_MAP_BYTES).decode("utf-8", "replace")
        except OSError:
            return
        finally:
            os.close(fd)
        proc.perf_map = _PerfMap(text)
        proc.perf_map_signature = signature


def vdso_image(pid: int, start: int, end: int) -> bytes | None:
    """The vdso mapped at [start, end) in ``pid``: an ELF image in the process's memory."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)
    except (OSError, OverflowError):
        return None


def _cached_stack(addrs: Sequence[int], leaf_frames: dict[int, _Frames], return_frames: dict[int, _Frames],
                  make: Callable[[int, bool], _Frames], out: list[Frame]) -> None:
    """Appends the frames of one leaf-first stack: each from its cache (the leaf and the return
    addresses are named differently, so cached apart), else ``make(address, is_return)``. An
    address may stand for several frames (a Go pc with inlined calls), innermost first."""
    leaf = leaf_frames.get(addrs[0])
    if leaf is None:
        leaf = make(addrs[0], False)
    if isinstance(leaf, tuple):
        out.extend(leaf)
    else:
        out.append(leaf)
    get = return_frames.get
    for addr in addrs[1:]:
        frame = get(addr)
        if frame is None:
            frame = make(addr, True)
        if isinstance(frame, tuple):
            out.extend(frame)
        else:
            out.append(frame)


def _namespace_pid(pid: int) -> int:
    """The pid as the process's own pid namespace numbers it (the name of its perf map)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        pass
    return pid
