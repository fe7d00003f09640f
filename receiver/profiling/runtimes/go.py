"""Goroutine labels (``pprof.Do``, ``pprof.SetGoroutineLabels``) as sample attributes.

The kernel half (bpf/profiler.bpf.c, ``go_labels_of``): on amd64 Go 1.17 and later keep the
running goroutine's ``g`` in R14 while Go code runs (ABIInternal), and a perf-event sample's user
registers carry R14 (or, sampled in the kernel, the registers saved at kernel entry). For a
process with an entry in ``go_processes`` the walk reads ``g.m``, checks ``m.curg == g`` or
``m.g0 == g`` (R14 is some other value in C code: then no labels), and puts ``m.curg.labels``, the
pointer to the goroutine's immutable label set, in the sample key: samples of different label
sets are different samples. No kernel struct is read (not ``task_struct->thread.fsbase``).

The user-space half (here): the label sets behind the pointers are read once per drain from
``/proc/PID/mem`` (``LabelReader``), bounded as the OpenTelemetry eBPF profiler bounds them
(``MAX_LABELS`` labels, keys to ``MAX_KEY_BYTES``, values to ``MAX_VALUE_BYTES``), and become
the sample attributes ``process.context.label.<key>`` (the OpenTelemetry profiler's names) and
pprof labels ``<key>``. Why user space: Go 1.21 to 1.23 keep labels in a Go map, which a BPF
program walks only partly (the OpenTelemetry profiler reads 16 buckets at most); user space reads
the map as Go lays it out, overflow buckets included.

The window: a label set is read at the drain after its samples, not at the sample. Label sets
are immutable, but once no goroutine holds one (``pprof.Do`` returned) the garbage collector may
free it and a later label set may be allocated at the same address before the drain; samples of
both then share one key and carry the later set's labels. Read results are therefore memoized
only within one drain (``LabelReader.begin``), never across drains.

Offsets: ``GO_OFFSETS`` per Go minor version, each row printed by deploy/scripts/go-offsets
from the DWARF of an unstripped binary built with that toolchain (the versions named in each row;
tests/profiling/test_go_labels_e2e.py checks the rows against the toolchains it builds with). A
binary of a Go version not in the table gets no labels, counted as ``unsupported_version``; its
version is read from ``.go.buildinfo``, which stripped binaries keep.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

from ..symbols.elf import fd_reader, named_sections

__all__ = ["GO_OFFSETS", "GoLayout", "GoLabels", "LabelReader", "go_version", "layout_for",
           "MAX_LABELS", "MAX_KEY_BYTES", "MAX_VALUE_BYTES", "MAX_LABEL_SETS", "LABEL_ATTRIBUTE_PREFIX",
           "GoOffsets"]

log = logging.getLogger(__name__)

MAX_LABELS = 10              # labels per sample (the OpenTelemetry profiler's MAX_CUSTOM_LABELS)
MAX_KEY_BYTES = 15           # ... key bytes (its CUSTOM_LABEL_MAX_KEY_LEN - 1)
MAX_VALUE_BYTES = 47         # ... value bytes (its CUSTOM_LABEL_MAX_VAL_LEN - 1)
MAX_LABEL_SETS = 1024        # distinct label sets per process per drain; beyond: no labels, counted
MAX_MAP_BUCKETS = 64         # Go <= 1.23: buckets (overflow ones included) read per label map
MAX_STRING_BYTES = 4096      # a longer key or value is not a label: the read is refused
LABEL_ATTRIBUTE_PREFIX = "process.context.label."


@dataclass(frozen=True)
class GoLayout:
    """Where a Go version keeps what the labels are read through (byte offsets)."""

    g_m: int
    g_labels: int
    m_g0: int
    m_curg: int
    kind: str                    # "map" (Go <= 1.23: *labelMap -> *hmap) or "slice" (1.24+)
    # slice: labelMap.list ([]label), label size, key and value offsets in a label
    list_at: int = 0
    label_size: int = 32
    key_at: int = 0
    value_at: int = 16
    # map: hmap.count, hmap.B, hmap.buckets, hmap.oldbuckets; bucket tophash, keys, values,
    # overflow, size (bmap of map[string]string: 8 entries)
    hmap_count: int = 0
    hmap_b: int = 9
    hmap_buckets: int = 16
    hmap_oldbuckets: int = 24
    bucket_keys: int = 8
    bucket_values: int = 136
    bucket_overflow: int = 264
    bucket_size: int = 272


_MAP = dict(kind="map", hmap_count=0, hmap_b=9, hmap_buckets=16, hmap_oldbuckets=24, bucket_keys=8,
            bucket_values=136, bucket_overflow=264, bucket_size=272)
_SLICE = dict(kind="slice", list_at=0, label_size=32, key_at=0, value_at=16)

# (major, minor) -> layout; each row from `go run ./deploy/scripts/go-offsets` on a binary built
# with the toolchain named (x86-64).
GO_OFFSETS: dict[tuple[int, int], GoLayout] = {
    (1, 21): GoLayout(g_m=48, g_labels=344, m_g0=0, m_curg=192, **_MAP),     # go1.21.13
    (1, 22): GoLayout(g_m=48, g_labels=344, m_g0=0, m_curg=192, **_MAP),     # go1.22.0
    (1, 23): GoLayout(g_m=48, g_labels=352, m_g0=0, m_curg=192, **_MAP),     # go1.23.12
    (1, 24): GoLayout(g_m=48, g_labels=352, m_g0=0, m_curg=192, **_SLICE),   # go1.24.0
    (1, 25): GoLayout(g_m=48, g_labels=344, m_g0=0, m_curg=184, **_SLICE),   # go1.25.5
    (1, 26): GoLayout(g_m=48, g_labels=352, m_g0=0, m_curg=184, **_SLICE),   # go1.26.8
}


class GoOffsets(ctypes.Structure):
    """``struct go_offsets`` of bpf/profiler.bpf.c: the go_processes value (labels 0: none)."""

    _fields_ = [("m", ctypes.c_uint16), ("curg", ctypes.c_uint16), ("g0", ctypes.c_uint16),
                ("labels", ctypes.c_uint16)]


_BUILDINFO_MAGIC = b"\xff Go buildinf:"
_VERSION = re.compile(r"^go(\d+)\.(\d+)")


def go_version(read: Any, sections: dict[bytes, tuple[int, int, int, int]]) -> str | None:
    """The Go version (``go1.23.12``) from ``.go.buildinfo`` (Go 1.18+ inline strings), None
    when the file has none."""
    found = sections.get(b".go.buildinfo")
    if found is None:
        return None
    blob = read(found[2], min(found[3], 4096))
    if len(blob) < 33 or not blob.startswith(_BUILDINFO_MAGIC) or not blob[15] & 2:
        return None           # not the inline-string form (Go < 1.18): no version read
    n, p, shift = 0, 32, 0
    while p < len(blob):
        b = blob[p]
        p += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80 or shift > 28:
            break
    return blob[p:p + n].decode("ascii", "replace") if 0 < n <= 64 else None


def layout_for(version: str | None) -> GoLayout | None:
    m = _VERSION.match(version or "")
    return GO_OFFSETS.get((int(m.group(1)), int(m.group(2)))) if m else None


class GoLabels:
    """Which sampled processes are Go programs whose labels the kernel reads (``go_processes``),
    and the label sets behind the pointers in the sample keys. Counters in ``stats``."""

    def __init__(self, bpf: Any, max_processes: int) -> None:
        self._map = bpf["go_processes"]
        self._max = max_processes
        self._layouts: dict[int, GoLayout] = {}            # pid -> its binary's layout
        self._by_file: dict[tuple[int, int, int], str | None] = {}   # (dev, ino, mtime) -> version
        self.reader = LabelReader(self._layouts)
        self.stats = self.reader.stats
        self.stats.update({"processes": 0, "unsupported_version": 0})

    def note_process(self, pid: int) -> None:
        """A process's first sample (or its first since an exec): enters it in go_processes
        when it is a Go program of a known version, else removes any old entry. Must run before
        its unwind tables are written: their write renews the kernel's per-CPU process cache."""
        version = self._version(pid)
        layout = layout_for(version)
        key = self._map.Key(pid)
        if layout is None:
            if version is not None:
                self.stats["unsupported_version"] += 1
                log.info("profiler: no goroutine labels for pid %d: %s is not in GO_OFFSETS", pid, version)
            self._layouts.pop(pid, None)
            try:
                del self._map[key]
            except KeyError:
                pass
            return
        if pid not in self._layouts and len(self._layouts) >= self._max:
            return
        self._layouts[pid] = layout
        self._map[key] = GoOffsets(m=layout.g_m, curg=layout.m_curg, g0=layout.m_g0, labels=layout.g_labels)
        self.stats["processes"] += 1

    def forget(self, pid: int) -> None:
        if self._layouts.pop(pid, None) is not None:
            try:
                del self._map[self._map.Key(pid)]
            except KeyError:
                pass

    def _version(self, pid: int) -> str | None:
        try:
            fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            file = (st.st_dev, st.st_ino, st.st_mtime_ns)
            if file in self._by_file:
                return self._by_file[file]
            try:
                read = fd_reader(fd)
                version = go_version(read, named_sections(read)[0])
            except Exception:   # not ELF, or malformed: not a Go program we can read
                version = None
            if len(self._by_file) >= 4096:
                self._by_file.clear()
            self._by_file[file] = version
            return version
        finally:
            os.close(fd)


