"""Compact x86-64 unwind tables from an ELF file's call-frame information (``.eh_frame``, else
``.debug_frame``), for the profiler's in-kernel stack walker.

Each row says, from its ``pc`` (an ELF virtual address) up to the next row's, how to find the
caller: the canonical frame address (CFA) is ``rsp`` or ``rbp`` plus an offset, the return
address is at CFA-8 (x86-64's ABI), and ``rbp`` is either unchanged or saved at CFA plus an
offset. Rows whose rule the walker cannot follow (DWARF expressions, a CFA in another register)
are kept as ``UNSUPPORTED``, so a walk that reaches them stops and is counted as truncated
rather than guessing; ``END`` rows cover gaps between functions, ``OUTERMOST`` marks frames whose
return address is undefined (``_start``, a thread's start): a walk that reaches one is complete.

The call-frame programs are interpreted by binutils' ``readelf --debug-dump=frames-interp``,
the reference interpreter every distribution ships, reading the very file a process mapped
through an inherited descriptor; its output is parsed here as it streams (0.35 s and 8 MB of
peak memory for libpython 3.11's 74,000 rows).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from ..abi import ROW, ROW_END, ROW_OUTERMOST, ROW_RBP, ROW_RSP, ROW_UNSUPPORTED

__all__ = ["ROW", "ReadelfMissingError", "UnwindTable", "UnwindTableError", "build_table",
           "parse_frames_interp", "table_of_path", "END", "RSP", "RBP", "UNSUPPORTED", "OUTERMOST"]

# Row kinds (struct unwind_row.kind: UNWIND_* in bpf/profiler.h)
END, RSP, RBP, UNSUPPORTED, OUTERMOST = ROW_END, ROW_RSP, ROW_RBP, ROW_UNSUPPORTED, ROW_OUTERMOST

READELF_TIMEOUT_S = 60
_S16 = range(-(1 << 15), 1 << 15)
_S32 = range(-(1 << 31), 1 << 31)
_CFA = re.compile(r"^(rsp|rbp)([+-]\d+)$")
_SAVED = re.compile(r"^c([+-]\d+)$")


class UnwindTableError(Exception):
    """The file's call-frame information could not be read."""


class ReadelfMissingError(UnwindTableError):
    """No readelf on this host: no file gets a table (walks use frame pointers)."""


@dataclass(frozen=True, slots=True)
class UnwindTable:
    """Rows sorted by pc, packed as ``ROW`` structs; ``unsupported`` counts rows the walker
    cannot follow (kept as stops)."""

    rows: bytes
    unsupported: int = 0

    def __len__(self) -> int:
        return len(self.rows) // ROW.size

    def lookup(self, pc: int) -> tuple[int, int, int, int] | None:
        """(pc, cfa_offset, rbp_offset, kind) of the row covering ``pc`` (for tests and tools;
        the kernel does the same binary search)."""
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if ROW.unpack_from(self.rows, mid * ROW.size)[0] <= pc:
                lo = mid + 1
            else:
                hi = mid
        return ROW.unpack_from(self.rows, (lo - 1) * ROW.size) if lo else None


def _row(cfa: str, rbp: str, ra: str) -> tuple[int, int, int]:
    """(kind, cfa_offset, rbp_offset) for one interpreted row."""
    if ra == "u":                       # DW_CFA_undefined rip: the outermost frame
        return OUTERMOST, 0, 0
    m = _CFA.match(cfa)
    if m is None or ra != "c-8":
        return UNSUPPORTED, 0, 0
    offset = int(m.group(2))
    if offset not in _S32:
        return UNSUPPORTED, 0, 0
    kind = RSP if m.group(1) == "rsp" else RBP
    if rbp in ("u", "s"):               # not saved (yet): unchanged
        return kind, offset, 0
    saved = _SAVED.match(rbp)
    if saved is None or int(saved.group(1)) not in _S16 or int(saved.group(1)) == 0:
        return UNSUPPORTED, 0, 0
    return kind, offset, int(saved.group(1))


