"""Just enough ELF to symbolize: the GNU build id, the PT_LOAD segments, and FUNC symbols.

Reads 32- and 64-bit, little- and big-endian images with ``struct``, from a file (only the
headers and symbol tables are read) or from bytes (the vdso read out of a process's memory).
Symbols come from ``.symtab``; a stripped file falls back to ``.dynsym`` plus, when present,
the xz-compressed MiniDebugInfo (``.gnu_debugdata``) that some distributions ship. Anything
malformed raises ``ElfError``; nothing else escapes.
"""

from __future__ import annotations

import lzma
import mmap
import os
import struct
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from .gopclntab import GoTable, GoTableError, parse_go_table

__all__ = ["ElfError", "LoadSegment", "SymbolTable", "ElfFile", "Read", "parse_elf",
           "parse_elf_bytes", "read_elf_fd", "fd_reader", "named_sections", "read_symtab_fd", "build_id_from_notes"]

_PT_LOAD, _PT_NOTE = 1, 4
_PF_X = 1
_SHT_SYMTAB, _SHT_NOTE, _SHT_DYNSYM = 2, 7, 11
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_BINDING_RANK = {1: 0, 2: 1}   # STB_GLOBAL before STB_WEAK before STB_LOCAL and the rest
_SHN_UNDEF, _SHN_LORESERVE, _SHN_XINDEX = 0, 0xFF00, 0xFFFF
_NT_GNU_BUILD_ID = 3
_MAX_DEBUGDATA = 64 << 20   # cap on decompressed .gnu_debugdata: a hostile file cannot balloon


class ElfError(Exception):
    """The bytes are not an ELF image this module can read."""


# What reading nonsense offsets and sizes out of a malformed image raises.
_MALFORMED = (struct.error, IndexError, ValueError, OverflowError)


@dataclass(frozen=True, slots=True)
class LoadSegment:
    """A PT_LOAD program header: file bytes [offset, offset+filesz) load at vaddr."""

    offset: int
    vaddr: int
    filesz: int
    executable: bool


class SymbolTable:
    """FUNC symbols sorted by address; ``lookup`` is one bisect.

    Names live in one bytes blob with an offsets array (not one ``str`` per symbol), so a
    C++ binary with 100k symbols costs a few MB, and a name is decoded only when asked for."""

    __slots__ = ("_starts", "_ends", "_offsets", "_names")

    def __init__(self, starts: array, ends: array, offsets: array, names: bytes) -> None:
        """Sorted by start, one symbol per start; name i is ``names[offsets[i]:offsets[i+1]]``."""
        self._starts, self._ends, self._offsets, self._names = starts, ends, offsets, names

    def __len__(self) -> int:
        return len(self._starts)

    def lookup(self, vaddr: int) -> str:
        """The function containing ``vaddr``, or "" when none does."""
        i = bisect_right(self._starts, vaddr) - 1
        if i < 0 or vaddr >= self._ends[i]:
            return ""
        return self._names[self._offsets[i]:self._offsets[i + 1]].decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class ElfFile:
    """What symbolization needs from one ELF image."""

    build_id: str                      # lowercase hex, "" when the image has no GNU build id
    segments: tuple[LoadSegment, ...]
    symbols: SymbolTable
    go: GoTable | None = None          # a Go binary's .gopclntab (names, lines, inlined calls)

    def load_bias(self, map_start: int, map_offset: int) -> int | None:
        """For a mapping of this file at ``map_start`` from file offset ``map_offset``: the bias
        with ``vaddr = address - bias``, or None when no PT_LOAD covers that offset.

        A segment is mapped from the page holding ``p_offset``, so the mapping's offset may sit
        up to a page below it; an executable segment wins over others."""
        page = mmap.PAGESIZE
        covering = [s for s in self.segments
                    if s.offset - page < map_offset < s.offset + max(s.filesz, 1)]
        if not covering:
            return None
        seg = next((s for s in covering if s.executable), covering[0])
        return map_start - map_offset + seg.offset - seg.vaddr


