"""TLS plaintext for the HTTP source: uprobes on OpenSSL 3's ``SSL_read``/``SSL_write`` and
their ``_ex`` forms, in every libssl a process maps.

A uprobe belongs to a file (an inode) and an offset, not to a process: one set of probes on a
libssl covers every process that maps it, now and later. So the attacher finds the distinct
libssl files mapped on the host, from ``/proc/PID/maps`` read through ``/proc/PID/root`` (a
container's own libssl is another inode, probed on its own), reads the four functions' offsets
from the file's dynamic symbol table, and opens one uprobe perf event per function (entry) and
one uretprobe (return) with the kernel's ``uprobe`` PMU, each running a program of
``bpf/http.bpf.c``. Processes are found as they appear: each scan reads the maps of the pids it
has not seen yet, and every ``FULL_RESCAN`` scans all of them again (a process may load libssl
late, as Python does on ``import ssl``). At most ``MAX_LIBRARIES`` files are probed.

Not covered (their connections are counted as ``tls_unparsed`` when they close): TLS stacks
that are not a shared OpenSSL 3 libssl (Go's crypto/tls, BoringSSL or OpenSSL linked
statically, e.g. in node), and OpenSSL used through memory BIOs (Python's asyncio,
``ssl.SSLObject``), where no socket call happens inside ``SSL_read`` to tell the socket.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import sys
from pathlib import Path

from ..kernel.libbpf import _libc

__all__ = ["TlsAttacher", "uprobe_pmu", "probe_uprobe", "elf_symbol_offsets", "TLS_FUNCTIONS"]

log = logging.getLogger(__name__)

# function → program run at its entry; every return runs "tls_return"
TLS_FUNCTIONS = {"SSL_read": "tls_read_enter", "SSL_read_ex": "tls_read_ex_enter",
                 "SSL_write": "tls_write_enter", "SSL_write_ex": "tls_write_ex_enter"}
RETURN_PROGRAM = "tls_return"
MAX_LIBRARIES = 64
FULL_RESCAN = 30   # scans between two reads of every process's maps
_PMU = Path("/sys/bus/event_source/devices/uprobe")
_PERF_EVENT_OPEN = 298
_ATTR_SIZE = 112
_FLAG_FD_CLOEXEC = 8
_IOC_ENABLE, _IOC_SET_BPF = 0x2400, 0x40042408


def uprobe_pmu() -> tuple[int, int] | str:
    """(PMU type, retprobe bit) of the kernel's uprobe PMU, or why there is none."""
    try:
        pmu_type = int((_PMU / "type").read_text())
        fmt = (_PMU / "format" / "retprobe").read_text().strip()   # "config:0"
        return pmu_type, int(fmt.partition(":")[2])
    except (OSError, ValueError) as e:
        return f"no uprobe PMU ({_PMU}: {e}): a kernel built with CONFIG_UPROBE_EVENTS"


