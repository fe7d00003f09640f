"""HotSpot (JVM) Java frames in CPU profiles: which processes run HotSpot, the offsets of their
build (read from the JVM's own ``gHotSpotVM*`` tables, as the Serviceability Agent does), and what
the recorded methods are called.

A runtime of the profiler (``Runtime``, runtimes/base.py). The kernel walk (``walk_hotspot`` in
bpf/runtimes/hotspot.bpf.h) steps through the code cache (interpreted frames by rbp, compiled
frames and stubs by their CodeBlob's frame size, found through the code heap's segment map) and
records, per Java frame, its Method* and as aux its native frame index and either its bci
(interpreted) or its nmethod's compile id (compiled). Here:

* ``read_vm_structs`` reads libjvm's exported tables (gHotSpotVMStructs, gHotSpotVMTypes,
  gHotSpotVMIntConstants and their entry layouts) from the live process's memory: field offsets,
  static addresses, type sizes and constants. No number per JDK build is kept here.
* ``find_hotspot`` builds the kernel's ``HotSpotProcess`` (code cache, interpreter, offsets) and
  ``HotSpotHeaps`` (the code heaps and their segment maps) for a process that maps libjvm.so.
* ``read_method`` names a Method* from /proc/PID/mem: its class (ConstantPool::_pool_holder's
  Klass::_name), name and signature (the constant pool's symbols), and source file. The method
  is checked on the way (the holder's constant pool is the method's), so a pointer to freed or
  reused metadata is left unnamed (counted), never named as another method.

* ``read_scopes`` finds a compiled frame's nmethod again by its pc (the segment map, as the
  kernel does), checks it is still the one recorded (Method* and compile id), and decodes its
  debug information at the pc: the PcDesc at or after it, then the chain of scopes (Method*, bci)
  from the innermost inlined method out to the compiled one. ``place`` turns that into one frame
  per method, each at its line (the line number table at the bci); cached per (pid, pc, Method*,
  compile id), so recompiled code is never described by an older nmethod's scopes.

Supported: HotSpot of JDK 17 to JDK 25 on x86-64 (tested with Debian's OpenJDK 17 and Temurin
25).
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from ...config import CachesConfig, ProfilerSourceConfig
from ...kernel.bcc import check_mirror, header_defines, header_enum
from ..abi import SET_TABLES_USER, RuntimeProcess
from ..model import Frame
from ..work_queue import QueueWorker
from ._memory import SymbolCache, mapped_file_symbols
from .base import QueuedRuntime, RecordedFrames, Region, Runtime
from .v8 import dynamic_symbols_with_prefix

__all__ = ["HotSpot", "HotSpotProcess", "HotSpotHeaps", "VMStructs", "read_vm_structs", "find_hotspot",
           "read_method", "MethodInfo", "UnsupportedHotSpot", "pretty_signature"]

log = logging.getLogger(__name__)

BPF_HEADER = "runtimes/hotspot.bpf.h"
_D = header_defines(BPF_HEADER)
AUX_INDEX_SHIFT = _D["HOTSPOT_AUX_INDEX_SHIFT"]
NO_BCI = _D["HOTSPOT_NO_BCI"]
COMPILED = _D["HOTSPOT_COMPILED"]
COMPILE_ID_MASK = _D["HOTSPOT_COMPILE_ID_MASK"]
HEAPS = _D["HOTSPOT_HEAPS"]
MAX_METHODS = 16384            # Method*s kept named, all processes together
MAX_SCOPES = 16384             # compiled pcs kept with their inlined methods, all processes together
MAX_INLINE_DEPTH = 32          # scopes followed at one pc (C2's MaxInlineLevel is 15)
MAX_PC_DESCS = 1 << 20         # bytes of an nmethod's PcDesc table read at most
MAX_FILES = 16                 # libjvm builds whose tables are cached
MAX_ENTRIES = 20000            # entries read from one gHotSpotVM* table at most
MAX_SYMBOL = 4096              # longest symbol read
MAX_BLOCKS_SCANNED = 4096      # code heap blocks looked at for an nmethod (JDK 17: its _name)
REVALIDATE_S = 1.0             # a cached method is checked again at most this often
YOUNG_LOOKS = 24               # a starting JVM (no libjvm yet, or its code cache not set up) looked at again
YOUNG_FIRST_S = 0.05           # after this, doubling up to YOUNG_MAX_S (about 17 s in all)
YOUNG_MAX_S = 1.0
MAX_YOUNG = 256                # starting JVMs waited for at once
QUEUE_SIZE = 8192
PREFIX = b"gHotSpot"


class UnsupportedHotSpot(Exception):
    """A HotSpot build (or state) this reader does not handle: a table or field missing."""


class _NotYet(UnsupportedHotSpot):
    """A JVM still starting: its code cache or interpreter not set up yet."""


class HotSpotProcess(ctypes.Structure):
    """Mirror of ``struct hotspot_process`` (bpf/runtimes/hotspot.bpf.h)."""

    _fields_ = [("cache_low", ctypes.c_uint64), ("cache_high", ctypes.c_uint64),
                ("interp_low", ctypes.c_uint64), ("interp_high", ctypes.c_uint64),
                ("nmethod_tag", ctypes.c_uint64), ("tag_mask", ctypes.c_uint64),
                ("tag_offset", ctypes.c_uint16), ("frame_size", ctypes.c_uint16),
                ("nmethod_method", ctypes.c_uint16), ("const_method", ctypes.c_uint16),
                ("const_method_size", ctypes.c_uint16), ("heap_block_size", ctypes.c_uint16),
                ("interp_method", ctypes.c_uint8), ("interp_bcp", ctypes.c_uint8),
                ("interp_sender_sp", ctypes.c_uint8), ("compile_id", ctypes.c_uint8)]


class HotSpotHeaps(ctypes.Structure):
    """Mirror of ``struct hotspot_heaps``: a JVM's code heaps and their segment maps."""

    _fields_ = [("low", ctypes.c_uint64 * HEAPS), ("high", ctypes.c_uint64 * HEAPS),
                ("segmap", ctypes.c_uint64 * HEAPS), ("jvm_low", ctypes.c_uint64), ("jvm_high", ctypes.c_uint64),
                ("log2_segment", ctypes.c_uint8 * HEAPS),
                ("count", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 4)]