class _Layout:
    """Struct formats for one ELF class and byte order."""

    def __init__(self, is64: bool, endian: str) -> None:
        self.is64 = is64
        if is64:
            self.ehdr = struct.Struct(endian + "16xHHIQQQIHHHHHH")
            self.phdr = struct.Struct(endian + "IIQQQQQQ")
            self.shdr = struct.Struct(endian + "IIQQQQIIQQ")
            self.sym = struct.Struct(endian + "IBBHQQ")
        else:
            self.ehdr = struct.Struct(endian + "16xHHIIIIIHHHHHH")
            self.phdr = struct.Struct(endian + "IIIIIIII")
            self.shdr = struct.Struct(endian + "IIIIIIIIII")
            self.sym = struct.Struct(endian + "IIIBBH")
        self.note = struct.Struct(endian + "III")


@dataclass(frozen=True, slots=True)
class _Section:
    name: int
    type: int
    addr: int
    offset: int
    size: int
    link: int


class _Found:
    """FUNC symbols as they are read, in arrays and one names blob: a tuple per symbol (with
    its sort key) cost ~300 bytes, 8.5 MB for a 27 000-symbol ``.dynsym``, at the agent's peak."""

    __slots__ = ("starts", "ends", "prefs", "offsets", "names")

    def __init__(self) -> None:
        self.starts, self.ends, self.prefs = array("Q"), array("Q"), array("H")
        self.offsets, self.names = array("Q", [0]), bytearray()

    def __len__(self) -> int:
        return len(self.starts)

    def add(self, start: int, end: int, pref: int, name: bytes) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.prefs.append(pref)
        self.names += name
        self.offsets.append(len(self.names))

    def extend(self, other: _Found) -> None:
        for i in range(len(other)):
            self.add(other.starts[i], other.ends[i], other.prefs[i], other.name(i))

    def name(self, i: int) -> bytes:
        return bytes(self.names[self.offsets[i]:self.offsets[i + 1]])

    def table(self) -> SymbolTable:
        """Sorted by start; among aliases at one start the best preference, then the least name.
        The sort is over one int per symbol (start and index packed), not tuples."""
        n = len(self.starts)
        bits = max(n.bit_length(), 1)
        mask = (1 << bits) - 1
        order = sorted(start << bits | i for i, start in enumerate(self.starts))
        starts, ends, offsets, names = array("Q"), array("Q"), array("I", [0]), bytearray()
        chosen = -1
        for packed in order:
            i = packed & mask
            if starts and starts[-1] == self.starts[i]:
                if (self.prefs[i], self.name(i)) >= (self.prefs[chosen], self.name(chosen)):
                    continue
                del names[offsets[-2]:]
                ends[-1] = self.ends[i]
            else:
                starts.append(self.starts[i])
                ends.append(self.ends[i])
                offsets.append(0)
            chosen = i
            names += self.names[self.offsets[i]:self.offsets[i + 1]]
            offsets[-1] = len(names)
        return SymbolTable(starts, ends, offsets, bytes(names))


Read = Callable[[int, int], bytes]
"""``read(offset, size)``: up to ``size`` bytes of the image from ``offset``, never more than the
image holds (so a malformed size cannot make it allocate more)."""


def _exactly(read: Read, offset: int, size: int) -> bytes:
    data = read(offset, size)
    if len(data) != size:
        raise ElfError("the image ends inside a header or table")
    return data


