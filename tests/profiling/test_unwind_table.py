"""Unwind tables from readelf's interpreted call-frame information, and the row allocator."""

from __future__ import annotations

from pathlib import Path

import pytest

from receiver.profiling.unwind.cfi_table import (
    END,
    OUTERMOST,
    RBP,
    RSP,
    UNSUPPORTED,
    parse_frames_interp,
    table_of_path,
)
from receiver.profiling.unwind.table_store import RowAllocator

# readelf --debug-dump=frames-interp, trimmed: a CIE, an FDE without instructions (the CIE's
# rules hold), a PLT-style expression, a function that saves rbp and uses it as CFA, _start,
# a gap between functions, and the same function again in .debug_frame.
TEXT = """\
Contents of the .eh_frame section:


00000000 0000000000000014 00000000 CIE "zR" cf=1 df=-8 ra=16
   LOC           CFA      ra
0000000000000000 rsp+8    c-8

00000018 0000000000000024 0000001c FDE cie=00000000 pc=0000000000001000..0000000000001010
   LOC           CFA      ra
0000000000001000 rsp+16   c-8
0000000000001006 rsp+24   c-8
0000000000001008 exp      c-8

00000040 0000000000000014 00000044 FDE cie=00000000 pc=0000000000001010..0000000000001020

00000058 000000000000001c 0000005c FDE cie=00000000 pc=0000000000001100..0000000000001140
   LOC           CFA      rbp   ra
0000000000001100 rsp+8    u     c-8
0000000000001101 rsp+16   c-16  c-8
0000000000001104 rbp+16   c-16  c-8
000000000000113f rsp+8    c-16  c-8

00000078 0000000000000010 0000007c FDE cie=00000000 pc=0000000000001200..0000000000001226
   LOC           CFA      ra
0000000000001200 rsp+8    u

Contents of the .debug_frame section:

00000000 0000000000000014 ffffffff CIE "" cf=1 df=-8 ra=16
   LOC           CFA      ra
0000000000000000 rsp+8    c-8

00000018 0000000000000024 00000000 FDE cie=00000000 pc=0000000000001100..0000000000001140
   LOC           CFA      ra
0000000000001100 rsp+64   c-8

00000040 0000000000000024 00000000 FDE cie=00000000 pc=0000000000002000..0000000000002010
   LOC           CFA      ra
0000000000002000 rsp+8    c-8
0000000000002004 rsp+32   c-8
"""


def test_rows_follow_the_interpreted_rules() -> None:
    t = parse_frames_interp(TEXT)
    assert t.lookup(0x1000)[1:] == (16, 0, RSP)
    assert t.lookup(0x1007)[1:] == (24, 0, RSP)
    assert t.lookup(0x1009)[3] == UNSUPPORTED           # a DWARF expression: the walk stops
    assert t.lookup(0x1015)[1:] == (8, 0, RSP)          # no instructions: the CIE's rule
    assert t.lookup(0x1050)[3] == END                   # between functions
    assert t.lookup(0x1100)[1:] == (8, 0, RSP)
    assert t.lookup(0x1102)[1:] == (16, -16, RSP)       # rbp saved at CFA-16
    assert t.lookup(0x1120)[1:] == (16, -16, RBP)       # CFA from rbp
    assert t.lookup(0x113f)[1:] == (8, -16, RSP)
    assert t.lookup(0x1210)[3] == OUTERMOST             # return address undefined: _start
    assert t.lookup(0x1230)[3] == END
    assert t.lookup(0x0fff) is None
    assert t.unsupported == 1
    # .eh_frame wins where both describe the code; .debug_frame adds only what it alone has.
    assert t.lookup(0x1100)[1:] == (8, 0, RSP)
    assert t.lookup(0x2000)[1:] == (8, 0, RSP) and t.lookup(0x2005)[1:] == (32, 0, RSP)
    assert t.lookup(0x2010)[3] == END