class _Mem:
    """Reads a process's memory through one open /proc/PID/mem."""

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def read(self, address: int, size: int) -> bytes:
        data = os.pread(self.fd, size, address)
        if len(data) != size:
            raise ValueError(f"short read at {address:#x}")
        return data

    def u64(self, a: int) -> int:
        return int(struct.unpack("<Q", self.read(a, 8))[0])

    def i32(self, a: int) -> int:
        return int(struct.unpack("<i", self.read(a, 4))[0])

    def u16(self, a: int) -> int:
        return int(struct.unpack("<H", self.read(a, 2))[0])

    def cstr(self, a: int, limit: int = 256) -> str:
        data = os.pread(self.fd, limit, a)
        end = data.find(b"\0")
        if end < 0:
            raise ValueError("unterminated string")
        return data[:end].decode("latin-1")


@dataclass(frozen=True, slots=True)
class VMStructs:
    """One JVM's tables: (type, field) → offset (or a static field's address), type → size, and
    the integer and long constants."""

    fields: dict[tuple[str, str], int]
    statics: dict[tuple[str, str], int]
    sizes: dict[str, int]
    constants: dict[str, int]

    def field(self, type_name: str, *names: str) -> int:
        for name in names:
            if (type_name, name) in self.fields:
                return self.fields[(type_name, name)]
        raise UnsupportedHotSpot(f"no {type_name}::{names[0]} in gHotSpotVMStructs")

    def static(self, type_name: str, name: str) -> int:
        if (type_name, name) not in self.statics:
            raise UnsupportedHotSpot(f"no static {type_name}::{name} in gHotSpotVMStructs")
        return self.statics[(type_name, name)]

    def size(self, type_name: str) -> int:
        if type_name not in self.sizes:
            raise UnsupportedHotSpot(f"no type {type_name} in gHotSpotVMTypes")
        return self.sizes[type_name]


def read_vm_structs(mem: _Mem, symbols: dict[bytes, int], bias: int) -> VMStructs:
    """The tables of the libjvm whose gHotSpot* symbols are ``symbols`` (ELF addresses, loaded at
    ``bias``), read from the process's memory."""
    def sym(name: str) -> int:
        key = PREFIX + name.encode()
        if key not in symbols:
            raise UnsupportedHotSpot(f"libjvm exports no gHotSpot{name}")
        return symbols[key] + bias

    def layout(name: str) -> int:
        return mem.u64(sym(name))

    def entries(table: str, entry: str, names: Sequence[str]) -> list[dict[str, int]]:
        base = mem.u64(sym(table))
        stride = layout(f"{entry}ArrayStride")
        offs = {n: layout(f"{entry}{n}Offset") for n in names}
        span = max(offs.values()) + 8
        out = []
        for i in range(MAX_ENTRIES):
            raw = mem.read(base + i * stride, span)
            row = {n: int(struct.unpack_from("<Q", raw, o)[0]) for n, o in offs.items()}
            if not row[names[0]]:
                return out
            out.append(row)
        raise UnsupportedHotSpot(f"gHotSpot{table}: no end within {MAX_ENTRIES} entries")

    fields: dict[tuple[str, str], int] = {}
    statics: dict[tuple[str, str], int] = {}
    for row in entries("VMStructs", "VMStructEntry", ("TypeName", "FieldName", "IsStatic", "Offset", "Address")):
        key = (mem.cstr(row["TypeName"]), mem.cstr(row["FieldName"]))
        if row["IsStatic"] & 0xFFFFFFFF:
            statics[key] = row["Address"]
        else:
            fields[key] = row["Offset"]
    sizes = {mem.cstr(row["TypeName"]): row["Size"]
             for row in entries("VMTypes", "VMTypeEntry", ("TypeName", "Size"))}
    constants: dict[str, int] = {}
    for row in entries("VMIntConstants", "VMIntConstantEntry", ("Name", "Value")):
        v = row["Value"] & 0xFFFFFFFF
        constants[mem.cstr(row["Name"])] = v - (1 << 32) if v >= 1 << 31 else v
    return VMStructs(fields, statics, sizes, constants)


@dataclass(frozen=True, slots=True)
class _Layout:
    """The offsets naming a Method* needs."""

    const_method: int           # Method::_constMethod
    constants: int              # ConstMethod::_constants
    name_index: int             # ConstMethod::_name_index (u2)
    signature_index: int        # ConstMethod::_signature_index (u2)
    pool_holder: int            # ConstantPool::_pool_holder
    pool_length: int            # ConstantPool::_length (int)
    pool_size: int              # sizeof(ConstantPool): the entries follow it
    source_file_index: int      # ConstantPool::_source_file_name_index (u2)
    klass_constants: int        # InstanceKlass::_constants
    klass_name: int             # Klass::_name
    symbol_length: int          # Symbol::_length (u2)
    symbol_body: int            # Symbol::_body
    const_method_size: int      # sizeof(ConstMethod): the bytecodes follow it, then the line table
    code_size: int              # ConstMethod::_code_size (u2)
    flags: int                  # ConstMethod's flags (u2 before JDK 21, u4 since)
    has_lines: int              # its "has a line number table" bit (0: unknown, no lines)
    excluded: int               # UNSIGNED5's excluded bytes X: 0 before JDK 21, 1 since (no 0 bytes)


