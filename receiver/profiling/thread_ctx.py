"""OTEP 4947 thread context (``otel_thread_ctx_v1``): where each thread of a publishing process
keeps its record pointer, for the profiler's request links (docs/profiler.md#request-links).

An SDK exports the ELF TLS variable ``otel_thread_ctx_v1`` (a dynamic symbol of type TLS): per
thread, a pointer to ``{u8 trace_id[16]; u8 span_id[8]; u8 valid; u8 reserved; u16
attrs_data_size; u8 attrs_data[];}``. The kernel cannot find a thread's TLS without the thread
pointer (fsbase, only in ``task_struct``, whose layout we do not read), so user space finds it as
glibc's libthread_db does, from the process's own memory:

* libc exports ``_thread_db_*`` descriptors (``{u32 bits, u32 count, u32 offset}``): the offsets
  of ``struct pthread``'s ``list`` and ``tid``, of ``_rtld_global``'s thread lists
  ``_dl_stack_used`` / ``_dl_stack_user`` (list heads in ld.so's ``_rtld_global``), of
  ``link_map``'s ``l_tls_offset`` / ``l_tls_modid``, ``pthread.header.dtv``;
* every thread's ``struct pthread`` is on one of those lists, and on x86_64 (TLS variant II) its
  address is the thread pointer;
* the module defining the symbol is found in ld.so's ``_r_debug.r_map`` list by its load bias;
  static TLS (a library loaded at start): slot = tp - l_tls_offset + st_value; dynamic TLS (a
  dlopen'ed one): slot = dtv[l_tls_modid] + st_value, dtv at ``pthread.header.dtv``.

``ThreadCtxWalker`` finds publishing processes (a mapped file whose ``.dynsym`` defines the
symbol, cached per file; a process the profiler samples for the first time is looked at at once,
``note``), walks their threads every ``interval`` seconds and keeps the pinned
``thread_ctx_slots`` map (pid_tgid -> slot address) current. The profiler program reads the slot
(the record pointer), then the record, with ``bpf_probe_read_user`` for a sampled thread without
another link, and links the sample when ``valid == 1`` (copying the trace id into
``link_traces``). Bounded: ``MAX_PROCESSES`` publishers, ``MAX_THREADS`` threads in all.
glibc only (musl keeps no thread_db descriptors: counted ``no_thread_db``); x86_64 only.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from .runtimes._memory import mapped_file_read
from .symbols import elf

log = logging.getLogger(__name__)

SYMBOL = b"otel_thread_ctx_v1"
MAX_PROCESSES = 1024          # publishing processes walked
MAX_THREADS = 16384           # thread_ctx_slots entries (all processes)
MAX_FILES = 4096              # mapped files whose dynamic symbols are remembered
RECHECK_S = 30.0              # a process that did not publish is looked at again after this
MIN_GAP_S = 0.1               # between passes woken by new processes
STATS = ("linked", "unreadable", "invalid")   # the kernel's thread_ctx_stats slots, in order
WALK_REASONS = ("no_thread_db", "no_module", "unreadable_process", "tls_unallocated", "threads_limit",
                "processes_limit", "map_full")
_STT_TLS = 6
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
_DESCS = (b"pthread_list", b"pthread_tid", b"pthread_dtvp", b"link_map_l_tls_offset",
          b"link_map_l_tls_modid", b"rtld_global__dl_stack_used", b"rtld_global__dl_stack_user")
_LIBC_SYMS = {b"_thread_db_" + d for d in _DESCS}
_LD_SYMS = {b"_rtld_global", b"_r_debug"}
_LM_NEXT = 24                 # link_map: l_addr, l_name, l_ld, l_next (the public, ABI part)
_R_MAP = 8                    # r_debug: int r_version; struct link_map *r_map
_NO_TLS_OFFSET, _FORCED_DYNAMIC = 0, -1
_TLS_DTV_UNALLOCATED = (1 << 64) - 1
_MAX_MODULES = 4096           # link_map entries followed


def dynamic_symbols(fd: int, names: set[bytes]) -> dict[bytes, tuple[int, int]]:
    """name -> (st_value, st_type) of the defined ``.dynsym`` symbols named (a TLS symbol's
    value, its offset in the module's TLS block, may be 0)."""
    read = elf.fd_reader(fd)
    try:
        lay, sections, _ = elf._section_table(read)
        found: dict[bytes, tuple[int, int]] = {}
        for table in sections:
            if table.type != elf._SHT_DYNSYM or table.link >= len(sections):
                continue
            strtab_sec = sections[table.link]
            strtab = elf._exactly(read, strtab_sec.offset, strtab_sec.size)
            raw = elf._exactly(read, table.offset, table.size // lay.sym.size * lay.sym.size)
            for f in lay.sym.iter_unpack(raw):
                if lay.is64:
                    st_name, st_info, st_shndx, st_value = f[0], f[1], f[3], f[4]
                else:
                    st_name, st_info, st_shndx, st_value = f[0], f[3], f[5], f[1]
                if st_shndx == elf._SHN_UNDEF:
                    continue
                nul = strtab.find(b"\0", st_name)
                name = strtab[st_name:nul if nul >= 0 else len(strtab)]
                if name in names:
                    found[name] = (st_value, st_info & 0xF)
        return found
    except elf._MALFORMED as e:
        raise elf.ElfError(f"malformed ELF: {e}") from None


class _Mapped:
    """A file a process maps: its path, lowest mapping start (file offset 0), identity."""
    __slots__ = ("path", "start", "end", "key")

    def __init__(self, path: str, start: int, end: int, key: tuple[str, str]) -> None:
        self.path, self.start, self.end, self.key = path, start, end, key


def _mapped_files(pid: int) -> dict[str, _Mapped]:
    out: dict[str, _Mapped] = {}
    with open(f"/proc/{pid}/maps", "rb") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or not parts[5].startswith(b"/") or int(parts[2], 16) != 0:
                continue
            path = parts[5].rstrip(b"\n").decode(errors="replace")
            if path in out:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split(b"-"))
            out[path] = _Mapped(path, lo, hi, (parts[3].decode(), parts[4].decode()))
    return out


class _Publisher:
    """One publishing process: where its thread list and the symbol's module are."""
    __slots__ = ("pid", "start_time", "exe", "lists", "off", "module_lm", "tls_offset", "modid", "st_value")

    def __init__(self, pid: int, start_time: bytes) -> None:
        self.pid, self.start_time = pid, start_time
        self.exe: tuple[int, int] = (0, 0)
        self.lists: tuple[int, int] = (0, 0)
        self.off: dict[bytes, int] = {}
        self.module_lm = 0
        self.tls_offset = 0
        self.modid = 0
        self.st_value = 0


def _exe(pid: int) -> tuple[int, int]:
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return (0, 0)
    return (st.st_dev, st.st_ino)


def _start_time(pid: int) -> bytes:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2:].split(b" ")[19]


