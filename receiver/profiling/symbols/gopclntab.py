"""Go's own function table, ``.gopclntab``: names, files, lines, inlined calls and frame sizes of
every Go function, present in stripped binaries (``go build -ldflags="-s -w"``), since the
runtime needs it for its own tracebacks.

Read for Go 1.20 and later (header magic ``0xfffffff1``; the layout is unchanged through 1.26),
x86-64, little-endian. What is read:

- the function table (entry pc → ``_func``), so an address finds its function by one bisect;
- per function, the pc-value tables: ``pcsp`` (the stack pointer's distance from the entry's at
  each pc: the frame size, which the in-kernel walker needs where Go has no ``.eh_frame``),
  ``pcfile`` and ``pcln`` (file and line at each pc) and ``PCDATA_InlTreeIndex`` (which inlined
  call, if any, each pc belongs to);
- the inline tree (``FUNCDATA_InlTree``: 16-byte ``inlinedCall`` records), whose address is an
  offset from ``moduledata.gofunc``. ``moduledata`` is found as the one pointer to the table's
  header in the file's data (a non-PIE binary) or as the target of a relative relocation (PIE);
- the Go build id from the ``.note.go.buildid`` note.

Anything malformed raises ``GoTableError``; an address outside the table gives no frames.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["GoTable", "GoTableError", "GoFrame", "MAGIC_1_20", "MAX_PCLNTAB_BYTES", "parse_go_table",
           "FLAG_TOPFRAME", "FLAG_SPWRITE"]

Read = Callable[[int, int], bytes]

MAGIC_1_20 = 0xFFFFFFF1        # Go 1.20 and later (1.18-1.19: 0xfffffff0, not read)
MAX_PCLNTAB_BYTES = 256 << 20   # a hostile or absurd file cannot make the agent hold more
MAX_INLINE_DEPTH = 32           # inlined calls expanded per pc (Go's own limit is far lower in practice)
FLAG_TOPFRAME, FLAG_SPWRITE = 1, 2   # abi.FuncFlag
PCDATA_INLTREEINDEX = 2
FUNCDATA_INLTREE = 3
_MODULEDATA_TEXT = 176          # offsetof(moduledata, text), Go 1.20 .. 1.26 on 64-bit
_MODULEDATA_GOFUNC = 320        # offsetof(moduledata, gofunc), likewise
_R_X86_64_RELATIVE = 8
_HEADER = struct.Struct("<IBBBBqqQQQQQQ")
_FUNC = struct.Struct("<IiiIIIIIIiBBxB")    # _func up to nfuncdata (Go 1.20+): 44 bytes
_INLINED_CALL = struct.Struct("<B3xiii")     # funcID, nameOff, parentPc, startLine
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MALFORMED = (struct.error, IndexError, ValueError, OverflowError)


class GoTableError(Exception):
    """The file's .gopclntab could not be read."""


@dataclass(frozen=True, slots=True)
class GoFrame:
    """One Go frame at a pc: a function, or a function inlined there."""

    function: str
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class _Section:
    addr: int
    offset: int
    size: int