@dataclass(frozen=True, slots=True)
class _DebugLayout:
    """Where an nmethod keeps its debug information (the Serviceability Agent's NMethod): its
    PcDesc table (pc offset -> scope decode offset), its scopes data (each scope: sender's decode
    offset, metadata index of its Method*, bci + 1, ...) and its metadata (Method*s).

    JDK 17: code and scopes data by address (CodeBlob::_code_begin/_code_end,
    CompiledMethod::_scopes_data_begin), the PcDescs from nmethod::_scopes_pcs_offset to
    _dependencies_offset and the metadata from _metadata_offset to the scopes data. JDK 23+: code
    from CodeBlob::_code_offset to _data_offset; the PcDescs and scopes data in the nmethod's
    immutable data (JDK 25: _scopes_pcs_offset .. _scopes_data_offset .. _immutable_data_size; the
    Serviceability Agent's other order is taken too); the metadata in its mutable data, after the
    relocations."""

    nmethod_size: int           # sizeof(nmethod): the header read at once
    compile_id: int             # nmethod::_compile_id (int)
    method: int                 # nmethod::_method (17: CompiledMethod::_method)
    code_begin: int             # 17: CodeBlob::_code_begin (address); 23+: _code_offset (int)
    code_end: int               # 17: CodeBlob::_code_end (address); 23+: _data_offset (int)
    pcs: int                    # nmethod::_scopes_pcs_offset (int)
    pcs_end: int                # 17: nmethod::_dependencies_offset; 23+: _immutable_data_size (int)
    data: int                   # 17: CompiledMethod::_scopes_data_begin (address); 23+: _scopes_data_offset
    metadata: int               # 17: nmethod::_metadata_offset; 23+: CodeBlob::_relocation_size (int)
    immutable: int              # 23+: nmethod::_immutable_data (address); -1 on 17
    mutable: int                # 23+: CodeBlob::_mutable_data (address)
    mutable_size: int           # 23+: CodeBlob::_mutable_data_size (int)
    pc_desc_size: int           # sizeof(PcDesc)
    pc_offset: int              # PcDesc::_pc_offset (int)
    scope_offset: int           # PcDesc::_scope_decode_offset (int)
    excluded: int               # UNSIGNED5's excluded bytes (as for line number tables)


def _debug_layout(vm: VMStructs, excluded: int) -> _DebugLayout:
    def either(*pairs: tuple[str, str]) -> int:
        for t, f in pairs:
            if (t, f) in vm.fields:
                return vm.fields[(t, f)]
        raise UnsupportedHotSpot(f"no {pairs[0][0]}::{pairs[0][1]} in gHotSpotVMStructs")

    common = {"nmethod_size": vm.size("nmethod"), "compile_id": vm.field("nmethod", "_compile_id"),
              "method": either(("nmethod", "_method"), ("CompiledMethod", "_method")),
              "pcs": vm.field("nmethod", "_scopes_pcs_offset"), "pc_desc_size": vm.size("PcDesc"),
              "pc_offset": vm.field("PcDesc", "_pc_offset"),
              "scope_offset": vm.field("PcDesc", "_scope_decode_offset"), "excluded": excluded}
    if ("nmethod", "_immutable_data") in vm.fields:
        return _DebugLayout(
            **common, code_begin=vm.field("CodeBlob", "_code_offset"), code_end=vm.field("CodeBlob", "_data_offset"),
            pcs_end=vm.field("nmethod", "_immutable_data_size"), data=vm.field("nmethod", "_scopes_data_offset"),
            metadata=vm.field("CodeBlob", "_relocation_size"), immutable=vm.field("nmethod", "_immutable_data"),
            mutable=vm.field("CodeBlob", "_mutable_data"), mutable_size=vm.field("CodeBlob", "_mutable_data_size"))
    return _DebugLayout(
        **common, code_begin=vm.field("CodeBlob", "_code_begin"), code_end=vm.field("CodeBlob", "_code_end"),
        pcs_end=vm.field("nmethod", "_dependencies_offset"),
        data=either(("nmethod", "_scopes_data_begin"), ("CompiledMethod", "_scopes_data_begin")),
        metadata=vm.field("nmethod", "_metadata_offset"), immutable=-1, mutable=-1, mutable_size=-1)


@dataclass(slots=True)
class JVM:
    """What is kept per JVM process."""

    entry: HotSpotProcess
    heaps: HotSpotHeaps
    layout: _Layout
    vm: VMStructs
    debug: _DebugLayout | None = None   # None: compiled frames without inlined methods and lines
    tried: float = 0.0          # when an nmethod was last looked for (JDK 17, none found yet)
    debug_error: str = ""       # why ``debug`` is None


def _symbols(pid: int, start: int, end: int, path: str, build_id: str, cache: SymbolCache) -> dict[bytes, int]:
    return mapped_file_symbols(pid, start, end, path, build_id, cache,
                               lambda fd: dynamic_symbols_with_prefix(fd, PREFIX),
                               (OSError, ValueError, struct.error), MAX_FILES)


def _nmethod_name(mem: _Mem, vm: VMStructs, heaps: HotSpotHeaps, block: int) -> int:
    """JDK 17 (no CodeBlob::_kind): the address of the name every nmethod carries ("nmethod"),
    from the first nmethod found in the code heaps (0 when there is none yet)."""
    name_off = vm.field("CodeBlob", "_name")
    length_off = vm.field("HeapBlock::Header", "_length")
    used_off = vm.field("HeapBlock::Header", "_used")
    seen = 0
    for h in range(heaps.count):
        at, high, shift = heaps.low[h], heaps.high[h], heaps.log2_segment[h]
        while at < high and seen < MAX_BLOCKS_SCANNED:
            seen += 1
            length = mem.u64(at + length_off) & 0xFFFFFFFF
            if length == 0:
                break
            if mem.read(at + used_off, 1) != b"\0":
                name = mem.u64(at + block + name_off)
                try:
                    if name and mem.cstr(name, 16) == "nmethod":
                        return name
                except (OSError, ValueError):
                    pass
            at += length << shift
    return 0


def find_hotspot(pid: int, regions: Sequence[Region],
                 cache: OrderedDict[Hashable, dict[bytes, int]]) -> JVM | None:
    """The HotSpot entries of ``pid`` when it maps a libjvm exporting gHotSpotVMStructs, else None.
    Raises ``UnsupportedHotSpot`` for a build (or a JVM not started far enough) it cannot walk."""
    for start, end, bias, path, build_id, anonymous in regions:
        if anonymous or bias is None or not path.endswith("/libjvm.so"):
            continue
        symbols = _symbols(pid, start, end, path, build_id, cache)
        if PREFIX + b"VMStructs" not in symbols:
            continue
        mem = _Mem(pid)
        try:
            jvm = _jvm(mem, read_vm_structs(mem, symbols, bias))
        finally:
            mem.close()
        code = [(s, e) for s, e, b, p, _, anon in regions if p == path and not anon]
        jvm.heaps.jvm_low, jvm.heaps.jvm_high = min(s for s, _ in code), max(e for _, e in code)
        return jvm
    return None