def _layout(ident: bytes) -> _Layout:
    if len(ident) < 16 or ident[:4] != b"\x7fELF":
        raise ElfError("not an ELF image")
    ei_class, ei_data = ident[4], ident[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise ElfError(f"unknown ELF class {ei_class} or byte order {ei_data}")
    return _Layout(ei_class == 2, "<" if ei_data == 1 else ">")


def _segments(read: Read, lay: _Layout, phoff: int, phnum: int,
              phentsize: int) -> list[tuple[int, int, int, int, int, int]]:
    """(type, flags, offset, vaddr, filesz, align) per program header."""
    if phnum == 0 or phentsize < lay.phdr.size:
        return []
    table = _exactly(read, phoff, phnum * phentsize)
    out = []
    for i in range(phnum):
        f = lay.phdr.unpack_from(table, i * phentsize)
        if lay.is64:
            p_type, p_flags, p_offset, p_vaddr, _, p_filesz, _, p_align = f
        else:
            p_type, p_offset, p_vaddr, _, p_filesz, _, p_flags, p_align = f
        out.append((p_type, p_flags, p_offset, p_vaddr, p_filesz, p_align))
    return out


def _sections(read: Read, lay: _Layout, shoff: int, shnum: int,
              shentsize: int) -> list[_Section]:
    if shoff == 0 or shentsize < lay.shdr.size:
        return []
    if shnum == 0:                     # extended numbering: the count is in section 0
        shnum = lay.shdr.unpack(_exactly(read, shoff, lay.shdr.size))[5]
    table = _exactly(read, shoff, shnum * shentsize)
    out = []
    for i in range(shnum):
        f = lay.shdr.unpack_from(table, i * shentsize)
        out.append(_Section(name=f[0], type=f[1], addr=f[3], offset=f[4], size=f[5], link=f[6]))
    return out


def _notes_build_id(blob: bytes, note: struct.Struct, align: int) -> str:
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = note.unpack_from(blob, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + align - 1) // align * align
        if ntype == _NT_GNU_BUILD_ID and blob[name_at:name_at + namesz].rstrip(b"\0") == b"GNU":
            return blob[desc_at:desc_at + descsz].hex()
        pos = desc_at + (descsz + align - 1) // align * align
    return ""


def build_id_from_notes(blob: bytes, endian: str = "<") -> str:
    """The GNU build id in a raw note blob, such as /sys/kernel/notes (the kernel's own)."""
    return _notes_build_id(blob, struct.Struct(endian + "III"), 4)


def _build_id(read: Read, lay: _Layout, phdrs: list, sections: list[_Section]) -> str:
    for p_type, _, p_offset, _, p_filesz, p_align in phdrs:
        if p_type == _PT_NOTE:
            found = _notes_build_id(_exactly(read, p_offset, p_filesz), lay.note,
                                    8 if p_align == 8 else 4)
            if found:
                return found
    for s in sections:
        if s.type == _SHT_NOTE:
            found = _notes_build_id(_exactly(read, s.offset, s.size), lay.note, 4)
            if found:
                return found
    return ""


def _func_symbols(read: Read, lay: _Layout, sections: list[_Section], table: _Section,
                  found: _Found) -> None:
    """Adds every defined FUNC/IFUNC symbol of ``table`` to ``found``.

    A symbol without a size (hand-written assembly) extends to the end of its section; the
    bisect picks the next symbol once that starts."""
    if table.link >= len(sections):
        return
    strtab_sec = sections[table.link]
    strtab = _exactly(read, strtab_sec.offset, strtab_sec.size)
    raw = _exactly(read, table.offset, table.size // lay.sym.size * lay.sym.size)
    for f in lay.sym.iter_unpack(raw):
        if lay.is64:
            st_name, st_info, _, st_shndx, st_value, st_size = f
        else:
            st_name, st_value, st_size, st_info, _, st_shndx = f
        if st_info & 0xF not in (_STT_FUNC, _STT_GNU_IFUNC) or st_value == 0:
            continue
        if st_shndx == _SHN_UNDEF or (_SHN_LORESERVE <= st_shndx and st_shndx != _SHN_XINDEX):
            continue
        if st_size:
            end = st_value + st_size
        elif st_shndx < len(sections):
            sec = sections[st_shndx]
            end = max(sec.addr + sec.size, st_value + 1)
        else:
            end = st_value + 1
        nul = strtab.find(b"\0", st_name)
        name = strtab[st_name:nul if nul >= 0 else len(strtab)]
        if not name:
            continue
        # Among aliases at one address: fewest leading underscores (``write`` over
        # ``__libc_write``), then global over weak over local, then the name itself.
        underscores = min(len(name) - len(name.lstrip(b"_")), 0x3FFF)
        found.add(st_value, end, underscores << 2 | _BINDING_RANK.get(st_info >> 4, 2), name)


def _minidebuginfo(read: Read, sections: list[_Section], shstrndx: int) -> _Found:
    """FUNC symbols from the xz-compressed ``.gnu_debugdata`` ELF, when the image has one."""
    if shstrndx >= len(sections):
        return _Found()
    names_sec = sections[shstrndx]
    names = _exactly(read, names_sec.offset, names_sec.size)
    for s in sections:
        if names[s.name:names.find(b"\0", s.name)] == b".gnu_debugdata":
            # A broken .gnu_debugdata costs only its own symbols, not the .dynsym ones.
            try:
                inner = lzma.LZMADecompressor().decompress(_exactly(read, s.offset, s.size),
                                                           max_length=_MAX_DEBUGDATA)
                return _parse(lambda offset, size: inner[offset:offset + size],  # noqa: B023 (called before the loop moves on)
                              symtab_only=True)[2]
            except (lzma.LZMAError, ElfError, *_MALFORMED):
                return _Found()
    return _Found()


def _parse(read: Read, symtab_only: bool = False) -> tuple[str, list, _Found]:
    """(build id, program headers, FUNC symbols) of one image."""
    lay = _layout(read(0, 16))
    (_, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
     shstrndx) = lay.ehdr.unpack(_exactly(read, 0, lay.ehdr.size))
    sections = _sections(read, lay, shoff, shnum, shentsize)
    symbols = _Found()
    for t in sections:
        if t.type == _SHT_SYMTAB:
            _func_symbols(read, lay, sections, t, symbols)
    if symtab_only:
        return "", [], symbols
    phdrs = _segments(read, lay, phoff, phnum, phentsize)
    if shstrndx == _SHN_XINDEX and sections:
        shstrndx = sections[0].link
    if not symbols:
        for t in sections:
            if t.type == _SHT_DYNSYM:
                _func_symbols(read, lay, sections, t, symbols)
        symbols.extend(_minidebuginfo(read, sections, shstrndx))
    return _build_id(read, lay, phdrs, sections), phdrs, symbols


def parse_elf(read: Read) -> ElfFile:
    """Build id, load segments and FUNC symbols of one ELF image (a file or memory)."""
    try:
        build_id, phdrs, found = _parse(read)
    except _MALFORMED as e:
        raise ElfError(f"malformed ELF: {e}") from None
    segments = tuple(LoadSegment(offset=o, vaddr=v, filesz=sz, executable=bool(fl & _PF_X))
                     for t, fl, o, v, sz, _ in phdrs if t == _PT_LOAD)
    return ElfFile(build_id=build_id, segments=segments, symbols=found.table(), go=_go_table(read))


def _go_table(read: Read) -> GoTable | None:
    """The image's Go table, None when it has none or it cannot be read (then its frames are
    named from the ELF symbols, if any)."""
    try:
        sections, is_dyn = named_sections(read)
        return parse_go_table(read, sections, is_dyn)
    except (GoTableError, ElfError):
        return None


def parse_elf_bytes(image: bytes) -> ElfFile:
    """``parse_elf`` on an image in memory (the vdso read out of a process)."""
    return parse_elf(lambda offset, size: image[offset:offset + size])


def fd_reader(fd: int) -> Read:
    """``pread``, not ``mmap``: a library truncated while we read it must give an error, not
    SIGBUS in the agent."""
    try:
        file_size = os.fstat(fd).st_size
    except OSError as e:
        raise ElfError(str(e)) from None

    def read(offset: int, size: int) -> bytes:
        try:
            return os.pread(fd, max(0, min(size, file_size - offset)), offset)
        except OSError as e:
            raise ElfError(str(e)) from None
    return read


def read_elf_fd(fd: int) -> ElfFile:
    """``parse_elf`` on an open file, reading only the headers and symbol tables."""
    return parse_elf(fd_reader(fd))


def read_symtab_fd(fd: int) -> SymbolTable:
    """Only the ``.symtab`` FUNC symbols of an open file: a separate debug file, whose code
    sections are empty but whose symbol addresses are those of the stripped file."""
    try:
        return _parse(fd_reader(fd), symtab_only=True)[2].table()
    except _MALFORMED as e:
        raise ElfError(f"malformed ELF: {e}") from None


def _section_table(read: Read) -> tuple[_Layout, list[_Section], int]:
    """Layout, section headers and the section-name table's index of one image."""
    lay = _layout(read(0, 16))
    (_, _, _, _, _, shoff, _, _, _, _, shentsize, shnum,
     shstrndx) = lay.ehdr.unpack(_exactly(read, 0, lay.ehdr.size))
    sections = _sections(read, lay, shoff, shnum, shentsize)
    if shstrndx == _SHN_XINDEX and sections:
        shstrndx = sections[0].link
    return lay, sections, shstrndx


def section_sizes(fd: int, names: tuple[bytes, ...]) -> dict[bytes, int]:
    """Sizes of the named sections of an open file (the unwinder checks ``.eh_frame`` and
    ``.debug_frame`` before asking readelf to interpret them)."""
    read = fd_reader(fd)
    try:
        _, sections, shstrndx = _section_table(read)
        if not 0 <= shstrndx < len(sections):
            return {}
        strtab = sections[shstrndx]
        blob = read(strtab.offset, strtab.size)
    except _MALFORMED as e:
        raise ElfError(f"malformed ELF: {e}") from None
    out: dict[bytes, int] = {}
    for s in sections:
        end = blob.find(b"\0", s.name)
        name = blob[s.name:end if end >= 0 else None]
        if name in names:
            out[name] = out.get(name, 0) + s.size
    return out


def named_sections(read: Read) -> tuple[dict[bytes, tuple[int, int, int, int]], bool]:
    """name → (type, addr, offset, size) of each section (the first of a name), and whether the
    image is ET_DYN (PIE or a shared library)."""
    try:
        lay, sections, shstrndx = _section_table(read)
        e_type = lay.ehdr.unpack(_exactly(read, 0, lay.ehdr.size))[0]
        if not 0 <= shstrndx < len(sections):
            return {}, e_type == 3
        strtab = sections[shstrndx]
        blob = read(strtab.offset, strtab.size)
    except _MALFORMED as e:
        raise ElfError(f"malformed ELF: {e}") from None
    out: dict[bytes, tuple[int, int, int, int]] = {}
    for s in sections:
        end = blob.find(b"\0", s.name)
        out.setdefault(blob[s.name:end if end >= 0 else None], (s.type, s.addr, s.offset, s.size))
    return out, e_type == 3


def dynamic_symbols_fd(fd: int, names: set[bytes]) -> dict[bytes, int]:
    """Addresses (ELF virtual) of the named ``.dynsym`` symbols of any type (data too: the
    CPython profiler looks for ``_PyRuntime``), read from an open file."""
    read = fd_reader(fd)
    try:
        lay, sections, _ = _section_table(read)
        found: dict[bytes, int] = {}
        for table in sections:
            if table.type != _SHT_DYNSYM or table.link >= len(sections):
                continue
            strtab_sec = sections[table.link]
            strtab = _exactly(read, strtab_sec.offset, strtab_sec.size)
            raw = _exactly(read, table.offset, table.size // lay.sym.size * lay.sym.size)
            for f in lay.sym.iter_unpack(raw):
                st_name, st_value, st_shndx = (f[0], f[4], f[3]) if lay.is64 else (f[0], f[1], f[5])
                if st_value == 0 or st_shndx == _SHN_UNDEF:
                    continue
                nul = strtab.find(b"\0", st_name)
                name = strtab[st_name:nul if nul >= 0 else len(strtab)]
                if name in names:
                    found[name] = st_value
        return found
    except _MALFORMED as e:
        raise ElfError(f"malformed ELF: {e}") from None
