"""V8 (Node.js) JavaScript frames in CPU profiles: which processes run V8, the frame and object
offsets of their build (from the binary's own postmortem metadata), and what the recorded
functions are called.

A runtime of the profiler (``Runtime``, runtimes/base.py). The kernel walk (``walk_v8`` in
bpf/runtimes/v8.bpf.h) records, per JavaScript frame, the address of its SharedFunctionInfo and
(native frame index, bytecode offset) as aux. Here:

* ``find_v8`` finds the ELF file (node, or a libnode) whose ``.dynsym`` exports V8's postmortem
  metadata (``v8dbg_*``: frame offsets, class field offsets, instance types) and reads the values
  from the process's memory: no number per Node build is kept here. Cached per build id.
* ``read_function`` names a SharedFunctionInfo from /proc/PID/mem: its name (a String, or the
  function name a ScopeInfo holds), its Script's name (the path or URL), the line of the
  function's start (from the ScopeInfo's position info and the script's source) and, when V8 has
  made it, its bytecode's source position table as (offset, line) pairs: a frame run from bytecode
  is named at its statement's line, others at the function's first line. Every object read is
  checked by its map's instance type; anything else leaves the frame unnamed (counted).
* ``V8`` is the runtime: it recognises a process, hands the kernel its ``V8Process``, names
  announced functions on its own thread while the process lives (cached per (pid, address), the
  entry checked again when the same address shows up after a garbage collection may have moved
  objects), and puts each JS frame in place of the native frame (JIT code, a builtin) it ran in.

Supported: Node.js 20 (V8 11.3) and 22 (V8 12.4), x86-64, without pointer compression (Node's
default). A build with compressed pointers (v8dbg_TaggedSize 4) is counted as unsupported.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
import time
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ...config import CachesConfig, ProfilerSourceConfig
from ...kernel.bcc import header_defines, header_enum
from ..model import Frame
from ..work_queue import QueueWorker
from ._memory import SymbolCache, mapped_file_symbols
from .base import QueuedRuntime, RecordedFrames, Region, Runtime

__all__ = ["V8", "V8Process", "V8Offsets", "find_v8", "read_function", "FunctionInfo", "dynamic_symbols_with_prefix"]

log = logging.getLogger(__name__)

BPF_HEADER = "runtimes/v8.bpf.h"
_D = header_defines(BPF_HEADER)
AUX_INDEX_SHIFT = _D["V8_AUX_INDEX_SHIFT"]
NO_OFFSET = _D["V8_NO_OFFSET"]
MAX_FUNCTIONS = 16384          # SharedFunctionInfos kept named, all processes together
MAX_SCRIPTS = 1024             # scripts whose line starts are kept
MAX_FILES = 64                 # V8 binaries whose metadata is cached
MAX_STRING = 4096              # longest name or path read
MAX_SOURCE = 16 << 20          # largest script source read for its line starts
MAX_STRING_DEPTH = 32          # cons/thin/sliced strings followed
MAX_POSITIONS = 64 << 10       # largest source position table read (bytes)
REVALIDATE_S = 1.0             # a cached function is checked again at most this often
QUEUE_SIZE = 8192
PREFIX = b"v8dbg_"
BLOB_CODE, BLOB_CODE_SIZE = b"v8_Default_embedded_blob_code_", b"v8_Default_embedded_blob_code_size_"
BLOB_SYMBOLS = frozenset({BLOB_CODE, BLOB_CODE_SIZE})


class UnsupportedV8(Exception):
    """A V8 build this reader does not handle (compressed pointers, missing metadata)."""


class V8Process(ctypes.Structure):
    """Mirror of ``struct v8_process`` (bpf/runtimes/v8.bpf.h): the runtime's per-process data."""

    _fields_ = [("builtins_start", ctypes.c_uint64), ("builtins_end", ctypes.c_uint64),
                ("remapped_start", ctypes.c_uint64), ("remapped_end", ctypes.c_uint64),
                ("fp_context", ctypes.c_int16), ("fp_function", ctypes.c_int16),
                ("fp_bytecode_array", ctypes.c_int16), ("fp_bytecode_offset", ctypes.c_int16),
                ("function_shared", ctypes.c_uint16), ("heap_object_map", ctypes.c_uint16),
                ("map_instance_type", ctypes.c_uint16), ("sfi_type", ctypes.c_uint16),
                ("bytecode_array_type", ctypes.c_uint16), ("smi_shift", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 5)]