def _jvm(mem: _Mem, vm: VMStructs) -> JVM:
    heaps_array = mem.u64(vm.static("CodeCache", "_heaps"))
    if not heaps_array:
        raise _NotYet("code cache not initialised yet")
    count = mem.i32(heaps_array + vm.field("GrowableArrayBase", "_len"))
    data = mem.u64(heaps_array + vm.field("GrowableArray<int>", "_data"))
    if not 0 < count <= HEAPS:
        raise UnsupportedHotSpot(f"{count} code heaps")
    memory, segmap = vm.field("CodeHeap", "_memory"), vm.field("CodeHeap", "_segmap")
    low_b, high_b = vm.field("VirtualSpace", "_low_boundary"), vm.field("VirtualSpace", "_high_boundary")
    log2 = vm.field("CodeHeap", "_log2_segment_size")
    heaps = HotSpotHeaps()
    heaps.count = count
    for h in range(count):
        heap = mem.u64(data + 8 * h)
        heaps.low[h] = mem.u64(heap + memory + low_b)
        heaps.high[h] = mem.u64(heap + memory + high_b)
        heaps.segmap[h] = mem.u64(heap + segmap + low_b)
        heaps.log2_segment[h] = mem.i32(heap + log2)
    code = mem.u64(vm.static("AbstractInterpreter", "_code"))
    if not code:
        raise _NotYet("interpreter not generated yet")
    interp_low = mem.u64(code + vm.field("StubQueue", "_stub_buffer"))
    interp_high = interp_low + mem.i32(code + vm.field("StubQueue", "_buffer_limit"))
    block = vm.size("HeapBlock")
    if ("CodeBlob", "_kind") in vm.fields:             # JDK 23+: the blob's kind
        tag_offset, mask = vm.field("CodeBlob", "_kind"), 0xFF
        tag = vm.constants.get("CodeBlobKind::Nmethod", 1)
    else:                                               # JDK 17: every nmethod's name is one string
        tag_offset, mask = vm.field("CodeBlob", "_name"), 0xFFFFFFFFFFFFFFFF
        tag = _nmethod_name(mem, vm, heaps, block)
        if not tag:                                     # none compiled yet (or -Xint): looked for later
            mask, tag = 0, 1                            # (nothing matches: compiled frames are stepped only)
    sender_sp = vm.constants.get("frame::interpreter_frame_sender_sp_offset", -1)
    last_sp = vm.constants.get("frame::interpreter_frame_last_sp_offset", sender_sp - 1)
    # frame_x86.hpp: sender_sp, last_sp, method, mirror, mdp, cache, locals, bcp (JDK 17 to 25)
    method_slot = vm.constants.get("frame::interpreter_frame_method_offset", last_sp - 1)
    bcp_slot = vm.constants.get("frame::interpreter_frame_bcp_offset", method_slot - 5)
    entry = HotSpotProcess(
        cache_low=min(heaps.low[h] for h in range(count)), cache_high=max(heaps.high[h] for h in range(count)),
        interp_low=interp_low, interp_high=interp_high, nmethod_tag=tag, tag_mask=mask, tag_offset=tag_offset,
        frame_size=vm.field("CodeBlob", "_frame_size"),
        nmethod_method=vm.field("nmethod", "_method") if ("nmethod", "_method") in vm.fields
        else vm.field("CompiledMethod", "_method"),
        const_method=vm.field("Method", "_constMethod"), const_method_size=vm.size("ConstMethod"),
        heap_block_size=block, interp_method=-method_slot, interp_bcp=-bcp_slot, interp_sender_sp=-sender_sp)
    layout = _Layout(
        const_method=entry.const_method, constants=vm.field("ConstMethod", "_constants"),
        name_index=vm.field("ConstMethod", "_name_index"), signature_index=vm.field("ConstMethod", "_signature_index"),
        pool_holder=vm.field("ConstantPool", "_pool_holder"), pool_length=vm.field("ConstantPool", "_length"),
        pool_size=vm.size("ConstantPool"), source_file_index=vm.field("ConstantPool", "_source_file_name_index"),
        klass_constants=vm.field("InstanceKlass", "_constants"), klass_name=vm.field("Klass", "_name"),
        symbol_length=vm.field("Symbol", "_length"), symbol_body=vm.field("Symbol", "_body"),
        const_method_size=vm.size("ConstMethod"), code_size=vm.field("ConstMethod", "_code_size"),
        flags=vm.field("ConstMethod", "_flags", "_flags._flags"),
        has_lines=vm.constants.get("ConstMethod::_has_linenumber_table",
                                   vm.constants.get("ConstMethodFlags::_misc_has_linenumber_table", 0)),
        excluded=1 if ("ConstMethod", "_flags._flags") in vm.fields else 0)
    jvm = JVM(entry, heaps, layout, vm, tried=time.monotonic())
    try:
        jvm.debug = _debug_layout(vm, layout.excluded)
        cid = jvm.debug.compile_id
        entry.compile_id = cid // 4 if cid % 4 == 0 and 0 < cid < 4 * 256 else 0
    except UnsupportedHotSpot as e:     # Java frames still, without inlining and lines
        jvm.debug_error = str(e)
    return jvm


# ---------------------------------------------------------------------------- methods


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """A Method*'s names, and what identifies it when its address is seen again."""

    name: str                       # "Class.method(signature)"
    file: str
    fingerprint: tuple[int, int]    # (ConstMethod*, ConstantPool*) as read
    lines: tuple[tuple[int, int], ...] = ()   # (start bci, line), by bci

    def line(self, bci: int) -> int:
        """The source line of bytecode index ``bci`` (0 when unknown)."""
        line = 0
        for start, at in self.lines:
            if start > bci:
                break
            line = at
        return line


_PRIMITIVES = {"B": "byte", "C": "char", "D": "double", "F": "float", "I": "int", "J": "long", "S": "short",
               "Z": "boolean", "V": "void"}


def pretty_signature(sig: str) -> str:
    """``(JLjava/lang/String;[I)V`` → ``(long, java.lang.String, int[])``."""
    if not sig.startswith("(") or ")" not in sig:
        raise ValueError(f"not a method signature: {sig!r}")
    args, i, end = [], 1, sig.index(")")
    while i < end:
        dims = 0
        while sig[i] == "[":
            dims, i = dims + 1, i + 1
        if sig[i] == "L":
            semi = sig.index(";", i)
            name, i = sig[i + 1:semi].replace("/", "."), semi + 1
        elif sig[i] in _PRIMITIVES:
            name, i = _PRIMITIVES[sig[i]], i + 1
        else:
            raise ValueError(f"bad signature {sig!r}")
        args.append(name + "[]" * dims)
    return "(" + ", ".join(args) + ")"


