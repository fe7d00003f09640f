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
the reference interpreter every distribution ships (about 80 ms for libpython's 84,000 rows),
reading the very file a process mapped through an inherited descriptor. Parsing its output here
is a line split per row.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from dataclasses import dataclass

__all__ = ["ROW", "UnwindTable", "UnwindTableError", "build_table", "parse_frames_interp", "table_of_path",
           "END", "RSP", "RBP", "UNSUPPORTED", "OUTERMOST"]

# Row kinds (struct unwind_row.kind in bpf/profiler.h)
END, RSP, RBP, UNSUPPORTED, OUTERMOST = 0, 1, 2, 3, 4

# struct unwind_row { u64 pc; s32 cfa_offset; s16 rbp_offset; u8 kind; u8 pad; }
ROW = struct.Struct("<QihBx")
READELF_TIMEOUT_S = 60
_S16 = range(-(1 << 15), 1 << 15)
_S32 = range(-(1 << 31), 1 << 31)
_CFA = re.compile(r"^(rsp|rbp)([+-]\d+)$")
_SAVED = re.compile(r"^c([+-]\d+)$")


class UnwindTableError(Exception):
    """The file's call-frame information could not be read."""


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


def parse_frames_interp(text: str) -> UnwindTable:
    """Rows from ``readelf --debug-dump=frames-interp`` output; ``.eh_frame`` wins where both
    sections describe the same code (it is what the loader and C++ unwinding use)."""
    sections: list[dict[int, tuple[int, int, int]]] = []
    rows: dict[int, tuple[int, int, int]] = {}
    ends: list[int] = []
    cie_initial: dict[str, tuple[int, int, int]] = {}
    columns: list[str] = []
    fde_start = fde_end = -1
    fde_rows = 0
    current_cie = ""
    cie_offset = ""
    in_cie = False

    def close_fde() -> None:
        nonlocal fde_start, fde_rows
        if fde_start < 0:
            return
        if fde_rows == 0:               # no instructions: the CIE's initial rules hold throughout
            rows.setdefault(fde_start, cie_initial.get(current_cie, (UNSUPPORTED, 0, 0)))
        ends.append(fde_end)
        fde_start = -1

    for line in text.splitlines():
        if line.startswith("Contents of the"):
            close_fde()
            if rows:
                sections.append(rows)
            rows, cie_initial = {}, {}
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
            continue
        if len(fields) != len(columns) + 1 or (not in_cie and fde_start < 0):
            continue
        try:
            loc = int(fields[0], 16)
        except ValueError:
            continue
        values = dict(zip(columns, fields[1:]))
        row = _row(values.get("CFA", ""), values.get("rbp", "u"), values.get("ra", "u"))
        if in_cie:
            cie_initial[cie_offset] = row
        elif fde_start <= loc < fde_end:
            rows[loc] = row
            fde_rows += 1
    close_fde()
    if rows:
        sections.append(rows)
    if not sections:
        return UnwindTable(b"", 0)
    merged = sections[0]
    for extra in sections[1:]:          # .debug_frame only where .eh_frame says nothing
        for pc, row in extra.items():
            merged.setdefault(pc, row)
    for end in ends:
        merged.setdefault(end, (END, 0, 0))
    packed = bytearray()
    previous = None
    unsupported = 0
    for pc in sorted(merged):
        row = merged[pc]
        if row == previous:             # same rule continues: one row covers both
            continue
        previous = row
        unsupported += row[0] == UNSUPPORTED
        packed += ROW.pack(pc, row[1], row[2], row[0])
    return UnwindTable(bytes(packed), unsupported)


def build_table(fd: int) -> UnwindTable:
    """The unwind table of the ELF file open at ``fd`` (read through ``/dev/fd``, so the file a
    process mapped is read, whatever its mount namespace or deletion)."""
    try:
        p = subprocess.run(["readelf", "--wide", "--debug-dump=frames-interp", f"/dev/fd/{fd}"],
                           pass_fds=(fd,), capture_output=True, timeout=READELF_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UnwindTableError(f"readelf: {e}") from None
    if p.returncode != 0 and not p.stdout:
        raise UnwindTableError(f"readelf: {p.stderr.decode('utf-8', 'replace').strip()[:200]}")
    table = parse_frames_interp(p.stdout.decode("ascii", "replace"))
    if not table.rows:
        raise UnwindTableError("no call-frame information (.eh_frame/.debug_frame)")
    return table


def table_of_path(path: str) -> UnwindTable:
    """``build_table`` for a path (tools and tests)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return build_table(fd)
    finally:
        os.close(fd)