def test_real_libc_table() -> None:
    from receiver.profiling.unwind.cfi_table import ROW

    t = table_of_path("/usr/lib/x86_64-linux-gnu/libc.so.6")
    rows = [ROW.unpack_from(t.rows, i * ROW.size) for i in range(len(t))]
    assert len(rows) > 10_000
    assert all(a[0] < b[0] for a, b in zip(rows, rows[1:]))            # sorted, one row per pc
    kinds = [r[3] for r in rows]
    assert kinds.count(RSP) > 0.8 * len(rows) and OUTERMOST in kinds   # clone3/_start end threads
    assert kinds.count(UNSUPPORTED) < 10


def test_allocator_first_fit_and_merging() -> None:
    a = RowAllocator(100)
    x, y, z = a.allocate(30), a.allocate(30), a.allocate(30)
    assert (x, y, z) == (0, 30, 60) and a.allocate(20) is None
    a.release(30, 30)
    assert a.allocate(40) is None
    a.release(0, 30)
    assert a.allocate(60) == 0          # the two freed neighbours merged
    a.release(0, 60)
    a.release(60, 30)
    assert a.free_rows == 100 and a.allocate(100) == 0


class _FakeMap(dict):
    """Enough of a BCC table for UnwindTables' row writes."""

    def items_update_batch(self, keys, values) -> None:   # noqa: ANN001
        for k, v in zip(keys, values):
            self[int(k)] = v


def _tables(capacity: int):   # noqa: ANN202
    from receiver.profiling.symbols.symbolizer import Symbolizer
    from receiver.profiling.unwind.table_store import UnwindTables

    maps = {"unwind_rows": _FakeMap(), "unwind_processes": _FakeMap(), "unwind_mappings": _FakeMap(),
            "settings": _FakeMap()}
    return UnwindTables(maps, Symbolizer(), capacity, 16)


def _rows(n: int) -> bytes:
    from receiver.profiling.unwind.cfi_table import ROW

    return b"".join(ROW.pack(0x1000 + i, 8, 0, RSP) for i in range(n))


def test_tables_in_use_are_never_evicted_and_unused_ones_make_room() -> None:
    t = _tables(400)
    for name in "abcd":                   # each pinned by the load that built it
        assert t._store(name, _rows(100)) is not None
    assert t._store("e", _rows(50)) is None and t.stats["tables_evicted"] == 0   # all in use
    t._unpin(["b"])                       # b's process is gone: b stays loaded until room is needed
    t._unpin(["a"])
    t._loaded.move_to_end("a")            # a was used more recently than b
    e = t._store("e", _rows(50))
    assert e is not None and e.start == 100 and "b" not in t._loaded and "a" in t._loaded
    assert t.stats["tables_evicted"] == 1


def test_a_table_over_a_quarter_of_the_array_is_refused() -> None:
    t = _tables(100)
    assert t._store("big", _rows(26)) is None and t.stats["tables_too_large"] == 1
    assert t._store("ok", _rows(25)) is not None


# ------------------------------------------------------------------ Go: rows from .gopclntab

def _go_chain(tmp_path_factory: pytest.TempPathFactory, *flags: str) -> Path:
    from .test_go_e2e import CHAIN_SOURCE, go_build

    return go_build("host", tmp_path_factory.mktemp("go") / "chain", CHAIN_SOURCE, "-ldflags=-s -w", *flags)


@pytest.fixture(scope="module")
def go_chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _go_chain(tmp_path_factory)