def _symbol(mem: _Mem, lay: _Layout, sym: int) -> str:
    if not sym:
        raise ValueError("null symbol")
    n = mem.u16(sym + lay.symbol_length)
    if n > MAX_SYMBOL:
        raise ValueError("symbol too long")
    return mem.read(sym + lay.symbol_body, n).decode("utf-8")


def read_method(mem: _Mem, lay: _Layout, method: int) -> MethodInfo:
    """Names the Method* ``method``. Raises ValueError/OSError when what it points to is not a
    method of a loaded class (its holder's constant pool must be the method's own)."""
    cm = mem.u64(method + lay.const_method)
    cp = mem.u64(cm + lay.constants)
    holder = mem.u64(cp + lay.pool_holder)
    if not cm or not cp or not holder or mem.u64(holder + lay.klass_constants) != cp:
        raise ValueError("not a method of a loaded class")
    length = mem.i32(cp + lay.pool_length)

    def pool_symbol(index: int) -> str:
        if not 0 < index < length:
            raise ValueError("constant pool index out of range")
        return _symbol(mem, lay, mem.u64(cp + lay.pool_size + 8 * index))

    klass = _symbol(mem, lay, mem.u64(holder + lay.klass_name)).replace("/", ".")
    name = pool_symbol(mem.u16(cm + lay.name_index))
    sig = pretty_signature(pool_symbol(mem.u16(cm + lay.signature_index)))
    try:
        source = pool_symbol(mem.u16(cp + lay.source_file_index))
    except (OSError, ValueError):
        source = ""
    return MethodInfo(f"{klass}.{name}{sig}", source, (cm, cp), _line_table(mem, lay, cm))


MAX_LINE_ENTRIES = 4096        # line number table entries read per method


def _line_table(mem: _Mem, lay: _Layout, cm: int) -> tuple[tuple[int, int], ...]:
    """The method's compressed line number table (after its bytecodes): (bci, line) pairs, each a
    byte (bci delta << 3 | line delta) or 0xFF and two signed UNSIGNED5 numbers; 0 ends it."""
    if not lay.has_lines:
        return ()
    size = 2 if lay.has_lines < 0x10000 else 4
    flags = int.from_bytes(mem.read(cm + lay.flags, size), "little")
    if not flags & lay.has_lines:
        return ()
    data = os.pread(mem.fd, 4 * MAX_LINE_ENTRIES, cm + lay.const_method_size + mem.u16(cm + lay.code_size))
    at = 0

    def byte() -> int:
        nonlocal at
        if at >= len(data):
            raise ValueError("line number table past the read")
        at += 1
        return data[at - 1]

    x = lay.excluded
    low = 256 - 64 - x                  # UNSIGNED5: L = 256 - H - X, lg(H) = 6

    def signed() -> int:
        b = byte() - x
        value, shift = b, 6
        i = 1
        while b >= low and i < 5:
            b = byte() - x
            value += b << shift
            shift += 6
            i += 1
        return (value >> 1) ^ -(value & 1)

    out, bci, line = [], 0, 0
    for _ in range(MAX_LINE_ENTRIES):
        b = byte()
        if b == 0:
            break
        if b == 0xFF:
            bci += signed()
            line += signed()
        else:
            bci += b >> 3
            line += b & 7
        out.append((bci, line))
    return tuple(sorted(out))


# ---------------------------------------------------------------------------- compiled scopes


def _unsigned5(data: bytes, at: int, x: int) -> tuple[int, int]:
    """One UNSIGNED5 number (HotSpot's CompressedReadStream::read_int) at ``data[at]``, with ``x``
    excluded bytes: (value, the offset after it)."""
    low = 256 - 64 - x
    value, shift = 0, 0
    for _ in range(5):
        if at >= len(data) or data[at] < x:
            raise ValueError("bad UNSIGNED5 number")
        b = data[at] - x
        at += 1
        value += b << shift
        if b < low:
            break
        shift += 6
    return value & 0xFFFFFFFF, at


def _blob_at(mem: _Mem, heaps: HotSpotHeaps, block: int, pc: int) -> int:
    """The CodeBlob holding ``pc``, by the code heap's segment map (as ``hotspot_blob`` in the
    kernel), or 0."""
    for h in range(heaps.count):
        low, high, shift = heaps.low[h], heaps.high[h], heaps.log2_segment[h]
        if not low <= pc < high:
            continue
        idx = (pc - low) >> shift
        for _ in range(1 << 16):
            tag = mem.read(heaps.segmap[h] + idx, 1)[0]
            if tag == 0xFF or tag > idx:
                return 0
            if tag == 0:
                return low + (idx << shift) + block
            idx -= tag
    return 0


