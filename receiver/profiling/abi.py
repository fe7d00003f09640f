"""The one Python mirror of ``bpf/profiler.h``: the records, map keys and values the profiler's
BPF program shares with user space, and the constants they use.

Constants are read from the header itself (``header_defines``/``header_enum``), never repeated by
hand; the ctypes structs are checked against the compiler's layout twice: against BCC's view of
each map when the program loads (``check_mirror``), and against gcc's ``sizeof``/``offsetof`` of
the header in a unit test (``tests/profiling/test_abi.py``), so a changed field or constant fails
before any BPF is loaded. A runtime's own structs (its per-process data) live beside its walker in
``bpf/runtimes/<name>.bpf.h`` and its module in ``receiver/profiling/runtimes/``.
"""

from __future__ import annotations

import ctypes
import struct

from ..kernel.bcc import header_defines, header_enum

__all__ = [
    "HEADER", "COMM_LEN", "MAX_STACK_DEPTH", "REC_NEW_PROCESS", "REC_SAMPLE", "REC_RUNTIME_FRAME",
    "LOST_REASONS", "STAT_NAMES", "UNWIND_STAT_NAMES", "SET_GENERATION", "SET_TABLES_USER",
    "UNWIND_MAX_MAPPINGS", "UNWIND_STOP", "ROW_END", "ROW_RSP", "ROW_RBP", "ROW_UNSUPPORTED",
    "ROW_OUTERMOST", "UNWIND_NATIVE_SLOT", "RUNTIME_SLOTS", "RUNTIME_DATA_BYTES", "RUNTIME_AUX_LAST",
    "RUNTIME_MAX_FRAMES", "ProfKey", "PROF_KEY", "UnwindStack", "RuntimeUnwindStack", "NewProcess",
    "WholeSample", "RuntimeFrameNotice", "RuntimeProcess", "UnwindRow", "ROW", "UnwindMapping",
    "UnwindProcess", "RECORD_SIZES",
]

HEADER = "profiler.h"
_D = header_defines(HEADER)

COMM_LEN = _D["PROF_COMM_LEN"]
MAX_STACK_DEPTH = _D["PROF_MAX_DEPTH"]
REC_NEW_PROCESS = _D["PROF_REC_NEW_PROCESS"]
REC_SAMPLE = _D["PROF_REC_SAMPLE"]
REC_RUNTIME_FRAME = _D["PROF_REC_RUNTIME_FRAME"]

# Slots of the program's per-CPU arrays and of settings[], by name
LOST_REASONS = header_enum(HEADER, "PROF_LOST")
STAT_NAMES = header_enum(HEADER, "PROF_STAT")
UNWIND_STAT_NAMES = header_enum(HEADER, "UNWIND_STAT")
_SETTINGS = header_enum(HEADER, "PROF_SET")
SET_GENERATION = _SETTINGS.index("generation")
SET_TABLES_USER = _SETTINGS.index("tables_user")

# Unwind tables: mappings per process, the "table did not fit" mark, row kinds
UNWIND_MAX_MAPPINGS = _D["UNWIND_MAX_MAPPINGS"]
UNWIND_STOP = _D["UNWIND_STOP"]
ROW_END, ROW_RSP, ROW_RBP = _D["UNWIND_END"], _D["UNWIND_RSP"], _D["UNWIND_RBP"]
ROW_UNSUPPORTED, ROW_OUTERMOST = _D["UNWIND_UNSUPPORTED"], _D["UNWIND_OUTERMOST"]

# Runtimes: tail-call slots, per-process data, frames
UNWIND_NATIVE_SLOT = _D["UNWIND_NATIVE_SLOT"]
RUNTIME_SLOTS = _D["RUNTIME_SLOTS"]
RUNTIME_DATA_BYTES = _D["RUNTIME_DATA_BYTES"]
RUNTIME_AUX_LAST = _D["RUNTIME_AUX_LAST"]
RUNTIME_MAX_FRAMES = 64   # passed as -DRUNTIME_MAX_FRAMES when a runtime is on (the header's default is 0: off)