class ThreadCtxWalker:
    """Keeps ``thread_ctx_slots`` (pid_tgid -> TLS slot address) current; ``count`` is called
    with a reason (``thread_ctx_<reason>``) for what cannot be walked."""

    def __init__(self, slots_fd: int, stats_fd: int, count: Callable[[str, int], None],
                 interval: float = 1.0, pids: list[int] | None = None) -> None:
        self.slots_fd, self.stats_fd, self.count = slots_fd, stats_fd, count
        self.interval = interval
        self.pids = set(pids or ())
        self._files: OrderedDict[tuple[str, str, str], dict[bytes, tuple[int, int]]] = OrderedDict()
        self._checked: dict[int, tuple[bytes, float]] = {}     # non-publishers: start time, when
        self._publishers: dict[int, _Publisher] = {}
        self._entries: dict[int, int] = {}                      # what the map holds
        self._stats_seen = [0] * len(STATS)
        self._unallocated: set[int] = set()                     # threads without their TLS block
        self._unallocated_now: set[int] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._noted: set[int] = set()                           # new processes, walked at once
        self._noted_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="thread-ctx", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:   # one bad process must not stop the walker
                log.exception("thread_ctx: scan failed")
            self._stop.wait(MIN_GAP_S)     # a burst of new processes: one pass per MIN_GAP_S
            self._wake.wait(self.interval)
            self._wake.clear()

    def note(self, pid: int) -> None:
        """A process the profiler sampled for the first time: looked at in the next pass (soon),
        even if it did not publish when last looked at."""
        with self._noted_lock:
            if len(self._noted) < MAX_PROCESSES:
                self._noted.add(pid)
        self._wake.set()

    # -- one pass ----------------------------------------------------------------------------
    def scan(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._noted_lock:
            noted, self._noted = self._noted, set()
        for pid in noted:
            self._checked.pop(pid, None)
        want: dict[int, int] = {}
        pids = sorted(self.pids) if self.pids else [int(p) for p in os.listdir("/proc") if p.isdigit()]
        live = set()
        for pid in pids:
            if pid == os.getpid():
                continue
            try:
                st = _start_time(pid)
            except OSError:
                continue
            live.add(pid)
            pub = self._publishers.get(pid)
            if pub is not None and (pub.start_time != st or pub.exe != _exe(pid)):   # gone, or exec'ed
                del self._publishers[pid]
                pub = None
            if pub is None:
                seen = self._checked.get(pid)
                if seen is not None and seen[0] == st and now - seen[1] < RECHECK_S:
                    continue
                pub = self._discover(pid, st)
                if pub is None:
                    self._checked[pid] = (st, now)
                    continue
                if len(self._publishers) >= MAX_PROCESSES:
                    self.count("processes_limit", 1)
                    self._checked[pid] = (st, now)
                    continue
                self._publishers[pid] = pub
                self._checked.pop(pid, None)
            self._walk(pub, want)
        for pid in [p for p in self._publishers if p not in live]:
            del self._publishers[pid]
        for pid in [p for p in self._checked if p not in live]:
            del self._checked[pid]
        self._sync(want)
        self._unallocated, self._unallocated_now = self._unallocated_now, set()
        self._read_stats()

    def _syms(self, pid: int, m: _Mapped, names: set[bytes]) -> dict[bytes, tuple[int, int]]:
        def read(fd: int) -> dict[bytes, tuple[int, int]]:
            found = dynamic_symbols(fd, names)
            found[b"\x00et"] = (_e_type(fd), 0)
            return found

        return mapped_file_read(pid, m.start, m.end, m.path, (m.path, m.key[0], m.key[1]), self._files, read,
                                (elf.ElfError, OSError), MAX_FILES, {})

    def _discover(self, pid: int, st: bytes) -> _Publisher | None:
        """The process's publishing module and thread lists, None if it does not publish."""
        try:
            files = _mapped_files(pid)
        except OSError:
            return None
        names = _LIBC_SYMS | _LD_SYMS | {SYMBOL}
        module = libc = ld = None
        syms: dict[str, dict[bytes, tuple[int, int]]] = {}
        for path, m in files.items():
            found = self._syms(pid, m, names)
            syms[path] = found
            if SYMBOL in found and found[SYMBOL][1] == _STT_TLS and module is None:
                module = m
            if b"_thread_db_pthread_list" in found:
                libc = m
            if b"_rtld_global" in found:
                ld = m
        if module is None:
            return None
        if libc is None or ld is None:
            self.count("no_thread_db", 1)
            return None
        pub = _Publisher(pid, st)
        pub.exe = _exe(pid)
        pub.st_value = syms[module.path][SYMBOL][0]
        try:
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                rd = _reader(mem)
                for d in _DESCS:   # {bits, count, offset} in libc's memory
                    v = syms[libc.path].get(b"_thread_db_" + d)
                    if v is None:
                        raise LookupError(d)
                    pub.off[d] = _U32.unpack(rd(libc.start + v[0] + 8, 4))[0]
                rtld = ld.start + syms[ld.path][b"_rtld_global"][0]
                pub.lists = (rtld + pub.off[b"rtld_global__dl_stack_used"],
                             rtld + pub.off[b"rtld_global__dl_stack_user"])
                bias = 0 if syms[module.path].get(b"\x00et", (3, 0))[0] == 2 else module.start
                lm = _U64.unpack(rd(ld.start + syms[ld.path][b"_r_debug"][0] + _R_MAP, 8))[0]
                for _ in range(_MAX_MODULES):
                    if not lm:
                        break
                    if _U64.unpack(rd(lm, 8))[0] == bias:
                        pub.module_lm = lm
                        break
                    lm = _U64.unpack(rd(lm + _LM_NEXT, 8))[0]
        except (OSError, struct.error):
            self.count("unreadable_process", 1)
            return None
        except LookupError:
            self.count("no_thread_db", 1)
            return None
        if not pub.module_lm:
            self.count("no_module", 1)
            return None
        log.debug("thread_ctx: pid %d publishes %s in %s", pid, SYMBOL.decode(), module.path)
        return pub

    def _walk(self, pub: _Publisher, want: dict[int, int]) -> None:
        """pid_tgid -> slot of every thread of ``pub`` into ``want``."""
        o = pub.off
        try:
            with open(f"/proc/{pub.pid}/mem", "rb", buffering=0) as mem:
                rd = _reader(mem)
                # l_tls_offset is set when the module's TLS is first allocated: read it each pass
                pub.tls_offset = _I64.unpack(rd(pub.module_lm + o[b"link_map_l_tls_offset"], 8))[0]
                pub.modid = _U64.unpack(rd(pub.module_lm + o[b"link_map_l_tls_modid"], 8))[0]
                static = pub.tls_offset not in (_NO_TLS_OFFSET, _FORCED_DYNAMIC)
                for head in pub.lists:
                    node = _U64.unpack(rd(head, 8))[0]
                    n = 0
                    while node and node != head:
                        if n >= MAX_THREADS:
                            self.count("threads_limit", 1)
                            break
                        n += 1
                        pd = node - o[b"pthread_list"]
                        tid = _I64.unpack(rd(pd + o[b"pthread_tid"], 4) + b"\0" * 4)[0] & 0xFFFFFFFF
                        if 0 < tid < 1 << 31:
                            if static:
                                slot = pd - pub.tls_offset + pub.st_value
                            else:
                                dtv = _U64.unpack(rd(pd + o[b"pthread_dtvp"], 8))[0]
                                block = _U64.unpack(rd(dtv + 16 * pub.modid, 8))[0] if dtv and pub.modid else 0
                                if block in (0, _TLS_DTV_UNALLOCATED):
                                    key = (pub.pid << 32) | tid   # the thread never touched it: once
                                    self._unallocated_now.add(key)
                                    if key not in self._unallocated:
                                        self.count("tls_unallocated", 1)
                                    block = 0
                                slot = block + pub.st_value if block else 0
                            if slot:
                                if len(want) >= MAX_THREADS:
                                    self.count("threads_limit", 1)
                                    return
                                want[(pub.pid << 32) | tid] = slot
                        node = _U64.unpack(rd(node, 8))[0]
        except (OSError, struct.error):
            self.count("unreadable_process", 1)

    def _sync(self, want: dict[int, int]) -> None:
        from ..kernel.libbpf import lib

        so = lib()
        k, v = ctypes.c_uint64(), ctypes.c_uint64()
        for key in self._entries.keys() - want.keys():
            k.value = key
            so.bpf_map_delete_elem(self.slots_fd, ctypes.byref(k))
        for key, slot in want.items():
            if self._entries.get(key) == slot:
                continue
            k.value, v.value = key, slot
            if so.bpf_map_update_elem(self.slots_fd, ctypes.byref(k), ctypes.byref(v), 0) < 0:
                self.count("map_full", 1)
        self._entries = dict(want)

    def _read_stats(self) -> None:
        """The kernel's counts (thread_ctx_stats) since the last pass, into ``count``."""
        from ..kernel.libbpf import lib

        so = lib()
        k, v = ctypes.c_uint32(), ctypes.c_uint64()
        for i, reason in enumerate(STATS):
            k.value = i
            if so.bpf_map_lookup_elem(self.stats_fd, ctypes.byref(k), ctypes.byref(v)) == 0:
                if v.value > self._stats_seen[i]:
                    self.count(reason, v.value - self._stats_seen[i])
                self._stats_seen[i] = v.value

    def slots(self) -> dict[int, int]:
        """pid_tgid -> slot address last written (tests, diagnostics)."""
        return dict(self._entries)


def _reader(mem) -> Callable[[int, int], bytes]:   # type: ignore[no-untyped-def]
    fd = mem.fileno()

    def read(addr: int, size: int) -> bytes:
        b = os.pread(fd, size, addr)
        if len(b) != size:
            raise OSError(f"short read at {addr:#x}")
        return b
    return read


def _e_type(fd: int) -> int:
    head = os.pread(fd, 18, 0)
    return struct.unpack_from("<H", head, 16)[0] if len(head) == 18 else 0
