"""Unwind rows for Go code from ``.gopclntab``'s frame sizes: Go binaries carry no ``.eh_frame``
for Go functions, and a frameless leaf sets up no frame pointer, so without these rows the walk
would skip the leaf's caller.

At each pc the table's ``pcsp`` value is the stack pointer's distance below its value at entry,
so the canonical frame address is ``rsp + pcsp + 8`` and the return address is at CFA-8: the
same ``UNWIND_RSP`` rows the kernel walker follows for ``.eh_frame``. Go saves ``rbp`` only in
its own frame-pointer chain, which these rows do not need, so ``rbp`` is left unchanged.

Functions the stack pointer cannot be followed through are marked as the runtime's own
traceback marks them: ``TOPFRAME`` (``runtime.goexit``, ``runtime.mstart``, ``runtime.rt0_go``)
ends a walk as the outermost frame, ``SPWRITE`` (stack switches: ``systemstack``, ``mcall``,
``morestack``, ``gogo``) stops it. One stack switch is followed: ``runtime.asmcgocall``, which
runs C code on the system stack for cgo and leaves ``rbp`` as its Go caller set it, is stepped
with frame pointers (``CFA = rbp + 16``, saved ``rbp`` at CFA-16), so a stack in C code called
through cgo continues into the Go code that called it (its ABI wrapper's frame is the one so
stepped over). ``runtime.cgocallback`` writes SP too, but arranges its frame on the goroutine's
stack as its pcsp says (Go's own traceback relies on it), so Go called back from C continues into
the Go code that called C.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from ..symbols.elf import fd_reader, named_sections
from ..symbols.gopclntab import FLAG_SPWRITE, FLAG_TOPFRAME, GoTable, GoTableError, parse_go_table
from .cfi_table import END, OUTERMOST, RBP, ROW, RSP, UNSUPPORTED, UnwindTable

__all__ = ["go_table_of_fd", "go_unwind_table", "merge_tables"]

_CGO_SWITCH = "runtime.asmcgocall"
# Functions that write SP and yet keep a frame their pcsp describes, as Go's traceback treats them:
# cgocallback arranges a frame of the same size on the goroutine's stack before switching to it.
_SP_FOLLOWED = frozenset({"runtime.cgocallback"})
_MAX_FRAME = (1 << 31) - 8     # CFA offsets are 32-bit


def go_unwind_table(table: GoTable) -> UnwindTable:
    """Rows for every Go function of ``table``, sorted by pc, with an END row after the last;
    GoTableError when the table is malformed."""
    try:
        return _go_rows(table)
    except (struct.error, IndexError, ValueError, OverflowError) as e:
        raise GoTableError(f"malformed .gopclntab: {e}") from None


def _go_rows(table: GoTable) -> UnwindTable:
    out = bytearray()
    unsupported = 0
    last = None
    for entry, _end, name, flag, steps in table.functions():
        if flag & FLAG_TOPFRAME:
            rows: Iterable[tuple[int, int, int, int]] = [(entry, 0, 0, OUTERMOST)]
        elif name == _CGO_SWITCH and flag & FLAG_SPWRITE:
            rows = [(entry, 16, -16, RBP)]
        elif flag & FLAG_SPWRITE and name not in _SP_FOLLOWED or not steps:
            rows = [(entry, 0, 0, UNSUPPORTED)]
            unsupported += 1
        else:
            rows = [(pc, delta + 8, 0, RSP) if 0 <= delta < _MAX_FRAME else (pc, 0, 0, UNSUPPORTED)
                    for pc, delta in steps]
        for pc, cfa, rbp, kind in rows:
            if last is not None and last[0] == pc:      # an empty run: the later row wins
                del out[-ROW.size:]
                last = None
            if last is not None and last[1:] == (cfa, rbp, kind):
                continue
            out += ROW.pack(pc, cfa, rbp, kind)
            last = (pc, cfa, rbp, kind)
    if last is not None:
        out += ROW.pack(table.end, 0, 0, END)
    return UnwindTable(bytes(out), unsupported)


def merge_tables(cfi: UnwindTable, go: UnwindTable) -> UnwindTable:
    """One table from ``.eh_frame`` rows (a cgo binary's C code) and Go rows: each covers its own
    code; where both start a row at one pc, the one that is not an END row wins."""
    rows: dict[int, tuple[int, int, int, int]] = {}
    for t in (cfi, go):
        for i in range(len(t)):
            row = ROW.unpack_from(t.rows, i * ROW.size)
            old = rows.get(row[0])
            if old is None or old[3] == END:
                rows[row[0]] = row
    out = bytearray()
    last = None
    for pc in sorted(rows):
        row = rows[pc]
        if last is not None and last[1:] == row[1:]:
            continue
        out += ROW.pack(*row)
        last = row
    return UnwindTable(bytes(out), cfi.unsupported + go.unsupported)


def go_table_of_fd(fd: int) -> UnwindTable | None:
    """The Go rows of the ELF file open at ``fd``; None when it has no ``.gopclntab``. Raises
    GoTableError for a table that cannot be read, ElfError for a file that is not ELF."""
    read = fd_reader(fd)
    sections, is_dyn = named_sections(read)
    table = parse_go_table(read, sections, is_dyn)
    return go_unwind_table(table) if table is not None else None