class ProfKey(ctypes.Structure):
    """``struct prof_key``: a counts<g>/walked<g> key."""

    _fields_ = [("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32),
                ("user_stack_id", ctypes.c_int32), ("kernel_stack_id", ctypes.c_int32),
                ("cgroup_id", ctypes.c_uint64), ("comm", ctypes.c_char * COMM_LEN),
                ("user_stack_hash", ctypes.c_uint64), ("link_span", ctypes.c_uint64),
                ("go_labels", ctypes.c_uint64)]


PROF_KEY = struct.Struct(f"<IIiiQ{COMM_LEN}sQQQ")   # ProfKey, decoded in bulk at a drain
assert PROF_KEY.size == ctypes.sizeof(ProfKey) and ProfKey.go_labels.offset == PROF_KEY.size - 8


class UnwindStack(ctypes.Structure):
    """``struct unwind_stack`` with RUNTIME_MAX_FRAMES 0: a user stack walked with unwind tables."""

    _fields_ = [("count", ctypes.c_uint64), ("len", ctypes.c_uint32), ("truncated", ctypes.c_uint32),
                ("ips", ctypes.c_uint64 * MAX_STACK_DEPTH)]


class RuntimeUnwindStack(ctypes.Structure):
    """``struct unwind_stack`` with RUNTIME_MAX_FRAMES frames of a runtime after the native ones."""

    _fields_ = [*UnwindStack._fields_, ("rt_len", ctypes.c_uint32), ("rt_truncated", ctypes.c_uint32),
                ("rt_runtime", ctypes.c_uint32), ("rt_pad", ctypes.c_uint32),
                ("rt_id", ctypes.c_uint64 * RUNTIME_MAX_FRAMES),
                ("rt_aux", ctypes.c_uint32 * RUNTIME_MAX_FRAMES)]


class NewProcess(ctypes.Structure):
    """``struct prof_new_process``: a process's first sample."""

    _fields_ = [("kind", ctypes.c_uint32), ("pid", ctypes.c_uint32)]


class WholeSample(ctypes.Structure):
    """``struct prof_sample``: a sample with its stacks, sent over the ring buffer."""

    _fields_ = [("kind", ctypes.c_uint32), ("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32),
                ("user_bytes", ctypes.c_uint32), ("kernel_bytes", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("cgroup_id", ctypes.c_uint64),
                ("comm", ctypes.c_char * COMM_LEN),
                ("user", ctypes.c_uint64 * MAX_STACK_DEPTH), ("kernel", ctypes.c_uint64 * MAX_STACK_DEPTH)]


class RuntimeFrameNotice(ctypes.Structure):
    """``struct prof_runtime_frame``: a runtime frame id a process's stacks name for the first time."""

    _fields_ = [("kind", ctypes.c_uint32), ("pid", ctypes.c_uint32), ("id", ctypes.c_uint64),
                ("runtime", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class RuntimeProcess(ctypes.Structure):
    """``struct runtime_process``: a process's runtime (its walker's slot) and that runtime's data."""

    _fields_ = [("runtime", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("data", ctypes.c_uint64 * (RUNTIME_DATA_BYTES // 8))]

    @classmethod
    def of(cls, slot: int, data: bytes) -> RuntimeProcess:
        if len(data) > RUNTIME_DATA_BYTES:
            raise ValueError(f"runtime data of {len(data)} bytes exceeds RUNTIME_DATA_BYTES ({RUNTIME_DATA_BYTES})")
        entry = cls(slot)
        ctypes.memmove(ctypes.addressof(entry) + cls.data.offset, data, len(data))
        return entry


class UnwindRow(ctypes.Structure):
    """``struct unwind_row``: from ``pc`` on, how to find the caller."""

    _fields_ = [("pc", ctypes.c_uint64), ("cfa_offset", ctypes.c_int32),
                ("rbp_offset", ctypes.c_int16), ("kind", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


ROW = struct.Struct("<QihBx")   # UnwindRow, packed in bulk when a table is built
assert ROW.size == ctypes.sizeof(UnwindRow)


class UnwindMapping(ctypes.Structure):
    """``struct unwind_mapping``: one executable mapping of a walked process and its table."""

    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("bias", ctypes.c_uint64),
                ("table_start", ctypes.c_uint32), ("table_len", ctypes.c_uint32)]


class UnwindProcess(ctypes.Structure):
    """``struct unwind_process``: the process's mappings are
    ``unwind_mappings[slot * UNWIND_MAX_MAPPINGS ...][:count]``."""

    _fields_ = [("slot", ctypes.c_uint32), ("count", ctypes.c_uint32), ("epoch", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


# Ring-buffer records by kind: the size each must have at least
RECORD_SIZES = {REC_NEW_PROCESS: ctypes.sizeof(NewProcess), REC_SAMPLE: ctypes.sizeof(WholeSample),
                REC_RUNTIME_FRAME: ctypes.sizeof(RuntimeFrameNotice)}
