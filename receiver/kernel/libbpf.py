"""Maps, ring buffers and perf events of BPF programs that a loader process compiled and loaded
(``kernel.loader``), used through file descriptors with Debian's ``libbpf.so.1`` (``libbpf1``,
which ``libbpfcc`` depends on) over ctypes. The agent never imports ``bcc``: that maps BCC's
compiler (libLLVM, libclang-cpp, ~100 MB) into the process for good.

``BpfObject`` offers the part of BCC's ``BPF`` API the sources use (``obj["map"]`` tables with
``Key``/``Leaf`` ctypes types decoded as BCC decodes them, ``open_ring_buffer``,
``ring_buffer_consume``, per-CPU perf events, ``cleanup``), so source code reads as before.
Closing its descriptors detaches and unloads everything: nothing else holds them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

__all__ = ["lib", "BpfObject", "Table", "decode_type", "possible_cpus", "online_cpus", "MapSpec", "map_create",
           "prog_load", "map_info", "prog_info", "attach_tracepoint", "attach_raw_tracepoint", "update_int"]

# enum bpf_map_type (uapi/linux/bpf.h)
HASH, ARRAY, PROG_ARRAY, PERF_EVENT_ARRAY, PERCPU_HASH, PERCPU_ARRAY, STACK_TRACE = 1, 2, 3, 4, 5, 6, 7
LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE, RINGBUF = 9, 10, 11, 27
_ARRAYS = {ARRAY, PROG_ARRAY, PERF_EVENT_ARRAY, PERCPU_ARRAY}
_PERCPU = {PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH}
# Class names as BCC's (tests and logs name them).
_CLASS_NAMES = {HASH: "HashTable", ARRAY: "Array", PROG_ARRAY: "ProgArray", PERF_EVENT_ARRAY: "PerfEventArray",
                PERCPU_HASH: "PerCpuHash", PERCPU_ARRAY: "PerCpuArray", STACK_TRACE: "StackTrace",
                LRU_HASH: "LruHash", LRU_PERCPU_HASH: "LruPerCpuHash", LPM_TRIE: "LpmTrie", RINGBUF: "RingBuf"}
BATCH_CHUNK = 4096        # entries per batch call: bounds the buffers whatever max_entries is

_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_VP, _U32P = ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)


@cache
def lib() -> Any:
    """``libbpf.so.1`` with the prototypes used here; ``OSError`` when it is not installed."""
    so = ctypes.CDLL("libbpf.so.1", use_errno=True)
    for name, res, args in (
            ("bpf_map_lookup_elem", ctypes.c_int, [ctypes.c_int, _VP, _VP]),
            ("bpf_map_update_elem", ctypes.c_int, [ctypes.c_int, _VP, _VP, ctypes.c_uint64]),
            ("bpf_map_delete_elem", ctypes.c_int, [ctypes.c_int, _VP]),
            ("bpf_map_get_next_key", ctypes.c_int, [ctypes.c_int, _VP, _VP]),
            ("bpf_map_lookup_batch", ctypes.c_int, [ctypes.c_int, _VP, _VP, _VP, _VP, _U32P, _VP]),
            ("bpf_map_lookup_and_delete_batch", ctypes.c_int, [ctypes.c_int, _VP, _VP, _VP, _VP, _U32P, _VP]),
            ("bpf_map_update_batch", ctypes.c_int, [ctypes.c_int, _VP, _VP, _U32P, _VP]),
            ("ring_buffer__new", _VP, [ctypes.c_int, _SAMPLE_FN, _VP, _VP]),
            ("ring_buffer__add", ctypes.c_int, [_VP, ctypes.c_int, _SAMPLE_FN, _VP]),
            ("ring_buffer__poll", ctypes.c_int, [_VP, ctypes.c_int]),
            ("ring_buffer__consume", ctypes.c_int, [_VP]),
            ("ring_buffer__free", None, [_VP]),
            ("bpf_map_create", ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                                              ctypes.c_uint32, _VP]),
            ("bpf_prog_load", ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, _VP, ctypes.c_size_t,
                                             _VP]),
            ("bpf_obj_get_info_by_fd", ctypes.c_int, [ctypes.c_int, _VP, _U32P]),
            ("bpf_btf_load", ctypes.c_int, [_VP, ctypes.c_size_t, _VP]),
            ("bpf_raw_tracepoint_open", ctypes.c_int, [ctypes.c_char_p, ctypes.c_int])):
        fn = getattr(so, name)
        fn.restype, fn.argtypes = res, args
    return so


def _cpus(path: str) -> list[int]:
    out: list[int] = []
    with open(path) as f:
        text = f.read()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


@cache
def possible_cpus() -> int:
    """Slots of a per-CPU map value (the kernel copies one per possible CPU)."""
    return len(_cpus("/sys/devices/system/cpu/possible"))


def online_cpus() -> list[int]:
    return _cpus("/sys/devices/system/cpu/online")


# ------------------------------------------------------------------ BCC's type descriptions

_CTYPES = {"_Bool": ctypes.c_bool, "char": ctypes.c_char, "wchar_t": ctypes.c_wchar,
           "unsigned char": ctypes.c_ubyte, "short": ctypes.c_short, "unsigned short": ctypes.c_ushort,
           "int": ctypes.c_int, "unsigned int": ctypes.c_uint, "long": ctypes.c_long,
           "unsigned long": ctypes.c_ulong, "long long": ctypes.c_longlong,
           "unsigned long long": ctypes.c_ulonglong, "float": ctypes.c_float, "double": ctypes.c_double,
           "long double": ctypes.c_longdouble, "__int128": ctypes.c_int64 * 2,
           "unsigned __int128": ctypes.c_uint64 * 2}


def decode_type(desc: Any) -> Any:
    """The ctypes type of a BCC key/leaf description (JSON from libbcc's ``bpf_table_*_desc``),
    built exactly as ``bcc.BPF._decode_table_type`` builds it."""
    if isinstance(desc, str):
        return _CTYPES[desc]
    anon: list[str] = []
    fields: list[tuple[Any, ...]] = []
    for t in desc[1]:
        if len(t) == 2:
            fields.append((t[0], decode_type(t[1])))
        elif len(t) == 3 and isinstance(t[2], list):
            fields.append((t[0], decode_type(t[1]) * t[2][0]))
        elif len(t) == 3 and isinstance(t[2], int):
            fields.append((t[0], decode_type(t[1]), t[2]))
        elif len(t) == 3 and t[2] in ("union", "struct", "struct_packed"):
            name = t[0] or f"__anon{len(anon)}"
            if not t[0]:
                anon.append(name)
            fields.append((name, decode_type(t)))
        else:
            raise ValueError(f"cannot decode BCC type {t!r}")
    kind = desc[2] if len(desc) > 2 else "struct"
    base = ctypes.Union if kind == "union" else ctypes.Structure
    attrs: dict[str, Any] = {"_anonymous_": anon, "_fields_": fields}
    if kind == "struct_packed":
        attrs["_pack_"] = 1
    return type(str(desc[0]), (base,), attrs)


def _raw(size: int) -> Any:
    return ctypes.c_ubyte * size


# ------------------------------------------------------------------ maps

MapSpec = dict[str, Any]   # name, type, key_size, value_size, max_entries, key_desc, leaf_desc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class Table:
    """One map by fd, with BCC's ``Table`` manners: ``t[key]`` (``KeyError`` when absent),
    ``t[key] = leaf``, ``del t[key]``, ``keys()``, ``items()``, batch reads; per-CPU maps read as
    one value per possible CPU."""

    def __init__(self, owner: "BpfObject", spec: MapSpec, fd: int):
        self._owner = owner
        self.name: str = spec["name"]
        self.map_fd = fd
        self.map_type: int = spec["type"]
        self.max_entries: int = spec["max_entries"]
        self.Key = self._decoded(spec.get("key_desc"), spec["key_size"])
        self.sLeaf = self._decoded(spec.get("leaf_desc"), spec["value_size"])
        self.Leaf = self.sLeaf
        self._percpu_narrow = False
        if self.map_type in _PERCPU:
            n = possible_cpus()
            if ctypes.sizeof(self.sLeaf) % 8 == 0:
                self.Leaf = self.sLeaf * n
            else:   # as BCC: 4-byte ints widened to the kernel's 8-byte per-CPU slots
                wide = {ctypes.c_uint: ctypes.c_uint64, ctypes.c_int: ctypes.c_int64}.get(self.sLeaf)
                self.Leaf = (wide or _raw((ctypes.sizeof(self.sLeaf) + 7) // 8 * 8)) * n
                self._percpu_narrow = True

    @staticmethod
    def _decoded(desc: Any, size: int) -> Any:
        try:
            t = decode_type(desc) if desc else None
        except (ValueError, KeyError):
            t = None
        if t is None or ctypes.sizeof(t) != size:
            return _raw(size)
        return t

    def _value(self, leaf: Any) -> Any:
        if not self._percpu_narrow:
            return leaf
        n = len(leaf)
        out = (self.sLeaf * n)()
        for i in range(n):
            out[i] = leaf[i]
        return out

    def _key(self, key: Any) -> Any:
        return self.Key(key) if isinstance(key, int) else key   # BCC takes array indices as ints

    def __getitem__(self, key: Any) -> Any:
        key = self._key(key)
        leaf = self.Leaf()
        ret = lib().bpf_map_lookup_elem(self.map_fd, ctypes.byref(key), ctypes.byref(leaf))
        if ret < 0:
            raise KeyError(key)
        return self._value(leaf)

    def __setitem__(self, key: Any, leaf: Any) -> None:
        key = self._key(key)
        _check(lib().bpf_map_update_elem(self.map_fd, ctypes.byref(key), ctypes.byref(leaf), 0),
               f"update of map {self.name}")

    def __delitem__(self, key: Any) -> None:
        key = self._key(key)
        if lib().bpf_map_delete_elem(self.map_fd, ctypes.byref(key)) < 0:
            raise KeyError(key)

    def __contains__(self, key: Any) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def keys(self) -> Iterator[Any]:
        """Every key (``bpf_map_get_next_key``); arrays yield every index."""
        get_next = lib().bpf_map_get_next_key
        prev = None
        while True:
            key = self.Key()
            if get_next(self.map_fd, None if prev is None else ctypes.byref(prev), ctypes.byref(key)) < 0:
                return
            yield key
            prev = key

    __iter__ = keys

    def items(self) -> list[tuple[Any, Any]]:
        out = []
        for k in self.keys():
            try:
                out.append((k, self[k]))
            except KeyError:   # deleted meanwhile
                continue
        return out

    def values(self) -> list[Any]:
        return [v for _, v in self.items()]

    def clear(self) -> None:
        """Hash maps: every entry deleted; arrays: every slot zeroed (they cannot delete)."""
        if self.map_type in _ARRAYS:
            zero = self.Leaf()
            for k in list(self.keys()):
                self[k] = zero
            return
        for k in list(self.keys()):
            try:
                del self[k]
            except KeyError:
                pass

    def items_lookup_batch(self) -> Iterator[tuple[Any, Any]]:
        return self._batch(lib().bpf_map_lookup_batch)

    def items_lookup_and_delete_batch(self) -> Iterator[tuple[Any, Any]]:
        return self._batch(lib().bpf_map_lookup_and_delete_batch)

    def items_update_batch(self, keys: Any, values: Any) -> None:
        """Writes ctypes arrays of keys and values in one call (kernel 5.6+; ``OSError`` without)."""
        count = ctypes.c_uint32(len(keys))
        _check(lib().bpf_map_update_batch(self.map_fd, keys, values, ctypes.byref(count), None),
               f"batch update of map {self.name}")

    def _batch(self, fn: Any) -> Iterator[tuple[Any, Any]]:
        """All entries in batches of at most ``BATCH_CHUNK`` (kernel 5.6+); raises ``OSError``
        where the kernel or map type has no batch operations."""
        chunk = max(1, min(self.max_entries, BATCH_CHUNK))
        token_size = max(ctypes.sizeof(self.Key), 8)
        token_in, token_out = ctypes.create_string_buffer(token_size), ctypes.create_string_buffer(token_size)
        count = ctypes.c_uint32()
        first, done, total = True, False, 0
        while not done and total < self.max_entries:
            keys, values = (self.Key * chunk)(), (self.Leaf * chunk)()
            count.value = chunk
            ret = fn(self.map_fd, None if first else token_in, token_out, keys, values, ctypes.byref(count), None)
            if ret < 0 and -ret != errno.ENOENT:
                raise OSError(-ret, f"batch read of map {self.name}: {os.strerror(-ret)}")
            done = ret < 0 or count.value == 0
            n = count.value
            total += n
            ctypes.memmove(token_in, token_out, token_size)
            first = False
            for i in range(n):
                yield keys[i], self._value(values[i])

    def open_ring_buffer(self, callback: Callable[[Any, int, int], Any]) -> None:
        self._owner._add_ring_buffer(self.map_fd, callback)


_TABLE_CLASSES = {t: type(name, (Table,), {}) for t, name in _CLASS_NAMES.items()}


class BpfObject:
    """Programs, maps and attachments handed over by a loader, as descriptors this process
    owns; ``cleanup()`` closes them all (detaching and unloading) and is safe twice."""

    def __init__(self, maps: list[tuple[MapSpec, int]], programs: dict[str, int], attachments: list[int]):
        self.tables = {spec["name"]: _TABLE_CLASSES.get(spec["type"], Table)(self, spec, fd) for spec, fd in maps}
        self.programs = dict(programs)
        self._attachments = list(attachments)
        self._perf_events: dict[tuple[int, int], list[int]] = {}
        self._ringbuf: int | None = None
        self._callbacks: list[Any] = []
        self.loader_info: dict[str, Any] = {}
        self.attach_points: list[list[str]] = []   # [kind, point] of each attachment, in order
        self.lock = threading.Lock()   # programs loaded later (compile_cache.load_deferred) vs cleanup
        self.deferred: threading.Thread | None = None   # that later load, while it runs

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Whether every program is in place (a deferred load done) within ``timeout`` seconds."""
        t = self.deferred
        if t is not None:
            t.join(timeout)
        return t is None or not t.is_alive()

    def __getitem__(self, name: str | bytes) -> Table:
        key = name.decode() if isinstance(name, bytes) else name
        return self.tables[key]

    def __contains__(self, name: str) -> bool:
        return name in self.tables

    def prog_fd(self, name: str | bytes) -> int:
        return self.programs[name.decode() if isinstance(name, bytes) else name]

    # ------------------------------------------------------------------ ring buffers

    def _add_ring_buffer(self, map_fd: int, callback: Callable[[Any, int, int], Any]) -> None:
        def sample(ctx: Any, data: int, size: int) -> int:
            ret = callback(ctx, data, size)
            return int(ret) if ret is not None else 0

        fn = _SAMPLE_FN(sample)
        self._callbacks.append(fn)   # ctypes callbacks must outlive libbpf's use of them
        if self._ringbuf is None:
            rb = lib().ring_buffer__new(map_fd, fn, None, None)
            if not rb:
                err = ctypes.get_errno()
                raise OSError(err, f"cannot open the ring buffer: {os.strerror(err)}")
            self._ringbuf = rb
        else:
            _check(lib().ring_buffer__add(self._ringbuf, map_fd, fn, None), "ring_buffer__add")

    def ring_buffer_consume(self) -> None:
        if self._ringbuf is not None:
            _check(lib().ring_buffer__consume(self._ringbuf), "ring_buffer__consume")

    def ring_buffer_poll(self, timeout_ms: int = -1) -> None:
        if self._ringbuf is not None:
            _check(lib().ring_buffer__poll(self._ringbuf, timeout_ms), "ring_buffer__poll")

    # ------------------------------------------------------------------ perf events

    def attach_perf_event(self, ev_type: int, ev_config: int, fn_name: str | bytes, sample_freq: int) -> None:
        """One perf event per online CPU running program ``fn_name`` at ``sample_freq`` Hz (as
        BCC's ``attach_perf_event`` with ``cpu=-1``); all or none."""
        prog = self.prog_fd(fn_name)
        fds: list[int] = []
        try:
            for cpu in online_cpus():
                fds.append(perf_event_open_bpf(ev_type, ev_config, sample_freq, cpu, prog))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._perf_events.setdefault((ev_type, ev_config), []).extend(fds)

    def detach_perf_event(self, ev_type: int, ev_config: int) -> None:
        for fd in self._perf_events.pop((ev_type, ev_config), []):
            os.close(fd)

    # ------------------------------------------------------------------ teardown

    def cleanup(self) -> None:
        with self.lock:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._ringbuf is not None:
            lib().ring_buffer__free(self._ringbuf)
            self._ringbuf = None
        fds = [fd for group in self._perf_events.values() for fd in group] + self._attachments
        fds += list(self.programs.values()) + [t.map_fd for t in self.tables.values()]
        self._perf_events, self._attachments, self.programs, self.tables = {}, [], {}, {}
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


# ------------------------------------------------------------------ perf_event_open

PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK = 1, 0
_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "ppc64le": 319, "s390x": 331}
_PERF_FLAG_FD_CLOEXEC = 8
_IOC_ENABLE, _IOC_SET_BPF = 0x2400, 0x40042408
_ATTR_SIZE = 112              # PERF_ATTR_SIZE_VER5: every kernel since 4.x takes it
_FREQ_BIT = 1 << 10           # perf_event_attr.freq, in the flags word at offset 40