@dataclass(frozen=True, slots=True)
class V8Offsets:
    """What the kernel walk and the object reader need from one V8 build's v8dbg_* metadata."""

    fp_context: int
    fp_function: int
    fp_bytecode_array: int
    fp_bytecode_offset: int
    function_shared: int
    heap_object_map: int
    map_instance_type: int
    smi_shift: int
    first_nonstring_type: int
    sfi_type: int
    bytecode_array_type: int
    scope_info_type: int
    script_type: int
    sfi_name_or_scope_info: int
    sfi_script: int
    script_name: int
    script_source: int
    string_length: int
    seq_chars: int
    cons_first: int
    cons_second: int
    thin_actual: int
    sliced_parent: int
    sliced_offset: int
    scopeinfo_ncontextlocals: int
    scopeinfo_first_vars: int
    repr_mask: int
    encoding_mask: int
    one_byte_tag: int
    cons_tag: int
    sliced_tag: int
    thin_tag: int
    external_tag: int
    sfi_function_data: int
    bytecode_data: int
    bytecode_wrapper: int
    byte_array_type: int
    trusted_byte_array_type: int
    interpreter_data_type: int
    array_length: int

    builtins: tuple[int, int] = (0, 0)    # the embedded builtins' code in the process: [start, end)
    remapped: tuple[int, int] = (0, 0)    # ... its copy in another mapping of the file, or none

    def kernel_entry(self) -> V8Process:
        return V8Process(self.builtins[0], self.builtins[1], self.remapped[0], self.remapped[1],
                         self.fp_context, self.fp_function,
                         self.fp_bytecode_array, self.fp_bytecode_offset,
                         self.function_shared, self.heap_object_map, self.map_instance_type, self.sfi_type,
                         self.bytecode_array_type, self.smi_shift)


# Each field: the v8dbg_ symbol names (prefixes: the type suffix differs between versions) tried in
# order, and a default for the few that older builds leave out of .data (0-valued ones).
_FIELDS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "fp_context": (("off_fp_context_or_frame_type", "off_fp_context"), None),
    "fp_function": (("off_fp_function",), None),
    "fp_bytecode_array": (("off_fp_bytecode_array",), None),
    "fp_bytecode_offset": (("off_fp_bytecode_offset",), None),
    "function_shared": (("class_JSFunction__shared__",), None),
    "heap_object_map": (("class_HeapObject__map__",), 0),
    "map_instance_type": (("class_Map__instance_type__",), None),
    "first_nonstring_type": (("FirstNonstringType",), None),
    "sfi_type": (("type_SharedFunctionInfo__",), None),
    "bytecode_array_type": (("type_BytecodeArray__",), None),
    "scope_info_type": (("type_ScopeInfo__",), None),
    "script_type": (("type_Script__",), None),
    "sfi_name_or_scope_info": (("class_SharedFunctionInfo__name_or_scope_info__",), None),
    "sfi_script": (("class_SharedFunctionInfo__script_or_debug_info__", "class_SharedFunctionInfo__script__"), None),
    "script_name": (("class_Script__name__",), None),
    "script_source": (("class_Script__source__",), None),
    "string_length": (("class_String__length__",), None),
    "seq_chars": (("class_SeqOneByteString__chars__",), None),
    "cons_first": (("class_ConsString__first__",), None),
    "cons_second": (("class_ConsString__second__",), None),
    "thin_actual": (("class_ThinString__actual__",), None),
    "sliced_parent": (("class_SlicedString__parent__",), None),
    "sliced_offset": (("class_SlicedString__offset__",), None),
    "scopeinfo_ncontextlocals": (("scopeinfo_idx_ncontextlocals",), None),
    "scopeinfo_first_vars": (("scopeinfo_idx_first_vars",), None),
    "repr_mask": (("StringRepresentationMask",), None),
    "encoding_mask": (("StringEncodingMask",), None),
    "one_byte_tag": (("OneByteStringTag",), None),
    "cons_tag": (("ConsStringTag",), None),
    "sliced_tag": (("SlicedStringTag",), None),
    "thin_tag": (("ThinStringTag",), None),
    "external_tag": (("ExternalStringTag",), None),
    # A bytecode frame's line: the SharedFunctionInfo's bytecode (V8 12 names the field
    # trusted_function_data and leaves it out of the metadata: its place, 8, is checked by type),
    # the BytecodeArray's header size (the frame's offset slot counts from the object's start) and
    # its source position table: after the wrapper (V8 12) or after length, constant pool and
    # handler table (V8 11); every object on the way is checked by type.
    "sfi_function_data": (("class_SharedFunctionInfo__function_data__",
                           "class_SharedFunctionInfo__trusted_function_data__"), 8),
    "bytecode_data": (("class_BytecodeArray__data__",), None),
    "bytecode_wrapper": (("class_BytecodeArray__wrapper__",), 0),
    "byte_array_type": (("type_ByteArray__",), None),
    "trusted_byte_array_type": (("type_TrustedByteArray__",), -1),
    "interpreter_data_type": (("type_InterpreterData__",), -1),
    "array_length": (("class_FixedArrayBase__length__",), 8),
}
_MAX_INLINED_LOCALS = 75       # ScopeInfo: more context locals than this are kept in a hash table