class GoTable:
    """One binary's .gopclntab, held as bytes (a few MB for most programs; the Collector's
    is about 30 MB) with the function entries in an array."""

    def __init__(self, data: bytes, vaddr: int, text_start: int, gofunc: bytes | memoryview | None,
                 gofunc_addr: int, build_id: str) -> None:
        self.build_id = build_id         # the Go build id ("" when the note is missing)
        self._d = data
        self.vaddr = vaddr
        magic, pad1, pad2, min_lc, ptr_size, nfunc, nfiles, _, name_off, cu_off, file_off, pc_off, \
            ftab_off = _HEADER.unpack_from(data, 0)
        if magic != MAGIC_1_20:
            raise GoTableError(f"pclntab magic {magic:#x}: Go 1.20 or later is needed")
        if pad1 or pad2 or min_lc != 1 or ptr_size != 8 or not 0 < nfunc < 1 << 24:
            raise GoTableError("not an x86-64 Go 1.20+ pclntab")
        self.text_start = text_start
        self._names, self._cutab, self._filetab, self._pctab, self._ftab = \
            name_off, cu_off, file_off, pc_off, ftab_off
        raw = array("I")
        raw.frombytes(data[ftab_off:ftab_off + (nfunc + 1) * 8])
        if len(raw) != (nfunc + 1) * 2:
            raise GoTableError("the function table ends early")
        self._entries = array("Q", (text_start + e for e in raw[0::2]))   # nfunc + 1: the last is the end
        self._funcoffs = raw[1::2]
        self._gofunc = gofunc
        self._gofunc_addr = gofunc_addr

    def __len__(self) -> int:
        return len(self._funcoffs) - 1

    @property
    def start(self) -> int:
        return self._entries[0]

    @property
    def end(self) -> int:
        return self._entries[-1]

    def _func(self, i: int) -> tuple[int, ...]:
        return _FUNC.unpack_from(self._d, self._ftab + self._funcoffs[i])

    def _index(self, pc: int) -> int:
        i = bisect_right(self._entries, pc) - 1
        return i if 0 <= i < len(self) else -1

    def _string(self, at: int) -> str:
        end = self._d.find(b"\0", at)
        return self._d[at:end if end >= 0 else None].decode("utf-8", "replace")

    def function_name(self, i: int) -> str:
        return self._string(self._names + self._func(i)[1])

    def _pcvalue(self, off: int, entry: int, target: int) -> int:
        """The value of the pc-value table at ``off`` for ``target`` (-1 where it has none)."""
        if off == 0:
            return -1
        for pc_end, value in _pcsteps(self._d, self._pctab + off, entry):
            if target < pc_end:
                return value
        return -1

    # ---------------------------------------------------------------- names and lines

    def frames(self, pc: int) -> list[GoFrame]:
        """The frames at ``pc`` (an ELF virtual address), innermost first: the functions
        inlined there, then the function itself; [] outside every Go function."""
        i = self._index(pc)
        if i < 0:
            return []
        try:
            return self._frames(i, pc)
        except _MALFORMED:
            return []

    def _frames(self, i: int, pc: int) -> list[GoFrame]:
        f = self._func(i)
        entry = self._entries[i]
        _, name_off, _, _, _, pcfile, pcln, npcdata, cu_offset, _, _, _, nfuncdata = f
        base = self._ftab + self._funcoffs[i] + _FUNC.size
        inl_index_off = _U32.unpack_from(self._d, base + 4 * PCDATA_INLTREEINDEX)[0] \
            if npcdata > PCDATA_INLTREEINDEX else 0
        tree = -1
        if inl_index_off and nfuncdata > FUNCDATA_INLTREE and self._gofunc is not None:
            tree = _U32.unpack_from(self._d, base + 4 * npcdata + 4 * FUNCDATA_INLTREE)[0]
            if tree == 0xFFFFFFFF:
                tree = -1
        out: list[GoFrame] = []
        at = pc
        for _ in range(MAX_INLINE_DEPTH):
            file, line = self._file_line(pcfile, pcln, cu_offset, entry, at)
            ix = self._pcvalue(inl_index_off, entry, at) if tree >= 0 else -1
            if ix < 0:
                out.append(GoFrame(self._string(self._names + name_off), file, line))
                return out
            assert self._gofunc is not None
            _, callee_name, parent_pc, _ = _INLINED_CALL.unpack_from(self._gofunc, tree + ix * _INLINED_CALL.size)
            out.append(GoFrame(self._string(self._names + callee_name), file, line))
            at = entry + parent_pc
        return out

    def _file_line(self, pcfile: int, pcln: int, cu_offset: int, entry: int, pc: int) -> tuple[str, int]:
        fileno = self._pcvalue(pcfile, entry, pc)
        line = self._pcvalue(pcln, entry, pc)
        file = ""
        if fileno >= 0:
            off = _U32.unpack_from(self._d, self._cutab + 4 * (cu_offset + fileno))[0]
            if off != 0xFFFFFFFF:
                file = self._string(self._filetab + off)
        return file, max(line, 0)

    # ---------------------------------------------------------------- frame sizes

    def functions(self) -> Iterator[tuple[int, int, str, int, list[tuple[int, int]]]]:
        """(entry, end, name, flag, [(pc, sp delta), ...]) per function, for unwind tables: the
        sp delta holds from its pc up to the next one's (or the function's end). The pc-value
        decoding is spelled out here (the Collector's 44 000 functions have 340 000 runs)."""
        d, pctab, names, ftab, funcoffs, entries = \
            self._d, self._pctab, self._names, self._ftab, self._funcoffs, self._entries
        unpack = _FUNC.unpack_from
        for i in range(len(self)):
            f = unpack(d, ftab + funcoffs[i])
            entry, end = entries[i], entries[i + 1]
            steps: list[tuple[int, int]] = []
            if f[4]:
                p, value, start, first = pctab + f[4], -1, entry, True
                while start < end:
                    uv = d[p]
                    p += 1
                    if uv >= 0x80:
                        uv, p = _varint(d, p - 1)
                    if uv == 0 and not first:
                        break
                    first = False
                    value += -(uv >> 1) - 1 if uv & 1 else uv >> 1
                    delta = d[p]
                    p += 1
                    if delta >= 0x80:
                        delta, p = _varint(d, p - 1)
                    steps.append((start, value))
                    start += delta
            name_at = names + f[1]
            yield entry, end, d[name_at:d.find(b"\0", name_at)].decode("utf-8", "replace"), f[11], steps