_U64 = struct.Struct("<Q")
_STR = struct.Struct("<QQ")     # a Go string: pointer, length
Labels = tuple[tuple[str, str], ...]


class LabelReader:
    """Reads label sets from process memory, memoized within one drain (``begin`` clears)."""

    def __init__(self, layouts: dict[int, GoLayout]) -> None:
        self._layouts = layouts
        self._memo: dict[tuple[int, int], Labels] = {}
        self._sets: dict[int, int] = {}       # pid -> label sets read this drain
        self._fds: dict[int, int] = {}        # pid -> its /proc/PID/mem, open for this drain
        self.stats = {"label_sets_read": 0, "label_sets_unreadable": 0, "label_sets_over_limit": 0,
                      "labels_truncated": 0, "labels_invalid": 0}

    def begin(self) -> None:
        """A new drain: nothing read before is trusted (the garbage collector may have reused it)."""
        self._memo.clear()
        self._sets.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def labels(self, pid: int, ptr: int) -> Labels:
        """The labels of the set at ``ptr`` in ``pid`` (``()`` when unreadable or over the bound)."""
        key = (pid, ptr)
        got = self._memo.get(key)
        if got is not None:
            return got
        layout = self._layouts.get(pid)
        n = self._sets.get(pid, 0)
        if layout is None:
            got = ()
        elif n >= MAX_LABEL_SETS:
            self.stats["label_sets_over_limit"] += 1
            return ()
        else:
            self._sets[pid] = n + 1
            got = self._read(pid, ptr, layout)
        self._memo[key] = got
        return got

    def _read(self, pid: int, ptr: int, layout: GoLayout) -> Labels:
        fd = self._fds.get(pid)
        if fd is None:
            try:
                fd = self._fds[pid] = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.stats["label_sets_unreadable"] += 1
                return ()
        try:
            def read(addr: int, n: int) -> bytes:
                data = os.pread(fd, n, addr)
                if len(data) != n:
                    raise OSError("short read")
                return data

            raw = self._slice(read, ptr, layout) if layout.kind == "slice" else self._map(read, ptr, layout)
        except (OSError, OverflowError, ValueError, struct.error):
            self.stats["label_sets_unreadable"] += 1
            return ()
        self.stats["label_sets_read"] += 1
        return self._bounded(raw)

    @staticmethod
    def _string(read: Any, at: bytes, offset: int) -> bytes:
        p, n = _STR.unpack_from(at, offset)
        if n == 0:
            return b""
        if n > MAX_STRING_BYTES:
            raise ValueError("not a label string")
        return read(p, n)

    def _slice(self, read: Any, ptr: int, lay: GoLayout) -> list[tuple[bytes, bytes]]:
        """Go 1.24+: labelMap{list []label{key, value string}} (sorted by key)."""
        array, n, cap = struct.unpack("<QQQ", read(ptr + lay.list_at, 24))
        if n > cap or n > 1 << 16:
            raise ValueError("not a label slice")
        take = min(n, MAX_LABELS + 1)
        if not take:
            return []
        raw = read(array, take * lay.label_size)
        out = []
        for i in range(take):
            base = i * lay.label_size
            out.append((self._string(read, raw, base + lay.key_at), self._string(read, raw, base + lay.value_at)))
        if n > MAX_LABELS:
            self.stats["labels_truncated"] += n - MAX_LABELS
        return out

    def _map(self, read: Any, ptr: int, lay: GoLayout) -> list[tuple[bytes, bytes]]:
        """Go <= 1.23: g.labels is a *labelMap, itself a map[string]string (a *hmap)."""
        hmap = _U64.unpack(read(ptr, 8))[0]
        if not hmap:
            return []
        head = read(hmap, max(lay.hmap_oldbuckets, lay.hmap_buckets) + 8)
        count = _U64.unpack_from(head, lay.hmap_count)[0]
        b = head[lay.hmap_b]
        buckets = _U64.unpack_from(head, lay.hmap_buckets)[0]
        old = _U64.unpack_from(head, lay.hmap_oldbuckets)[0]
        if count > 1 << 16 or b > 16:
            raise ValueError("not a label map")
        found: dict[bytes, bytes] = {}
        budget = MAX_MAP_BUCKETS
        # a map still growing keeps entries not yet evacuated in its old buckets (tophash >= 5)
        for base, nb in ((buckets, 1 << b), (old, (1 << b) >> 1)):
            if not base:
                continue
            for i in range(nb):
                at = base + i * lay.bucket_size
                while at and budget > 0:
                    budget -= 1
                    raw = read(at, lay.bucket_size)
                    for slot in range(8):
                        if raw[slot] < 5:      # empty or evacuated
                            continue
                        k = self._string(read, raw, lay.bucket_keys + slot * 16)
                        found.setdefault(k, self._string(read, raw, lay.bucket_values + slot * 16))
                    at = _U64.unpack_from(raw, lay.bucket_overflow)[0]
        if len(found) < min(count, MAX_LABELS):
            raise ValueError("label map read short")
        items = sorted(found.items())
        if len(items) > MAX_LABELS:
            self.stats["labels_truncated"] += len(items) - MAX_LABELS
        return items

    def _bounded(self, raw: list[tuple[bytes, bytes]]) -> Labels:
        out = []
        for k, v in raw[:MAX_LABELS]:
            if len(k) > MAX_KEY_BYTES or len(v) > MAX_VALUE_BYTES:
                self.stats["labels_truncated"] += 1
            kb = k[:MAX_KEY_BYTES]
            key = _utf8_prefix(kb)
            if not key or (len(key.encode()) != len(kb) and len(k) <= MAX_KEY_BYTES):   # not UTF-8, not a cut
                self.stats["labels_invalid"] += 1
                continue
            out.append((key, _utf8_prefix(v[:MAX_VALUE_BYTES])))
        return tuple(out)


def _utf8_prefix(b: bytes) -> str:
    """The longest valid UTF-8 prefix (a cut can split a character)."""
    try:
        return b.decode()
    except UnicodeDecodeError as e:
        return b[:e.start].decode()