# ---------------------------------------------------------------------------- ELF metadata


def dynamic_symbols_with_prefix(fd: int, prefix: bytes, section_type: int = 11,
                                names: frozenset[bytes] = frozenset()) -> dict[bytes, int]:
    """Addresses (ELF virtual) of every ``.dynsym`` symbol (``section_type`` 2: ``.symtab``) whose
    name starts with ``prefix`` (or is one of ``names``), from an open ELF64 little-endian file;
    {} for anything else."""
    def read(offset: int, size: int) -> bytes:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError("short read")
        return data

    head = read(0, 64)
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", head, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
    if shentsize != 64 or not 0 < shnum < 4096:
        return {}
    sections = [struct.unpack("<IIQQQQIIQQ", read(shoff + 64 * i, 64)) for i in range(shnum)]
    found: dict[bytes, int] = {}
    for _, sh_type, _, _, offset, size, link, _, _, _ in sections:
        if sh_type != section_type or link >= shnum:
            continue
        strtab = read(sections[link][4], sections[link][5])
        table = read(offset, size // 24 * 24)
        for st_name, _, _, st_shndx, st_value, _ in struct.iter_unpack("<IBBHQQ", table):
            if st_shndx == 0 or st_value == 0:
                continue
            if not strtab.startswith(prefix, st_name) and not (names and strtab.startswith(b"v8_", st_name)):
                continue
            end = strtab.find(b"\0", st_name)
            name = strtab[st_name:end if end >= 0 else len(strtab)]
            if name.startswith(prefix) or name in names:
                found[name] = st_value
    return found


def _metadata(pid: int, start: int, end: int, path: str, build_id: str, cache: SymbolCache) -> dict[bytes, int]:
    """The ``v8dbg_*`` metadata (and, in a V8 binary, where its builtins are) of a mapped file."""
    def read(fd: int) -> dict[bytes, int]:
        found = dynamic_symbols_with_prefix(fd, PREFIX)
        if PREFIX + b"off_fp_function" in found:    # a V8 binary: where its builtins are
            found.update(dynamic_symbols_with_prefix(fd, b"\0", 2, BLOB_SYMBOLS))
        return found

    return mapped_file_symbols(pid, start, end, path, build_id, cache, read,
                               (OSError, ValueError, struct.error), MAX_FILES)


def find_v8(pid: int, regions: Sequence[Region],
            cache: OrderedDict[Hashable, dict[bytes, int]]) -> V8Offsets | None:
    """The V8 offsets of ``pid`` from its executable mappings, or None when no mapped file exports
    v8dbg_ metadata. Raises ``UnsupportedV8`` for a build this reader cannot walk."""
    seen: set[str] = set()
    for start, end, bias, path, build_id, anonymous in regions:
        if anonymous or bias is None or path in seen or not path.startswith("/"):
            continue
        seen.add(path)
        symbols = _metadata(pid, start, end, path, build_id, cache)
        if PREFIX + b"off_fp_function" not in symbols:
            continue
        offs = _offsets(pid, symbols, bias)
        # V8 12+ copies (remaps) the embedded builtins next to its JIT code: another mapping of the
        # same file, whose own bias puts the blob inside it.
        size = offs.builtins[1] - offs.builtins[0]
        blob = symbols[BLOB_CODE]
        for s, e, b, p, _, anon in regions:
            if p == path and not anon and b is not None and b != bias and s <= blob + b and blob + b + size <= e:
                return replace(offs, remapped=(blob + b, blob + b + size))
        return offs
    return None


def _offsets(pid: int, symbols: dict[bytes, int], bias: int) -> V8Offsets:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        def value(name: bytes) -> int:
            data = os.pread(fd, 4, symbols[name] + bias)
            if len(data) != 4:
                raise OSError(f"{name.decode()}: unreadable")
            return int(struct.unpack("<i", data)[0])

        def lookup(prefixes: tuple[str, ...], default: int | None) -> int:
            for p in prefixes:
                full = PREFIX + p.encode()
                if full in symbols:
                    return value(full)
                for name in symbols:
                    if name.startswith(full) and p.endswith("__"):
                        return value(name)
            if default is None:
                raise UnsupportedV8(f"no v8dbg_{prefixes[0]}")
            return default

        tagged = value(PREFIX + b"TaggedSize") if PREFIX + b"TaggedSize" in symbols else 8
        if tagged != 8:
            raise UnsupportedV8(f"tagged size {tagged} (compressed pointers)")
        fields = {name: lookup(prefixes, default) for name, (prefixes, default) in _FIELDS.items()}
        smi_shift = (value(PREFIX + b"SmiShiftSize") if PREFIX + b"SmiShiftSize" in symbols else 31) + 1
        if BLOB_CODE not in symbols or BLOB_CODE_SIZE not in symbols:
            raise UnsupportedV8("no v8_Default_embedded_blob_code_ in .symtab (a stripped binary)")
        start = symbols[BLOB_CODE] + bias
        builtins = (start, start + (value(BLOB_CODE_SIZE) & 0xFFFFFFFF))
    finally:
        os.close(fd)
    offs = V8Offsets(smi_shift=smi_shift, builtins=builtins, **fields)
    for slot in (offs.fp_context, offs.fp_function, offs.fp_bytecode_array, offs.fp_bytecode_offset):
        if not -64 <= slot <= -8 or slot % 8:
            raise UnsupportedV8(f"frame slot {slot} outside the 64 bytes the walker reads below fp")
    return offs


# ---------------------------------------------------------------------------- heap objects


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    """A SharedFunctionInfo's names, and what identifies it when its address is seen again."""

    name: str
    file: str
    line: int                       # the function's first line, 0 when unknown
    fingerprint: tuple[int, int]    # (name_or_scope_info, script) as read
    # the bytecode's source position table as lines: the line from each bytecode offset on
    # (ascending; counted from the BytecodeArray's start, as an interpreted frame's offset slot
    # holds them); empty when V8 has not made the table (lazy source positions)
    offsets: tuple[int, ...] = ()
    lines: tuple[int, ...] = ()

    def line_at(self, offset: int) -> int | None:
        """The line of the statement at bytecode ``offset``, None when the table does not say."""
        at = bisect_right(self.offsets, offset) - 1
        return self.lines[at] if at >= 0 and self.lines[at] > 0 else None


class _Memory:
    """Reads a process's memory (typed V8 objects) through one open /proc/PID/mem."""

    def __init__(self, pid: int, offs: V8Offsets) -> None:
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        self.o = offs

    def close(self) -> None:
        os.close(self.fd)

    def read(self, address: int, size: int) -> bytes:
        data = os.pread(self.fd, size, address)
        if len(data) != size:
            raise ValueError("short read")
        return data

    def word(self, obj: int, offset: int) -> int:
        """The 8-byte field at ``offset`` of the tagged object ``obj``."""
        return int(struct.unpack("<Q", self.read(obj - 1 + offset, 8))[0])

    def type_of(self, obj: int) -> int:
        if not obj & 1:
            return -1                       # a Smi
        m = self.word(obj, self.o.heap_object_map)
        if not m & 1:
            raise ValueError("not a heap object")
        return int(struct.unpack("<H", self.read(m - 1 + self.o.map_instance_type, 2))[0])

    def smi(self, word: int) -> int | None:
        if word & 1:
            return None
        v = word if word < 1 << 63 else word - (1 << 64)
        return v >> self.o.smi_shift

    def string(self, obj: int, limit: int = MAX_STRING, depth: int = 0) -> str:
        """A String's characters (sequential, cons, thin or sliced), at most ``limit`` of them."""
        o = self.o
        t = self.type_of(obj)
        if t < 0 or t >= o.first_nonstring_type or depth > MAX_STRING_DEPTH:
            raise ValueError("not a string")
        length = int(struct.unpack("<i", self.read(obj - 1 + o.string_length, 4))[0])
        if length < 0:
            raise ValueError("negative length")
        rep, one_byte = t & o.repr_mask, (t & o.encoding_mask) == o.one_byte_tag
        if rep == 0:                        # sequential
            n = min(length, limit)
            if one_byte:
                return self.read(obj - 1 + o.seq_chars, n).decode("latin-1")
            return self.read(obj - 1 + o.seq_chars, 2 * n).decode("utf-16-le", "replace")
        if rep == o.cons_tag:
            first = self.string(self.word(obj, o.cons_first), limit, depth + 1)
            if len(first) >= limit:
                return first[:limit]
            return first + self.string(self.word(obj, o.cons_second), limit - len(first), depth + 1)
        if rep == o.thin_tag:
            return self.string(self.word(obj, o.thin_actual), limit, depth + 1)
        if rep == o.sliced_tag:
            start = self.smi(self.word(obj, o.sliced_offset)) or 0
            parent = self.string(self.word(obj, o.sliced_parent), start + min(length, limit), depth + 1)
            return parent[start:start + min(length, limit)]
        raise ValueError("an external string")   # its characters live in the embedder's memory


def read_function(mem: _Memory, sfi: int, scripts: _Scripts, pid: int) -> FunctionInfo:
    """Names the SharedFunctionInfo at ``sfi`` (tagged). Raises ValueError/OSError when any object
    on the way is not what it should be."""
    o = mem.o
    if mem.type_of(sfi) != o.sfi_type:
        raise ValueError("not a SharedFunctionInfo")
    name_or_scope = mem.word(sfi, o.sfi_name_or_scope_info)
    script = mem.word(sfi, o.sfi_script)
    name, start = "", -1
    t = mem.type_of(name_or_scope)
    if t == o.scope_info_type:
        name, start = _scope_info_name(mem, name_or_scope)
    elif 0 <= t < o.first_nonstring_type:
        name = mem.string(name_or_scope)
    elif t >= 0 and t != o.scope_info_type and mem.smi(name_or_scope) is None:
        pass                                # no shared name (e.g. the sentinel): anonymous
    file, line = "", 0
    if mem.type_of(script) == o.script_type:
        sname = mem.word(script, o.script_name)
        st = mem.type_of(sname)
        if 0 <= st < o.first_nonstring_type:
            file = mem.string(sname)
        if start >= 0:
            line = scripts.line(pid, mem, script, start)
    if not name:
        name = "<anonymous>"
    offsets: tuple[int, ...] = ()
    lines: tuple[int, ...] = ()
    if file or line:
        positions = _positions(mem, sfi)
        if positions and mem.type_of(script) == o.script_type:
            # as the frame's offset slot holds them: from the object's start (header less the tag)
            offsets = tuple(p[0] + o.bytecode_data - 1 for p in positions)
            lines = tuple(scripts.line(pid, mem, script, p[1]) if p[1] >= 0 else 0 for p in positions)
    return FunctionInfo(name, file, line, (name_or_scope, script), offsets, lines)


def _positions(mem: _Memory, sfi: int) -> list[tuple[int, int]]:
    """(bytecode offset, script position) of each entry of the function's bytecode source position
    table, ascending; [] when it has no bytecode or V8 has not made the table yet."""
    o = mem.o
    data = mem.word(sfi, o.sfi_function_data)
    t = mem.type_of(data)
    if t == o.interpreter_data_type and t >= 0:
        data = mem.word(data, 8)            # InterpreterData: its bytecode array first
        t = mem.type_of(data)
    if t != o.bytecode_array_type:
        return []
    table = mem.word(data, o.bytecode_wrapper + 8 if o.bytecode_wrapper else o.array_length + 24)
    if mem.type_of(table) not in (o.byte_array_type, o.trusted_byte_array_type):
        return []                           # undefined: not made yet (lazy source positions)
    size = mem.smi(mem.word(table, o.array_length))
    if size is None or not 0 < size <= MAX_POSITIONS:
        return []
    return decode_positions(mem.read(table - 1 + o.array_length + 8, size))


def _vlq(raw: bytes, at: int) -> tuple[int, int]:
    """One zigzag VLQ integer of a source position table at ``at``: (value, next index)."""
    value = shift = 0
    while True:
        if at >= len(raw) or shift > 63:
            raise ValueError("truncated source position table")
        b = raw[at]
        at += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return (value >> 1) ^ -(value & 1), at


def decode_positions(raw: bytes) -> list[tuple[int, int]]:
    """V8's source position table (source-position-table.cc): per entry, the code offset delta
    (negative - 1 when the entry is an expression, not a statement) and the source position delta,
    both zigzag VLQ; a bytecode table starts with the function entry's position, at offset -1
    (kFunctionEntryBytecodeOffset). A source position's script offset is bits 1..30 minus 1 (bit 0:
    external; bits 31..46: the inlining id). Returns (code offset, script offset), ascending."""
    out: list[tuple[int, int]] = []
    at = code = position = 0
    while at < len(raw):
        delta, at = _vlq(raw, at)
        if not out and delta == -1:
            code = -1
        else:
            code += delta if delta >= 0 else -(delta + 1)
        step, at = _vlq(raw, at)
        position += step
        if out and code < out[-1][0]:
            raise ValueError("source position table offsets not ascending")
        out.append((code, -1 if position & 1 else ((position >> 1) & 0x3FFFFFFF) - 1))
    return out


def _scope_info_name(mem: _Memory, info: int) -> tuple[str, int]:
    """(function name, start position) from a function's ScopeInfo: after its context locals come
    the function variable's (name, slot), the inferred name when there is one (``obj.method`` for
    an anonymous function assigned there), then the position info (start, end) as two Smis.
    ("", -1) for what is not there."""
    o = mem.o
    slot = 8                                 # the tagged slots after the map
    nlocals = mem.smi(mem.word(info, slot * (1 + o.scopeinfo_ncontextlocals)))
    if nlocals is None or nlocals < 0:
        return "", -1
    first = 1 + o.scopeinfo_first_vars + (2 * nlocals if nlocals < _MAX_INLINED_LOCALS else 1 + nlocals)
    words = struct.unpack("<6Q", mem.read(info - 1 + slot * first, 48))
    name = ""
    t = mem.type_of(words[0])
    if 0 <= t < o.first_nonstring_type:
        name = mem.string(words[0])
    t = mem.type_of(words[2])
    if not name and 0 <= t < o.first_nonstring_type:    # an anonymous function's inferred name
        name = mem.string(words[2])
    start = -1
    for i in range(1, 5):                    # (start, end): two non-negative Smis, start <= end
        a, b = mem.smi(words[i]), mem.smi(words[i + 1])
        if i >= 2 and a is not None and b is not None and 0 <= a <= b:
            start = a
            break
    return name, start


class _Scripts:
    """Line starts of scripts' sources, per (pid, Script address); LRU."""

    def __init__(self) -> None:
        self._lines: OrderedDict[tuple[int, int], array | None] = OrderedDict()

    def line(self, pid: int, mem: _Memory, script: int, position: int) -> int:
        key = (pid, script)
        starts = self._lines.get(key)
        if key not in self._lines:
            try:
                source = mem.string(mem.word(script, mem.o.script_source), MAX_SOURCE)
                starts = array("q", [0])
                at = source.find("\n")
                while at >= 0:
                    starts.append(at + 1)
                    at = source.find("\n", at + 1)
            except (OSError, ValueError, struct.error, UnicodeDecodeError):
                starts = None
            self._lines[key] = starts
            while len(self._lines) > MAX_SCRIPTS:
                self._lines.popitem(last=False)
        else:
            self._lines.move_to_end(key)
        return bisect_right(starts, position) if starts is not None else 0

    def forget(self, pid: int) -> None:
        for key in [k for k in self._lines if k[0] == pid]:
            del self._lines[key]


# ---------------------------------------------------------------------------- the runtime


class V8(QueuedRuntime):
    """Node.js / V8 processes: their ``runtime_processes`` data, function names and frames.

    ``recognise``/``forget`` run on the unwinder's worker thread; ``notice`` (from the ring
    buffer) queues work for this class's own thread, which reads SharedFunctionInfos while their
    process lives; ``frames`` and ``place`` run at drain time."""

    name = "v8"
    frame_type = "v8js"
    bpf_header = BPF_HEADER
    program = "walk_v8"
    stats_map = "v8_stats"
    stat_names = header_enum(BPF_HEADER, "V8_STAT")
    mirrors = (("mirror_v8_process", "Leaf", V8Process),)

    def __init__(self, bpf: Any, caches: CachesConfig | None = None) -> None:
        super().__init__(bpf, caches or CachesConfig())
        self._processes: dict[int, V8Offsets] = {}
        self._metadata: OrderedDict[Hashable, dict[bytes, int]] = OrderedDict()
        self._functions: OrderedDict[tuple[int, int], tuple[FunctionInfo | None, float]] = OrderedDict()
        self._scripts = _Scripts()
        self._lock = threading.Lock()
        self.evictions = 0
        self._worker = QueueWorker("v8-functions", self._learn, QUEUE_SIZE, self.stats)

    @classmethod
    def enabled(cls, config: ProfilerSourceConfig) -> bool:
        return bool(getattr(config, "javascript_frames", True))

    @property
    def processes(self) -> int:
        return len(self._processes)

    def recognise(self, pid: int, regions: Sequence[Region]) -> bytes | None:
        try:
            offs = find_v8(pid, regions, self._metadata)
        except UnsupportedV8 as e:
            self.stats["unsupported_builds"] += 1
            log.debug("pid %d: %s", pid, e)
            return None
        except (OSError, ValueError, struct.error) as e:
            self.stats["unreadable"] += 1
            log.debug("pid %d: %s", pid, e)
            return None
        if offs is None:
            return None
        self._processes[pid] = offs
        return bytes(offs.kernel_entry())

    def forget(self, pid: int) -> None:
        if self._processes.pop(pid, None) is None:
            return
        with self._lock:
            for key in [k for k in self._functions if k[0] == pid]:
                del self._functions[key]
            self._scripts.forget(pid)

    def notice(self, pid: int, frame_id: int) -> None:
        self._worker.put((pid, frame_id))

    def _learn(self, item: tuple[int, int]) -> None:
        pid, sfi = item
        if pid not in self._processes:
            self.stats["functions_of_unknown_process"] += 1
            return
        self._read(pid, sfi)

    def _read(self, pid: int, sfi: int) -> FunctionInfo | None:
        """Reads ``sfi`` now and caches the result (None: not a readable SharedFunctionInfo)."""
        offs = self._processes.get(pid)
        if offs is None:
            return None
        info: FunctionInfo | None
        try:
            mem = _Memory(pid, offs)
        except OSError:
            return None
        try:
            with self._lock:
                info = read_function(mem, sfi, self._scripts, pid)
            self.stats["functions_read"] += 1
        except (OSError, ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
            log.debug("SharedFunctionInfo %#x of pid %d: %s", sfi, pid, e)
            self.stats["functions_unreadable"] += 1
            info = None
        finally:
            mem.close()
        with self._lock:
            self._functions[(pid, sfi)] = (info, time.monotonic())
            self._functions.move_to_end((pid, sfi))
            while len(self._functions) > MAX_FUNCTIONS:
                self._functions.popitem(last=False)
                self.evictions += 1
        return info

    def _still(self, pid: int, sfi: int, info: FunctionInfo) -> bool:
        """Whether the object at ``sfi`` is still the SharedFunctionInfo that was named there (a
        collection may have moved it and put another object, or another function, in its place)."""
        offs = self._processes.get(pid)
        if offs is None:
            return True                     # gone: what was read while it lived stands
        try:
            mem = _Memory(pid, offs)
        except OSError:
            return True
        try:
            return mem.type_of(sfi) == offs.sfi_type and \
                (mem.word(sfi, offs.sfi_name_or_scope_info), mem.word(sfi, offs.sfi_script)) == info.fingerprint
        except (OSError, ValueError, struct.error):
            return False
        finally:
            mem.close()

    def function(self, pid: int, sfi: int, positions: bool = False) -> FunctionInfo | None:
        """The named function at ``sfi``: from the cache (checked again at most every
        REVALIDATE_S), else read now. ``positions``: a bytecode frame wants the source position
        table, which V8 makes lazily: a function read without one is read again (at most every
        REVALIDATE_S) while its process lives."""
        with self._lock:
            entry = self._functions.get((pid, sfi))
        if entry is None:
            return self._read(pid, sfi)
        info, checked = entry
        if info is None or time.monotonic() - checked < REVALIDATE_S:
            return info
        if positions and not info.offsets and pid in self._processes:
            return self._read(pid, sfi)
        if self._still(pid, sfi, info):
            with self._lock:
                self._functions[(pid, sfi)] = (info, time.monotonic())
            return info
        self.stats["functions_moved"] += 1
        return self._read(pid, sfi)

    def frames(self, pid: int, recorded: RecordedFrames) -> list[tuple[Frame, bool]]:
        """The recorded JS frames, innermost first, as (frame, False); each frame's native index is
        kept in its address until ``place`` puts it there. An unnamed function (function "") is
        counted, and its native frame stays in place with its address."""
        out = []
        unresolved = 0
        for sfi, aux in recorded:
            index = (aux >> AUX_INDEX_SHIFT) & 0x7F
            offset = aux & NO_OFFSET
            info = self.function(pid, sfi, offset != NO_OFFSET)
            if info is None:
                unresolved += 1
                out.append((Frame(index, "", self.frame_type), False))
                continue
            line = info.line
            if offset != NO_OFFSET:         # a bytecode frame: the line of the statement it is at
                at = info.line_at(offset)
                if at is None:
                    self.stats["lines_function_start"] += 1
                else:
                    line = at
                    self.stats["lines_statement"] += 1
            out.append((Frame(index, info.name, self.frame_type, None, info.file, line), False))
        self.stats["frames_unresolved"] += unresolved
        self.stats["frames_resolved"] += len(out) - unresolved
        return out

    def place(self, native: Sequence[Frame], frames: Sequence[tuple[Frame, bool]]) -> tuple[tuple[Frame, ...], bool]:
        """Each JS frame in place of the native frame (JIT code, a builtin running bytecode) at its
        index among the user frames; aligned when every index named a native frame."""
        out = list(native)
        user = next((i for i, f in enumerate(out) if f.frame_type != "kernel"), len(out))
        aligned = True
        for frame, _ in frames:
            at = user + frame.address
            if at < len(out) and out[at].frame_type == "native":
                if frame.function:          # an unnamed one keeps the native frame (its address)
                    out[at] = Frame(0, frame.function, frame.frame_type, None, frame.file, frame.line)
            else:
                aligned = False
        return tuple(out), aligned

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    @classmethod
    def watch(cls, telemetry: Any, runtime: Callable[[], Runtime | None], caches: CachesConfig) -> None:
        def frames() -> dict[str, int]:
            rt = runtime()
            p = rt.all_stats() if rt is not None else {}
            return {"recorded": p.get("frames", 0), "resolved": p.get("frames_resolved", 0),
                    "unresolved": p.get("frames_unresolved", 0)} if p else {}

        def events() -> dict[str, int]:
            rt = runtime()
            return rt.counters() if rt is not None else {}

        telemetry.watch_counters(
            "profiler_javascript_frames", "JavaScript (V8) frames: recorded in the kernel, and named at "
            "drain (resolved) or not (unresolved: the SharedFunctionInfo could not be read; kept by "
            "address)", "result", frames)
        telemetry.watch_counters(
            "profiler_javascript", "V8 processes and functions by event: processes_loaded, "
            "unsupported_builds, unreadable, functions_read, functions_unreadable, functions_moved, "
            "queue_full; bytecode frames at their statement's line (lines_statement) or at the "
            "function's first line (lines_function_start: no source position table yet)", "event", events)