def _pcsteps(d: bytes, p: int, entry: int) -> Iterator[tuple[int, int]]:
    """(end pc, value) runs of the pc-value table at ``p``: zig-zag varint value deltas and
    varint pc deltas (x86-64: pc quantum 1), starting at value -1, ending at a zero delta."""
    value, pc, first = -1, entry, True
    while True:
        uv, p = _varint(d, p)
        if uv == 0 and not first:
            return
        first = False
        value += -(uv >> 1) - 1 if uv & 1 else uv >> 1
        delta, p = _varint(d, p)
        pc += delta
        yield pc, value


def _varint(d: bytes, p: int) -> tuple[int, int]:
    b = d[p]
    if b < 0x80:
        return b, p + 1
    v, shift = 0, 0
    while True:
        b = d[p]
        p += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, p
        shift += 7
        if shift > 35:
            raise ValueError("varint too long")


# -------------------------------------------------------------------- reading the ELF file

def parse_go_table(read: Read, sections: dict[bytes, tuple[int, int, int, int]], is_dyn: bool) -> GoTable | None:
    """The Go table of an ELF image, or None when it has no ``.gopclntab``. ``sections``: name →
    (type, addr, offset, size). Raises GoTableError on a table this module cannot read."""
    found = sections.get(b".gopclntab")
    if found is None:
        return None
    _, addr, offset, size = found
    if size > MAX_PCLNTAB_BYTES:
        raise GoTableError(f".gopclntab of {size >> 20} MB is over the {MAX_PCLNTAB_BYTES >> 20} MB bound")
    try:
        data = read(offset, size)
        if len(data) != size or len(data) < _HEADER.size:
            raise GoTableError(".gopclntab ends early")
        relocs = _relative_relocs(read, sections) if is_dyn else {}

        def pointer(vaddr: int) -> int:
            raw = _read_vaddr(read, sections, vaddr, 8)
            value = _U64.unpack(raw)[0] if raw is not None and len(raw) == 8 else 0
            return value or relocs.get(vaddr, 0)

        md = _moduledata(read, sections, addr, relocs)
        # The header's textStart is filled in at run time: moduledata.text has it in the file.
        text_start = _U64.unpack_from(data, 24)[0] or relocs.get(addr + 24, 0) or \
            (pointer(md + _MODULEDATA_TEXT) if md else 0)
        if not text_start:
            raise GoTableError("no moduledata points at .gopclntab: the text start is unknown")
        gofunc_addr = pointer(md + _MODULEDATA_GOFUNC) if md else 0
        if addr <= gofunc_addr < addr + size:       # Go 1.26: inside .gopclntab, no second copy
            gofunc: bytes | memoryview | None = memoryview(data)[gofunc_addr - addr:]
        else:
            gofunc, gofunc_addr = _gofunc(read, sections, gofunc_addr) if gofunc_addr else (None, 0)
        return GoTable(data, addr, text_start, gofunc, gofunc_addr, _go_build_id(read, sections))
    except _MALFORMED as e:
        raise GoTableError(f"malformed .gopclntab: {e}") from None