def read_scopes(mem: _Mem, jvm: JVM, pc: int, method: int, compile_id: int, leaf: bool) -> tuple[tuple[int, int], ...]:
    """The scopes of compiled code at ``pc`` (the sampled pc when ``leaf``, else a return address):
    (Method*, bci) from the innermost inlined method out to the compiled one, which must be
    ``method`` with ``compile_id``. Raises ValueError when the nmethod there is not that one any
    more (recompiled, flushed), or its debug information does not read as expected."""
    dbg, entry = jvm.debug, jvm.entry
    if dbg is None:
        raise ValueError("no debug information layout")
    at = pc if leaf else pc - 1
    nm = _blob_at(mem, jvm.heaps, entry.heap_block_size, at)
    if not nm:
        raise ValueError("no code blob at the pc")
    hdr = mem.read(nm, dbg.nmethod_size)

    def u64(off: int) -> int:
        return int(struct.unpack_from("<Q", hdr, off)[0])

    def i32(off: int) -> int:
        return int(struct.unpack_from("<i", hdr, off)[0])

    if not entry.tag_mask or (u64(entry.tag_offset) & entry.tag_mask) != entry.nmethod_tag:
        raise ValueError("not an nmethod")
    if u64(dbg.method) != method or i32(dbg.compile_id) & COMPILE_ID_MASK != compile_id:
        raise ValueError("another nmethod")
    if dbg.immutable < 0:                   # JDK 17
        code, code_end = u64(dbg.code_begin), u64(dbg.code_end)
        pcs, pcs_end = nm + i32(dbg.pcs), nm + i32(dbg.pcs_end)
        data, data_end = u64(dbg.data), nm + i32(dbg.pcs)
        meta, meta_end = nm + i32(dbg.metadata), data
    else:                                   # JDK 23+
        code, code_end = nm + i32(dbg.code_begin), nm + i32(dbg.code_end)
        imm, pcs_at, data_at, size = u64(dbg.immutable), i32(dbg.pcs), i32(dbg.data), i32(dbg.pcs_end)
        if pcs_at < data_at:                # JDK 25: the PcDescs, then the scopes data
            pcs, pcs_end, data, data_end = imm + pcs_at, imm + data_at, imm + data_at, imm + size
        else:                               # the Serviceability Agent's order
            data, data_end, pcs, pcs_end = imm + data_at, imm + pcs_at, imm + pcs_at, imm + size
        meta, meta_end = u64(dbg.mutable) + i32(dbg.metadata), u64(dbg.mutable) + i32(dbg.mutable_size)
    if not code <= at < code_end or not 0 < pcs_end - pcs <= MAX_PC_DESCS or not data < data_end:
        raise ValueError("nmethod bounds")
    size = dbg.pc_desc_size
    if size % 4 or dbg.pc_offset % 4 or dbg.scope_offset % 4 or (pcs_end - pcs) % size:
        raise ValueError("PcDesc layout")
    words = memoryview(mem.read(pcs, pcs_end - pcs)).cast("i")
    step = size // 4
    # the first PcDesc at or after the pc (HotSpot's pc_desc_near; a return address has its own),
    # by bisection: HotSpot keeps them sorted by pc offset
    i = bisect.bisect_left(words[dbg.pc_offset // 4::step], pc - code)
    decode = words[i * step + dbg.scope_offset // 4] if i < len(words) // step else -1
    if decode <= 0:
        raise ValueError("no scope at the pc")
    chain: list[tuple[int, int]] = []
    for _ in range(MAX_INLINE_DEPTH):
        if not 0 < decode < data_end - data:
            raise ValueError("scope outside the scopes data")
        raw = os.pread(mem.fd, min(32, data_end - data - decode), data + decode)
        sender, p = _unsigned5(raw, 0, dbg.excluded)
        index, p = _unsigned5(raw, p, dbg.excluded)
        bci, p = _unsigned5(raw, p, dbg.excluded)
        if not 0 < index <= (meta_end - meta) // 8:
            raise ValueError("metadata index out of range")
        chain.append((mem.u64(meta + 8 * (index - 1)), bci - 1))
        if sender == 0:
            break
        decode = sender
    else:
        raise ValueError("scopes too deep")
    if chain[-1][0] != method:
        raise ValueError("outermost scope is not the compiled method")
    return tuple(chain)


@dataclass(frozen=True, slots=True)
class _Compiled(Frame):
    """A compiled Java frame between ``frames`` and ``place``: what finds its scopes once its pc,
    the native frame's address, is known."""

    pid: int = 0
    method: int = 0
    compile_id: int = 0


# ---------------------------------------------------------------------------- the runtime


class HotSpot(QueuedRuntime):
    """JVM processes: their ``runtime_processes`` data and code heaps, method names and frames.

    ``recognise``/``forget`` run on the unwinder's worker thread; ``notice`` queues work for this
    class's own thread, which names Method*s while their process lives; ``frames`` and ``place``
    run at drain time.

    A JVM is usually first sampled before it is one: the launcher (``libjli.so``) has not loaded
    libjvm yet, or the VM has not set up its code cache. Such a process is looked at again on a
    timer (``reload``: its mappings captured again and its tables reloaded, which recognises it
    anew) until it is a JVM, so one that lives a few seconds is walked and named from then on."""

    name = "hotspot"
    frame_type = "jvm"
    bpf_header = BPF_HEADER
    program = "walk_hotspot"
    stats_map = "hotspot_stats"
    stat_names = header_enum(BPF_HEADER, "HOTSPOT_STAT")
    # (hotspot_heaps, its own map, is larger than a runtime's per-process data: checked in __init__)
    mirrors = (("mirror_hotspot_process", "Leaf", HotSpotProcess),)

    def __init__(self, bpf: Any, caches: CachesConfig | None = None) -> None:
        super().__init__(bpf, caches or CachesConfig())
        if bpf is not None:
            check_mirror(bpf, "mirror_hotspot_heaps", "Leaf", HotSpotHeaps, "profiler")
        self._processes: dict[int, JVM] = {}
        self._symbols: OrderedDict[Hashable, dict[bytes, int]] = OrderedDict()
        self._methods: OrderedDict[tuple[int, int], tuple[MethodInfo | None, float]] = OrderedDict()
        # (pid, pc, Method*, compile id) -> its scopes, innermost first (None: not readable)
        self._scopes: OrderedDict[tuple[int, int, int, int], tuple[tuple[int, int], ...] | None] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0
        self._worker = QueueWorker("hotspot-methods", self._learn, QUEUE_SIZE, self.stats)
        self._young: dict[int, int] = {}                    # starting JVM -> looks so far
        self._timers: dict[int, threading.Timer] = {}

    @classmethod
    def enabled(cls, config: ProfilerSourceConfig) -> bool:
        return bool(getattr(config, "java_frames", True))

    @classmethod
    def cflags(cls, config: ProfilerSourceConfig) -> list[str]:
        from . import RUNTIMES
        from .base import slot_of
        return [f"-DJIT_WALKER_SLOT={slot_of(RUNTIMES, cls)}"]

    @property
    def processes(self) -> int:
        return len(self._processes)

    def recognise(self, pid: int, regions: Sequence[Region]) -> bytes | None:
        try:
            jvm = find_hotspot(pid, regions, self._symbols)
        except _NotYet as e:
            log.debug("pid %d: %s", pid, e)
            self._look_again(pid)
            return None
        except UnsupportedHotSpot as e:
            self.stats["unsupported"] += 1
            log.debug("pid %d: %s", pid, e)
            return None
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            self.stats["unreadable"] += 1
            log.debug("pid %d: %s", pid, e)
            self._look_again(pid)           # (libjvm being loaded: its data not relocated yet)
            return None
        if jvm is None:
            if any(r[3].endswith(("/libjli.so", "/bin/java")) for r in regions):   # a launcher: libjvm to come
                self._look_again(pid)
            return None
        with self._lock:
            self._young.pop(pid, None)
        try:
            table = self.bpf["hotspot_heaps"]
            table[table.Key(pid)] = jvm.heaps
        except Exception as e:   # noqa: BLE001 -- full map: no Java frames for it
            self.stats["processes_over_limit"] += 1
            log.debug("hotspot_heaps[%d]: %s", pid, e)
            return None
        self._processes[pid] = jvm
        return bytes(jvm.entry)

    def _look_again(self, pid: int) -> None:
        """Reloads a starting JVM after a while (at most YOUNG_LOOKS times; one timer per pid)."""
        if self.reload is None:
            return
        with self._lock:
            if pid in self._timers:         # (a load's two passes both see it)
                return
            looks = self._young.get(pid, 0)
            if looks >= YOUNG_LOOKS or (not looks and len(self._young) >= MAX_YOUNG):
                self._young.pop(pid, None)
                self.stats["young_given_up"] += 1
                return
            self._young[pid] = looks + 1
            timer = threading.Timer(min(YOUNG_FIRST_S * 2 ** looks, YOUNG_MAX_S), self._again, (pid,))
            timer.daemon = True
            self._timers[pid] = timer
        self.stats["young_looked_again"] += 1
        timer.start()

    def _again(self, pid: int) -> None:
        with self._lock:
            self._timers.pop(pid, None)
            alive = os.path.exists(f"/proc/{pid}")
            if not alive:
                self._young.pop(pid, None)
        if alive and self.reload is not None:
            self.reload(pid)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()
        super().stop(timeout)

    def forget(self, pid: int) -> None:
        with self._lock:
            self._young.pop(pid, None)
            timer = self._timers.pop(pid, None)
        if timer is not None:
            timer.cancel()
        if self._processes.pop(pid, None) is None:
            return
        try:
            table = self.bpf["hotspot_heaps"]
            del table[table.Key(pid)]
        except Exception:   # noqa: BLE001,S110 -- gone already (or the program closed)
            pass
        with self._lock:
            for key in [k for k in self._methods if k[0] == pid]:
                del self._methods[key]
            for skey in [k for k in self._scopes if k[0] == pid]:
                del self._scopes[skey]

    def notice(self, pid: int, frame_id: int) -> None:
        self._worker.put((pid, frame_id))

    def _learn(self, item: tuple[int, int]) -> None:
        pid, method = item
        if pid not in self._processes:
            self.stats["methods_of_unknown_process"] += 1
            return
        self._read(pid, method)

    def _read(self, pid: int, method: int) -> MethodInfo | None:
        """Reads ``method`` now and caches the result (None: not a readable Method*)."""
        jvm = self._processes.get(pid)
        if jvm is None:
            return None
        try:
            mem = _Mem(pid)
        except OSError:
            return None
        info: MethodInfo | None
        try:
            info = read_method(mem, jvm.layout, method)
            self.stats["methods_read"] += 1
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            log.debug("Method %#x of pid %d: %s", method, pid, e)
            self.stats["methods_unreadable"] += 1
            info = None
        finally:
            mem.close()
        with self._lock:
            self._methods[(pid, method)] = (info, time.monotonic())
            self._methods.move_to_end((pid, method))
            while len(self._methods) > MAX_METHODS:
                self._methods.popitem(last=False)
                self.evictions += 1
        return info

    def _still(self, pid: int, method: int, info: MethodInfo) -> bool:
        """Whether ``method`` still is the method named there (a class unloaded and its metadata
        reused would show another ConstMethod or constant pool)."""
        jvm = self._processes.get(pid)
        if jvm is None:
            return True                     # gone: what was read while it lived stands
        try:
            mem = _Mem(pid)
        except OSError:
            return True
        try:
            cm = mem.u64(method + jvm.layout.const_method)
            return (cm, mem.u64(cm + jvm.layout.constants)) == info.fingerprint
        except (OSError, ValueError, struct.error):
            return False
        finally:
            mem.close()

    def method(self, pid: int, method: int) -> MethodInfo | None:
        """The named method at ``method``: cached (checked again at most every REVALIDATE_S), else
        read now."""
        with self._lock:
            entry = self._methods.get((pid, method))
        if entry is None:
            return self._read(pid, method)
        info, checked = entry
        if info is None or time.monotonic() - checked < REVALIDATE_S:
            return info
        if self._still(pid, method, info):
            with self._lock:
                self._methods[(pid, method)] = (info, time.monotonic())
            return info
        self.stats["methods_moved"] += 1
        return self._read(pid, method)

    def _find_nmethods(self, pid: int, jvm: JVM) -> None:
        """JDK 17, no nmethod at recognition (a young JVM, or -Xint): looks for one again (at most
        every REVALIDATE_S) and, once found, renews the process's kernel entry with the tag."""
        now = time.monotonic()
        if now - jvm.tried < REVALIDATE_S:
            return
        jvm.tried = now
        try:
            mem = _Mem(pid)
        except OSError:
            return
        try:
            tag = _nmethod_name(mem, jvm.vm, jvm.heaps, jvm.entry.heap_block_size)
        except (OSError, ValueError, struct.error):
            tag = 0
        finally:
            mem.close()
        if not tag:
            return
        jvm.entry.nmethod_tag, jvm.entry.tag_mask = tag, 0xFFFFFFFFFFFFFFFF
        from . import RUNTIMES
        from .base import slot_of
        try:
            table = self.bpf["runtime_processes"]
            table[table.Key(pid)] = RuntimeProcess.of(slot_of(RUNTIMES, type(self)), bytes(jvm.entry))
            # each CPU's cached copy of its last process's entry is read again (a changed version)
            settings = self.bpf["settings"]
            version = settings[ctypes.c_int(SET_TABLES_USER)].value
            settings[ctypes.c_int(SET_TABLES_USER)] = ctypes.c_uint32(version ^ 0x80000000)
            self.stats["nmethods_found_later"] += 1
        except Exception as e:   # noqa: BLE001 -- gone meanwhile
            log.debug("runtime_processes[%d]: %s", pid, e)

    def frames(self, pid: int, recorded: RecordedFrames) -> list[tuple[Frame, bool]]:
        """The recorded Java frames, innermost first, as (frame, False); each frame's native index
        is kept in its address until ``place`` puts it there. An unnamed method is counted, and its
        native frame stays in place with its address."""
        jvm = self._processes.get(pid)
        if jvm is not None and not jvm.entry.tag_mask:
            self._find_nmethods(pid, jvm)
        out = []
        unresolved = 0
        for method, aux in recorded:
            index = (aux >> AUX_INDEX_SHIFT) & 0x7F
            info = self.method(pid, method)
            if info is None:
                unresolved += 1
                out.append((Frame(index, "", self.frame_type), False))
                continue
            if aux & COMPILED:
                out.append((_Compiled(index, info.name, self.frame_type, None, info.file, 0, pid=pid,
                                      method=method, compile_id=aux & COMPILE_ID_MASK), False))
                continue
            bci = aux & NO_BCI
            line = info.line(bci) if bci != NO_BCI else 0
            out.append((Frame(index, info.name, self.frame_type, None, info.file, line), False))
        self.stats["frames_unresolved"] += unresolved
        self.stats["frames_resolved"] += len(out) - unresolved
        return out

    def place(self, native: Sequence[Frame], frames: Sequence[tuple[Frame, bool]]) -> tuple[tuple[Frame, ...], bool]:
        """Each Java frame in place of the native frame (its pc in the code cache) at its index
        among the user frames, a compiled one with the methods inlined at its pc before it;
        aligned when every index named a native frame."""
        user = next((i for i, f in enumerate(native) if f.frame_type != "kernel"), len(native))
        aligned = True
        placed: dict[int, Sequence[Frame]] = {}
        for frame, _ in frames:
            at = user + frame.address
            if at >= len(native) or native[at].frame_type != "native":
                aligned = False
            elif isinstance(frame, _Compiled):
                placed[at] = self._compiled(frame, native[at], at == user)
            elif frame.function:
                placed[at] = (Frame(0, frame.function, frame.frame_type, None, frame.file, frame.line),)
        if not placed:
            return tuple(native), aligned
        out: list[Frame] = []
        for i, f in enumerate(native):
            out.extend(placed.get(i, (f,)))
        return tuple(out), aligned

    def _compiled(self, frame: _Compiled, native: Frame, leaf: bool) -> Sequence[Frame]:
        """A compiled frame's methods at its pc, innermost first, each at its line: the inlined
        ones, then the compiled method. When the scopes cannot be read (the nmethod recompiled or
        flushed since, the process gone), the compiled method alone, without a line."""
        scopes = self._scopes_of(frame.pid, native.address, frame.method, frame.compile_id, leaf)
        if scopes is None:
            return (Frame(0, frame.function, frame.frame_type, None, frame.file, 0),)
        out: list[Frame] = []
        for method, bci in scopes[:-1]:
            info = self.method(frame.pid, method)
            if info is None:                # an inlined method not named: its pc keeps its address
                self.stats["inlined_unresolved"] += 1
                out.append(native)
            else:
                self.stats["inlined_resolved"] += 1
                out.append(Frame(0, info.name, self.frame_type, None, info.file, info.line(max(bci, 0))))
        info = self.method(frame.pid, frame.method)
        line = info.line(max(scopes[-1][1], 0)) if info is not None else 0
        out.append(Frame(0, frame.function, frame.frame_type, None, frame.file, line))
        return out

    def _scopes_of(self, pid: int, pc: int, method: int, compile_id: int,
                   leaf: bool) -> tuple[tuple[int, int], ...] | None:
        """``read_scopes``, cached by (pid, pc, Method*, compile id): a compile id names one
        nmethod for the JVM's life, so the entry never describes other code."""
        key = (pid, pc if leaf else pc - 1, method, compile_id)
        if key in self._scopes:
            self._scopes.move_to_end(key)
            return self._scopes[key]
        jvm = self._processes.get(pid)
        scopes = None
        if jvm is not None and jvm.debug is not None and compile_id:
            try:
                mem = _Mem(pid)
            except OSError:
                mem = None
            if mem is not None:
                try:
                    scopes = read_scopes(mem, jvm, pc, method, compile_id, leaf)
                    self.stats["scopes_read"] += 1
                except (OSError, ValueError, struct.error) as e:
                    log.debug("scopes at %#x of pid %d: %s", pc, pid, e)
                    self.stats["scopes_unreadable"] += 1
                finally:
                    mem.close()
        else:
            self.stats["scopes_unreadable"] += 1
        self._scopes[key] = scopes
        while len(self._scopes) > MAX_SCOPES:
            self._scopes.popitem(last=False)
        return scopes

    @classmethod
    def watch(cls, telemetry: Any, runtime: Callable[[], Runtime | None], caches: CachesConfig) -> None:
        def frames() -> dict[str, int]:
            rt = runtime()
            p = rt.all_stats() if rt is not None else {}
            return {"recorded": p.get("interpreted", 0) + p.get("compiled", 0),
                    "resolved": p.get("frames_resolved", 0), "unresolved": p.get("frames_unresolved", 0)} if p else {}

        def events() -> dict[str, int]:
            rt = runtime()
            return rt.counters() if rt is not None else {}

        telemetry.watch_counters(
            "profiler_java_frames", "Java (HotSpot) frames: recorded in the kernel, and named at drain "
            "(resolved) or not (unresolved: the Method* could not be read or checked; kept by address)",
            "result", frames)
        telemetry.watch_counters(
            "profiler_java", "JVM processes and methods by event: processes_loaded, unsupported, "
            "unreadable, processes_over_limit, young_looked_again (a starting JVM reloaded until it is one), "
            "young_given_up, nmethods_found_later, methods_read, methods_unreadable, "
            "methods_moved, methods_of_unknown_process, queue_full, scopes_read, scopes_unreadable (a compiled "
            "frame's nmethod recompiled or flushed, or the process gone: its method without inlined methods "
            "and line), inlined_resolved, inlined_unresolved", "event", events)
