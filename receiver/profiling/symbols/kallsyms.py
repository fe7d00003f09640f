"""Kernel symbols from /proc/kallsyms: read once, sorted, looked up by bisect.

kallsyms has no sizes, so a symbol extends to the next one. Modules and BPF programs come and
go; an address past the last known symbol re-reads the file (at most once per ``RELOAD_AFTER_S``),
which is how newly loaded code gets its names. When the kernel hides the addresses (all zeros:
no CAP_SYSLOG, or ``kernel.kptr_restrict`` = 2) kernel frames stay unresolved; that is logged
once, with the cause.
"""

from __future__ import annotations

import heapq
import logging
import time
from array import array
from bisect import bisect_right

from ..model import KERNEL_MAPPING_PATH, Mapping
from .elf import build_id_from_notes

__all__ = ["KernelSymbols"]

log = logging.getLogger(__name__)

_TEXT_TYPES = frozenset(b"tTwW")
_ADDRESS_SPACE_END = (1 << 64) - 1


class KernelSymbols:
    """Names of kernel text addresses, and the one ``Mapping`` every kernel frame carries."""

    RELOAD_AFTER_S = 60.0

    def __init__(self, kallsyms_path: str = "/proc/kallsyms",
                 notes_path: str = "/sys/kernel/notes") -> None:
        self._path = kallsyms_path
        self._starts = array("Q")
        self._offsets = array("I", [0])
        self._names = b""
        self._loaded_at = float("-inf")
        self._hidden_logged = False
        self.build_id = self._read_build_id(notes_path)
        self.mapping = Mapping(0, _ADDRESS_SPACE_END, 0, KERNEL_MAPPING_PATH, self.build_id)
        self.load()

    @property
    def available(self) -> bool:
        """False when kallsyms could not be read or its addresses are hidden."""
        return len(self._starts) > 0

    @staticmethod
    def _read_build_id(path: str) -> str:
        try:
            with open(path, "rb") as f:
                return build_id_from_notes(f.read())
        except OSError:
            return ""

    def load(self) -> None:
        """(Re)reads kallsyms; keeps the previous table when that fails."""
        self._loaded_at = time.monotonic()
        try:
            starts, offsets, names = _read_text_symbols(self._path)
        except OSError as e:
            log.warning("cannot read %s (%s): kernel frames stay unresolved", self._path, e)
            return
        if not starts:
            if not self._hidden_logged:
                self._hidden_logged = True
                log.warning("%s shows no addresses: %s. Kernel frames stay unresolved, with "
                            "their addresses", self._path, hidden_addresses_cause())
            return
        self._starts, self._offsets, self._names = starts, offsets, names
        # file_offset == start: the frame's "file address" is the kernel address itself, which is
        # what System.map/kallsyms-based tools symbolize with.
        start = self._starts[0]
        self.mapping = Mapping(start, _ADDRESS_SPACE_END, start, KERNEL_MAPPING_PATH, self.build_id)

    def lookup(self, address: int) -> str:
        """The kernel function containing ``address``, or ""."""
        starts = self._starts
        i = bisect_right(starts, address) - 1
        if i == len(starts) - 1 and self._reload_allowed():
            self.load()
            starts = self._starts
            i = bisect_right(starts, address) - 1
        if i < 0 or i == len(starts) - 1:
            return ""       # below the kernel, or past the last symbol, whose end is unknown
        return self._names[self._offsets[i]:self._offsets[i + 1]].decode("utf-8", "replace")

    def _reload_allowed(self) -> bool:
        return len(self._starts) > 0 and time.monotonic() - self._loaded_at >= self.RELOAD_AFTER_S


def _read_text_symbols(path: str) -> tuple[array, array, bytes]:
    """(starts, name offsets, names blob) of the text symbols with an address, sorted.

    Streamed line by line into arrays: reading the 5 MB file whole and splitting it into
    Python objects cost ~30 MB for a moment (the profiler's peak RSS). kallsyms is sorted but
    for a few runs (modules, BPF); those are merged by index, so no per-symbol tuple is made."""
    starts, offsets, blob = array("Q"), array("I", [0]), bytearray()
    with open(path, "rb") as f:
        for line in f:
            fields = line.split(None, 3)
            if len(fields) < 3 or len(fields[1]) != 1 or fields[1][0] not in _TEXT_TYPES:
                continue
            try:
                address = int(fields[0], 16)
            except ValueError:
                continue
            if address:
                starts.append(address)
                blob += fields[2].rstrip(b"\n")
                offsets.append(len(blob))
    runs = [0] + [i for i in range(1, len(starts)) if starts[i] < starts[i - 1]] + [len(starts)]
    order = heapq.merge(*(range(a, b) for a, b in zip(runs, runs[1:], strict=False)),
                        key=starts.__getitem__)
    out_starts, out_offsets, out_blob = array("Q"), array("I", [0]), bytearray()
    for i in order:          # one name per address: the greatest, as a sort by (address, name) gave
        name = blob[offsets[i]:offsets[i + 1]]
        if out_starts and out_starts[-1] == starts[i]:
            if name > out_blob[out_offsets[-2]:]:
                del out_blob[out_offsets[-2]:]
                out_blob += name
                out_offsets[-1] = len(out_blob)
            continue
        out_starts.append(starts[i])
        out_blob += name
        out_offsets.append(len(out_blob))
    return out_starts, out_offsets, bytes(out_blob)


def _sysctl(name: str) -> int | None:
    try:
        with open(f"/proc/sys/kernel/{name}") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def hidden_addresses_cause() -> str:
    """Why the kernel shows this process zero addresses: the kernel's kallsyms_show_value()
    rule (kptr_restrict 2 hides them from everyone; 1 needs CAP_SYSLOG; 0 needs CAP_SYSLOG or
    perf_event_paranoid <= 1), stated with the values read here."""
    from ...kernel.capabilities import has

    restrict, paranoid = _sysctl("kptr_restrict"), _sysctl("perf_event_paranoid")
    if restrict is not None and restrict >= 2:
        return f"kernel.kptr_restrict={restrict} hides them from every process; set it to 1"
    if not has("CAP_SYSLOG"):
        return (f"the process lacks CAP_SYSLOG, which kernel.kptr_restrict={restrict} with "
                f"kernel.perf_event_paranoid={paranoid} requires; grant CAP_SYSLOG")
    return (f"although CAP_SYSLOG is held (kernel.kptr_restrict={restrict}); a security module "
            "may hide them")