@pytest.mark.host   # the Go toolchain
def test_go_rows_follow_pcsp_and_mark_the_runtimes_stack_switches(go_chain: Path) -> None:
    import os

    from receiver.profiling.symbols.elf import fd_reader, named_sections
    from receiver.profiling.symbols.gopclntab import FLAG_SPWRITE, parse_go_table
    from receiver.profiling.unwind.go_table import go_table_of_fd

    fd = os.open(go_chain, os.O_RDONLY)
    try:
        rows = go_table_of_fd(fd)
        read = fd_reader(fd)
        go = parse_go_table(read, *named_sections(read))
    finally:
        os.close(fd)
    assert rows is not None and go is not None
    funcs = {name: (entry, end, flag, steps) for entry, end, name, flag, steps in go.functions()}
    # A frameless leaf: CFA = rsp + 8 over its whole body, so its caller is found.
    entry, end, _, _ = funcs["main.goHotA"]
    assert {rows.lookup(pc)[1:] for pc in range(entry, end)} == {(8, 0, RSP)}
    # A function with a frame: CFA = rsp + pcsp + 8 at every pc, exactly as its pcsp says.
    for name in ("main.stage2", "main.runLoop"):
        entry, end, _, steps = funcs[name]
        assert max(d for _, d in steps) > 0
        for i, (pc, delta) in enumerate(steps):
            upto = steps[i + 1][0] if i + 1 < len(steps) else end
            assert {rows.lookup(p)[1:] for p in range(pc, upto)} == {(delta + 8, 0, RSP)}, (name, hex(pc))
    # The assembly functions (not their ABI wrappers, which share their names)
    asm = {name: entry for entry, _, name, flag, _ in go.functions() if flag & FLAG_SPWRITE}
    assert rows.lookup(funcs["runtime.goexit"][0])[3] == OUTERMOST          # TOPFRAME: the walk is whole
    assert rows.lookup(asm["runtime.systemstack"])[3] == UNSUPPORTED        # SPWRITE: the walk stops
    assert rows.lookup(asm["runtime.mcall"])[3] == UNSUPPORTED
    # cgo's switch to the system stack is stepped with frame pointers (test_go_e2e's cgo test
    # walks through it and through runtime.cgocallback)
    assert rows.lookup(asm["runtime.asmcgocall"])[1:] == (16, -16, RBP)
    assert rows.lookup(go.end)[3] == END


def test_go_and_cfi_rows_merge_each_covering_its_own_code() -> None:
    from receiver.profiling.unwind.cfi_table import ROW, UnwindTable
    from receiver.profiling.unwind.go_table import merge_tables

    def table(*rows: tuple[int, int, int, int]) -> UnwindTable:
        return UnwindTable(b"".join(ROW.pack(*r) for r in rows))

    c = table((0x1000, 8, 0, RSP), (0x1010, 16, -16, RBP), (0x1020, 0, 0, END))
    go = table((0x1020, 8, 0, RSP), (0x1024, 24, 0, RSP), (0x1030, 0, 0, END))
    merged = merge_tables(c, go)
    assert merged.lookup(0x1012)[1:] == (16, -16, RBP)
    assert merged.lookup(0x1020)[1:] == (8, 0, RSP)        # the Go row, not the C table's END
    assert merged.lookup(0x1025)[1:] == (24, 0, RSP)
    assert merged.lookup(0x1030)[3] == END


@pytest.mark.host   # the Go toolchain
def test_a_go_table_too_large_is_refused_once_and_remembered(go_chain: Path) -> None:
    import subprocess

    proc = subprocess.Popen([str(go_chain), "60"])
    try:
        for _ in range(3000):       # until exec has mapped the program's code
            maps = Path(f"/proc/{proc.pid}/maps").read_text().splitlines()
            code = [ln for ln in maps if ln.rstrip().endswith(str(go_chain)) and "x" in ln.split()[1]]
            if code:
                break
        start, end = (int(x, 16) for x in code[0].split()[0].split("-"))
        t = _tables(4000)           # a quarter: 1000 rows; the Go program has about 10 000
        for _ in range(2):
            assert t._table_for(proc.pid, start, end, str(go_chain), "") == "full"
        assert t.stats["tables_too_large"] == 1 and t.stats["go_tables_built"] == 1   # built once
        assert t._allocator.free_rows == 4000
        big = _tables(1 << 20)
        loaded = big._table_for(proc.pid, start, end, str(go_chain), "")
        assert isinstance(loaded, tuple) and loaded[1].rows > 1000 and big.stats["tables_built"] == 1
    finally:
        proc.kill()
        proc.wait()