def drain_hash_map(fd: int, key_size: int, buffers: tuple[Any, Any]) -> Iterator[tuple[Any, Any, int]]:
    """Empties a hash map with BPF_MAP_LOOKUP_AND_DELETE_BATCH into caller-kept raw buffers
    (``Table.items_lookup_and_delete_batch`` makes a ctypes object per entry, too slow for the
    profiler's drain), yielding (keys, values, count) per call; the next call overwrites them,
    so consume each before iterating on.
    Stops at the end of the map, or when a call makes no progress (a map written meanwhile)."""
    keys, values = buffers
    batch = len(keys) // key_size
    token = ctypes.c_uint64(0)   # a hash map's batch position (a bucket index)
    count = ctypes.c_uint32(0)
    first = True
    lookup_and_delete = lib().bpf_map_lookup_and_delete_batch
    while True:
        count.value = batch
        res = lookup_and_delete(fd, None if first else ctypes.byref(token), ctypes.byref(token),
                                keys, values, ctypes.byref(count), None)
        first = False
        if count.value:
            yield keys, values, count.value
        if res < 0:              # libbpf returns -errno
            if -res != errno.ENOENT:
                raise OSError(-res, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {os.strerror(-res)}")
            return
        if count.value == 0:
            return


def perf_event_open_bpf(ev_type: int, ev_config: int, sample_freq: int, cpu: int, prog_fd: int) -> int:
    """A perf event on ``cpu`` sampling at ``sample_freq`` Hz that runs ``prog_fd``, enabled (the
    calls libbcc's ``bpf_attach_perf_event`` makes)."""
    nr = _PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"perf_event_open: unknown syscall number on {platform.machine()}")
    attr = (ctypes.c_ubyte * _ATTR_SIZE)()
    ctypes.c_uint32.from_buffer(attr, 0).value = ev_type
    ctypes.c_uint32.from_buffer(attr, 4).value = _ATTR_SIZE
    ctypes.c_uint64.from_buffer(attr, 8).value = ev_config
    ctypes.c_uint64.from_buffer(attr, 16).value = sample_freq
    ctypes.c_uint64.from_buffer(attr, 40).value = _FREQ_BIT
    libc = _libc()
    fd = libc.syscall(ctypes.c_long(nr), ctypes.byref(attr), ctypes.c_long(-1), ctypes.c_long(cpu),
                      ctypes.c_long(-1), ctypes.c_ulong(_PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open on cpu {cpu}: {os.strerror(err)}")
    try:
        for req, arg in ((_IOC_SET_BPF, prog_fd), (_IOC_ENABLE, 0)):
            if libc.ioctl(fd, req, arg) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"perf event ioctl on cpu {cpu}: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


@cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_long]
    libc.ioctl.restype = ctypes.c_int
    return libc


# ------------------------------------------------------------------ creating maps and programs

class _MapCreateOpts(ctypes.Structure):   # struct bpf_map_create_opts (libbpf 1.0+)
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


class _ProgLoadOpts(ctypes.Structure):    # struct bpf_prog_load_opts up to log_buf (libbpf 1.0+)
    _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_ifindex", ctypes.c_uint32), ("kern_version", ctypes.c_uint32),
                ("attach_btf_id", ctypes.c_uint32), ("attach_prog_fd", ctypes.c_uint32),
                ("attach_btf_obj_fd", ctypes.c_uint32), ("fd_array", _VP), ("func_info", _VP),
                ("func_info_cnt", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("line_info", _VP), ("line_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32), ("log_buf", _VP)]


class _MapInfo(ctypes.Structure):          # the head of struct bpf_map_info (uapi)
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


class _ProgInfo(ctypes.Structure):         # the head of struct bpf_prog_info (uapi)
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_ubyte * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


_OBJ_NAME_LEN = 15   # BPF_OBJ_NAME_LEN less the NUL, as BCC truncates


# Local storage maps (sk, inode, task, cgroup) exist only with BTF for their key and value.
_NEEDS_BTF = {24, 28, 29, 32}


def _storage_btf(value_size: int) -> bytes:
    """The least BTF such a map takes: [1] int (the 4-byte key), [2] unsigned char,
    [3] unsigned char[value_size] (the value, opaque)."""
    import struct

    strings = b"\0int\0unsigned char\0"
    types = struct.pack("<IIII", 1, 1 << 24, 4, (1 << 24) | 32)          # INT "int", signed, 32 bits
    types += struct.pack("<IIII", 5, 1 << 24, 1, 8)                      # INT "unsigned char", 8 bits
    types += struct.pack("<IIIIII", 0, 3 << 24, 0, 2, 1, value_size)     # ARRAY of [2] indexed by [1]
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int) -> int:
    """A new map (libbpf ``bpf_map_create``); ``OSError`` with the kernel's reason."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    btf_fd = -1
    if map_type in _NEEDS_BTF:
        blob = _storage_btf(value_size)
        btf_fd = _check(lib().bpf_btf_load(blob, len(blob), None), f"loading BTF for map {name}")
        opts.btf_fd, opts.btf_key_type_id, opts.btf_value_type_id = btf_fd, 1, 3
    try:
        fd = lib().bpf_map_create(map_type, name[:_OBJ_NAME_LEN].encode(), key_size, value_size, max_entries,
                                  ctypes.byref(opts))
    finally:
        if btf_fd >= 0:
            os.close(btf_fd)   # the map holds its own reference
    return _check(fd, f"creating map {name}")


def prog_load(prog_type: int, name: str, license: str, insns: bytes, kern_version: int = 0) -> int:
    """Loads ``insns`` (``struct bpf_insn``s) with libbpf ``bpf_prog_load``; a rejection raises
    ``OSError`` with the verifier's log."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), kern_version=kern_version)
    fd = lib().bpf_prog_load(prog_type, name[:_OBJ_NAME_LEN].encode(), license.encode(), buf, len(insns) // 8,
                             ctypes.byref(opts))
    if fd >= 0:
        return int(fd)
    err = -fd if fd != -1 else ctypes.get_errno()
    log_buf = ctypes.create_string_buffer(1 << 20)   # load again for the verifier's reason
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), kern_version=kern_version, log_level=1,
                         log_size=len(log_buf), log_buf=ctypes.cast(log_buf, _VP))
    retry = lib().bpf_prog_load(prog_type, name[:_OBJ_NAME_LEN].encode(), license.encode(), buf, len(insns) // 8,
                                ctypes.byref(opts))
    if retry >= 0:
        return int(retry)
    tail = log_buf.value.decode(errors="replace").strip().splitlines()[-8:]
    raise OSError(err, f"loading program {name}: {os.strerror(err)}: " + " | ".join(tail))