def _read_vaddr(read: Read, sections: dict[bytes, tuple[int, int, int, int]], vaddr: int, n: int) -> bytes | None:
    for sh_type, addr, offset, size in sections.values():
        if addr and addr <= vaddr and vaddr + n <= addr + size and sh_type != 8:   # not NOBITS
            return read(offset + vaddr - addr, n)
    return None


def _relative_relocs(read: Read, sections: dict[bytes, tuple[int, int, int, int]]) -> dict[int, int]:
    """r_offset → addend of the R_X86_64_RELATIVE relocations (PIE: pointers in data are 0 in
    the file and filled in at load)."""
    out: dict[int, int] = {}
    for name in (b".rela.dyn", b".rela"):
        found = sections.get(name)
        if found is None:
            continue
        raw = read(found[2], found[3] // 24 * 24)
        for r_offset, r_info, r_addend in struct.iter_unpack("<QQq", raw):
            if r_info & 0xFFFFFFFF == _R_X86_64_RELATIVE:
                out[r_offset] = r_addend
    return out


def _moduledata(read: Read, sections: dict[bytes, tuple[int, int, int, int]], pclntab: int,
                relocs: dict[int, int]) -> int:
    """The address of the ``moduledata`` whose first field points at the pclntab header, 0 when
    none is found: a relocation's target (PIE), else the pointer in the data sections."""
    for r, a in relocs.items():
        if a == pclntab:
            return r
    needle = _U64.pack(pclntab)
    for name in (b".go.module", b".noptrdata", b".data", b".data.rel.ro"):   # .go.module: Go 1.26
        found = sections.get(name)
        if found is None or found[0] == 8:
            continue
        blob = read(found[2], found[3])
        at = blob.find(needle)
        while at >= 0:
            if at % 8 == 0:
                return found[1] + at
            at = blob.find(needle, at + 1)
    return 0


def _gofunc(read: Read, sections: dict[bytes, tuple[int, int, int, int]], gofunc: int) -> tuple[bytes | None, int]:
    """The bytes from ``moduledata.gofunc`` to the end of its section (the inline trees);
    (None, 0) when it is in no section with file contents."""
    for sh_type, addr, offset, size in sections.values():
        if addr and addr <= gofunc < addr + size and sh_type != 8:
            return read(offset + gofunc - addr, addr + size - gofunc), gofunc
    return None, 0


def _go_build_id(read: Read, sections: dict[bytes, tuple[int, int, int, int]]) -> str:
    found = sections.get(b".note.go.buildid")
    if found is None:
        return ""
    blob = read(found[2], found[3])
    if len(blob) < 16:
        return ""
    namesz, descsz, _ = struct.unpack_from("<III", blob, 0)
    desc = 12 + (namesz + 3) // 4 * 4
    return blob[desc:desc + descsz].decode("ascii", "replace")