class _Rows:
    """Rows as they are parsed, kept compact (two arrays, not a dict of tuples: libpython's
    74,000 rows cost about 1 MB here instead of 15): the sort key is ``pc * 4 + priority``
    (an ``.eh_frame`` row 0 beats a ``.debug_frame`` row 1 beats a function's end 2 at the same
    pc), the code packs kind and offsets."""

    def __init__(self) -> None:
        self.keys = array("Q")
        self.codes = array("Q")

    def add(self, pc: int, priority: int, row: tuple[int, int, int]) -> None:
        kind, cfa_offset, rbp_offset = row
        self.keys.append(pc * 4 + priority)
        self.codes.append(((cfa_offset & 0xFFFFFFFF) << 24) | ((rbp_offset & 0xFFFF) << 8) | kind)

    def packed(self) -> UnwindTable:
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        out = bytearray()
        last_pc, last_code, unsupported = -1, -1, 0
        for i in order:
            pc, code = self.keys[i] >> 2, self.codes[i]
            if pc == last_pc or code == last_code:   # a better row has this pc / the rule goes on
                last_pc = pc
                continue
            last_pc, last_code = pc, code
            kind = code & 0xFF
            rbp = (code >> 8) & 0xFFFF
            cfa = (code >> 24) & 0xFFFFFFFF
            unsupported += kind == UNSUPPORTED
            out += ROW.pack(pc, cfa - (1 << 32) if cfa >> 31 else cfa, rbp - (1 << 16) if rbp >> 15 else rbp, kind)
        return UnwindTable(bytes(out), unsupported)


def parse_frames_interp(lines: str | Iterable[str]) -> UnwindTable:
    """Rows from ``readelf --debug-dump=frames-interp`` output (its text, or its lines as they
    come); ``.eh_frame`` wins where both sections describe the same code (it is what the loader
    and C++ unwinding use)."""
    rows = _Rows()
    rules: dict[tuple[str, str, str], tuple[int, int, int]] = {}
    cie_initial: dict[str, tuple[int, int, int]] = {}
    columns: list[str] = []
    at = [0, 0, 0]
    priority = -1
    fde_start = fde_end = -1
    fde_rows = 0
    current_cie = ""
    cie_offset = ""
    in_cie = False

    def close_fde() -> None:
        nonlocal fde_start
        if fde_start < 0:
            return
        if fde_rows == 0:               # no instructions: the CIE's initial rules hold throughout
            rows.add(fde_start, priority, cie_initial.get(current_cie, (UNSUPPORTED, 0, 0)))
        rows.add(fde_end, 2, (END, 0, 0))
        fde_start = -1

    for line in (lines.splitlines() if isinstance(lines, str) else lines):
        if line.startswith("Contents of the"):
            close_fde()
            priority = 0 if ".eh_frame" in line else 1
            cie_initial = {}
            continue
        fields = line.split()
        if not fields:
            continue
        if len(fields) >= 4 and fields[3] == "CIE":
            close_fde()
            in_cie, cie_offset = True, fields[0]
            continue
        if len(fields) >= 4 and fields[3] == "FDE":
            close_fde()
            in_cie = False
            cie = next((f[4:] for f in fields if f.startswith("cie=")), "")
            pcs = next((f[3:] for f in fields if f.startswith("pc=")), "")
            try:
                begin, end = (int(x, 16) for x in pcs.split(".."))
            except ValueError:
                continue
            current_cie, fde_start, fde_end, fde_rows = cie, begin, end, 0
            continue
        if fields[0] == "LOC":
            columns = fields[1:]
            at = [columns.index(c) + 1 if c in columns else 0 for c in ("CFA", "rbp", "ra")]
            continue
        if len(fields) != len(columns) + 1 or (not in_cie and fde_start < 0) or priority < 0:
            continue
        try:
            loc = int(fields[0], 16)
        except ValueError:
            continue
        rule = (fields[at[0]] if at[0] else "", fields[at[1]] if at[1] else "u", fields[at[2]] if at[2] else "u")
        row = rules.get(rule)
        if row is None:                 # a few hundred distinct rules in a large library
            row = rules[rule] = _row(*rule)
        if in_cie:
            cie_initial[cie_offset] = row
        elif fde_start <= loc < fde_end:
            rows.add(loc, priority, row)
            fde_rows += 1
    close_fde()
    return rows.packed()


def build_table(fd: int) -> UnwindTable:
    """The unwind table of the ELF file open at ``fd`` (read through ``/proc/self/fd``, so the file a
    process mapped is read, whatever its mount namespace or deletion). readelf's output is
    parsed as it streams (several MB for a large library), never held whole."""
    try:
        proc = subprocess.Popen(["readelf", "--wide", "--debug-dump=frames-interp", f"/proc/self/fd/{fd}"],
                                pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ReadelfMissingError("readelf is not installed (Debian's binutils)") from None
    except OSError as e:
        raise UnwindTableError(f"readelf: {e}") from None
    timer = threading.Timer(READELF_TIMEOUT_S, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        table = parse_frames_interp(line.decode("ascii", "replace") for line in proc.stdout)
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if proc.returncode < 0:
        raise UnwindTableError(f"readelf: killed after {READELF_TIMEOUT_S} s")
    if not table.rows:
        raise UnwindTableError("no call-frame information (.eh_frame/.debug_frame), or not an ELF file")
    return table


def table_of_path(path: str) -> UnwindTable:
    """``build_table`` for a path (tools and tests)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return build_table(fd)
    finally:
        os.close(fd)