def _info(fd: int, info: Any) -> Any:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return info


def map_info(fd: int) -> dict[str, Any]:
    """What the kernel says of a map: type, key_size, value_size, max_entries, flags, name, id."""
    i = _info(fd, _MapInfo())
    return {"type": i.type, "key_size": i.key_size, "value_size": i.value_size, "max_entries": i.max_entries,
            "flags": i.map_flags, "name": i.name.decode(errors="replace"), "id": i.id}


def prog_info(fd: int) -> dict[str, Any]:
    """What the kernel says of a program: type, name, id, tag (a hash of its instructions with
    map references blanked: equal tags, equal programs)."""
    i = _info(fd, _ProgInfo())
    return {"type": i.type, "name": i.name.decode(errors="replace"), "id": i.id, "tag": bytes(i.tag).hex(),
            "xlated_len": i.xlated_prog_len}


PERF_TYPE_TRACEPOINT = 2
_PERF_SAMPLE_RAW = 1 << 10


def attach_tracepoint(tracefs: str, tracepoint: str, prog_fd: int) -> int:
    """Runs ``prog_fd`` on ``category:name`` as libbcc's ``bpf_attach_tracepoint`` does: a
    tracepoint perf event on CPU 0 for every process, ``PERF_EVENT_IOC_SET_BPF``, enabled."""
    category, _, name = tracepoint.partition(":")
    with open(f"{tracefs}/events/{category}/{name}/id") as f:
        tp_id = int(f.read())
    nr = _PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"perf_event_open: unknown syscall number on {platform.machine()}")
    attr = (ctypes.c_ubyte * _ATTR_SIZE)()
    ctypes.c_uint32.from_buffer(attr, 0).value = PERF_TYPE_TRACEPOINT
    ctypes.c_uint32.from_buffer(attr, 4).value = _ATTR_SIZE
    ctypes.c_uint64.from_buffer(attr, 8).value = tp_id
    ctypes.c_uint64.from_buffer(attr, 16).value = 1                  # sample_period
    ctypes.c_uint64.from_buffer(attr, 24).value = _PERF_SAMPLE_RAW   # sample_type
    ctypes.c_uint32.from_buffer(attr, 48).value = 1                  # wakeup_events
    libc = _libc()
    fd = libc.syscall(ctypes.c_long(nr), ctypes.byref(attr), ctypes.c_long(-1), ctypes.c_long(0),
                      ctypes.c_long(-1), ctypes.c_ulong(_PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open for tracepoint {tracepoint}: {os.strerror(err)}")
    try:
        for req, arg in ((_IOC_SET_BPF, prog_fd), (_IOC_ENABLE, 0)):
            if libc.ioctl(fd, req, arg) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"attaching to tracepoint {tracepoint}: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    return int(fd)


def attach_raw_tracepoint(name: str, prog_fd: int) -> int:
    """Runs ``prog_fd`` on raw tracepoint ``name`` (``BPF_RAW_TRACEPOINT_OPEN``)."""
    return _check(lib().bpf_raw_tracepoint_open(name.encode(), prog_fd), f"attaching to raw tracepoint {name}")


def update_int(map_fd: int, key: int, value: int) -> None:
    """``map[key] = value`` for a map of 4-byte keys and values (a program array slot)."""
    k, v = ctypes.c_int(key), ctypes.c_int(value)
    _check(lib().bpf_map_update_elem(map_fd, ctypes.byref(k), ctypes.byref(v), 0), "update of a program array")