def elf_symbol_offsets(path: str, names: set[str]) -> dict[str, int]:
    """File offsets of the defined functions ``names`` in the dynamic symbol table of a 64-bit
    little-endian ELF file (what a uprobe is placed at)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    (phoff, shoff) = struct.unpack_from("<QQ", data, 0x20)
    (phentsize, phnum, shentsize, shnum) = struct.unpack_from("<HHHH", data, 0x36)
    loads = []
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _pa, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:   # PT_LOAD
            loads.append((p_vaddr, p_vaddr + p_filesz, p_offset))
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out: dict[str, int] = {}
    for _name, sh_type, _f, _a, sh_offset, sh_size, sh_link, _i, _al, sh_entsize in sections:
        if sh_type != 11 or not sh_entsize:   # SHT_DYNSYM
            continue
        str_off = sections[sh_link][4]
        for pos in range(sh_offset, sh_offset + sh_size, sh_entsize):
            st_name, st_info, _o, st_shndx, st_value, _sz = struct.unpack_from("<IBBHQQ", data, pos)
            if not st_value or not st_shndx or st_info & 0xF != 2:   # defined STT_FUNC only
                continue
            end = data.find(b"\0", str_off + st_name)
            name = data[str_off + st_name:end].decode("ascii", "replace")
            if name in names:
                for lo, hi, off in loads:
                    if lo <= st_value < hi:
                        out[name] = st_value - lo + off
                        break
    return out


def _open_uprobe(pmu: tuple[int, int], path: str, offset: int, ret: bool, prog_fd: int) -> int:
    """An enabled system-wide uprobe (or uretprobe) perf event at ``path``+``offset`` running
    ``prog_fd`` (what libbpf's ``perf_event_open_probe`` does)."""
    attr = (ctypes.c_ubyte * _ATTR_SIZE)()
    name = ctypes.create_string_buffer(path.encode())
    ctypes.c_uint32.from_buffer(attr, 0).value = pmu[0]
    ctypes.c_uint32.from_buffer(attr, 4).value = _ATTR_SIZE
    ctypes.c_uint64.from_buffer(attr, 8).value = (1 << pmu[1]) if ret else 0
    ctypes.c_uint64.from_buffer(attr, 56).value = ctypes.addressof(name)   # config1: the path
    ctypes.c_uint64.from_buffer(attr, 64).value = offset                   # config2: the offset
    libc = _libc()
    fd = libc.syscall(ctypes.c_long(_PERF_EVENT_OPEN), ctypes.byref(attr), ctypes.c_long(-1), ctypes.c_long(0),
                      ctypes.c_long(-1), ctypes.c_ulong(_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open(uprobe {path}+{offset:#x}): {os.strerror(err)}")
    for req, arg in ((_IOC_SET_BPF, prog_fd), (_IOC_ENABLE, 0)):
        if libc.ioctl(fd, req, arg) != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"uprobe ioctl on {path}: {os.strerror(err)}")
    return fd


def probe_uprobe() -> tuple[bool, str]:
    """Whether this process may create a uprobe (the kernel asks CAP_SYS_ADMIN of the uprobe
    PMU, which CAP_PERFMON does not replace): one created disabled, at offset 0 of this
    Python's executable (outside any executable mapping, so nothing is ever inserted), closed."""
    pmu = uprobe_pmu()
    if isinstance(pmu, str):
        return False, pmu
    attr = (ctypes.c_ubyte * _ATTR_SIZE)()
    name = ctypes.create_string_buffer(os.path.realpath(sys.executable).encode())
    ctypes.c_uint32.from_buffer(attr, 0).value = pmu[0]
    ctypes.c_uint32.from_buffer(attr, 4).value = _ATTR_SIZE
    ctypes.c_uint64.from_buffer(attr, 40).value = 1   # disabled
    ctypes.c_uint64.from_buffer(attr, 56).value = ctypes.addressof(name)
    fd = _libc().syscall(ctypes.c_long(_PERF_EVENT_OPEN), ctypes.byref(attr), ctypes.c_long(-1), ctypes.c_long(0),
                         ctypes.c_long(-1), ctypes.c_ulong(_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        why = ("creating uprobes needs CAP_SYS_ADMIN on this kernel: without it the http source has "
               "no TLS plaintext") if err in (errno.EACCES, errno.EPERM) else os.strerror(err)
        return False, why
    os.close(fd)
    return True, "uprobes can be created"


def _mapped_libssl(pid: str) -> set[str]:
    """Paths (as the process sees them) of the libssl files a process maps."""
    out = set()
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            for line in f:
                if b"libssl.so" in line:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].startswith(b"/"):
                        out.add(parts[5].rstrip(b"\n").decode("utf-8", "replace"))
    except OSError:
        pass
    return out


class TlsAttacher:
    """Finds libssl files and keeps their uprobes; ``scan()`` is bounded and never raises."""

    def __init__(self, prog_fd: dict[str, int], pmu: tuple[int, int]):
        self.prog_fd = prog_fd
        self.pmu = pmu
        self.libraries: dict[tuple[int, int], str] = {}   # (dev, inode) → path it was probed by
        self.failed: dict[tuple[int, int], str] = {}      # (dev, inode) → why it is not probed
        self._fds: list[int] = []
        self._seen: set[str] = set()
        self._scans = 0

    def scan(self) -> int:
        """Probes the libssl files of processes not seen before (all of them every
        ``FULL_RESCAN`` scans); returns how many files were newly probed."""
        self._scans += 1
        full = self._scans % FULL_RESCAN == 1
        try:
            pids = {p for p in os.listdir("/proc") if p.isdigit()}
        except OSError:
            return 0
        todo = pids if full else pids - self._seen
        self._seen = pids
        added = 0
        for pid in todo:
            for path in _mapped_libssl(pid):
                added += self._attach(f"/proc/{pid}/root{path}")
        return added

    def _attach(self, path: str) -> int:
        try:
            st = os.stat(path)
        except OSError:
            return 0
        key = (st.st_dev, st.st_ino)
        if key in self.libraries or key in self.failed:
            return 0
        if len(self.libraries) >= MAX_LIBRARIES:
            self.failed[key] = f"more than {MAX_LIBRARIES} libssl files"
            return 0
        try:
            offsets = elf_symbol_offsets(path, set(TLS_FUNCTIONS))
        except (OSError, struct.error, IndexError) as e:
            self.failed[key] = f"unreadable: {e}"
            return 0
        if set(offsets) != set(TLS_FUNCTIONS):
            self.failed[key] = f"not OpenSSL 3 (lacks {sorted(set(TLS_FUNCTIONS) - set(offsets))})"
            log.info("http source: %s not probed: %s", path, self.failed[key])
            return 0
        fds: list[int] = []
        try:
            for fn, prog in TLS_FUNCTIONS.items():
                fds.append(_open_uprobe(self.pmu, path, offsets[fn], False, self.prog_fd[prog]))
                fds.append(_open_uprobe(self.pmu, path, offsets[fn], True, self.prog_fd[RETURN_PROGRAM]))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            self.failed[key] = str(e)
            log.warning("http source: cannot probe %s: %s", path, e)
            return 0
        self._fds.extend(fds)
        self.libraries[key] = path
        log.info("http source: TLS uprobes on %s", path)
        return 1

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise
        self.libraries.clear()
