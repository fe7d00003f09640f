"""Request links: the thread -> request maps the http program writes and the profiler reads.

The http program (``bpf/http.bpf.c``, built with ``-DREQ_LINKS=1``) sets ``req_links[tid]`` to a
span id it draws with ``bpf_get_prandom_u32`` when a server thread reads a request's first bytes,
and deletes it when the thread writes the response. That span id is the exported SERVER span's
id. The profiler (``bpf/profiler.bpf.c``, ``-DREQ_LINKS=1``) puts ``req_links[sampled tid]`` into
its aggregation key. The trace id is not in the kernel: the http source registers span id ->
trace id here when it parses the request head (the traceparent's trace id, else a random one),
and the profile converter resolves it.

OBI interop (docs/profiler.md#request-links): OBI and the OpenTelemetry eBPF profiler share
``<bpf.pin_path>/otel/traces_ctx_v1``, an LRU hash from ``pid_tgid`` (tgid << 32 | tid) to
``{u8 trace_id[16]; u8 span_id[8]}``; whoever starts first creates and pins it. With
``sources.profiler.traces_ctx_read`` the profiler links a sample whose thread has no link of ours
to that map's entry, and copies the entry's trace id into ``link_traces`` (span id -> trace id,
pinned per agent) where ``trace_of`` finds it. With ``sources.http.traces_ctx_write`` the http
source writes its server span's ids for the serving thread when it parses the request head
(``register``) and the http program deletes the entry when the thread writes the response.

The programs are compiled separately, so they share maps by bpffs pins: this module creates
(or, for ``traces_ctx_v1``, opens) them; BCC's ``BPF_TABLE_PINNED`` opens them in the programs,
and a compile cache hit opens the same pins (``pins()``, ``compile_cache.instantiate``).
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import threading
from collections import OrderedDict

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_LRU_HASH = 9
BPF_EXIST = 2
MAX_THREADS = 16384          # threads serving a request at the same time
MAX_SPANS = 65536            # span id -> trace id entries kept for the converter
TRACES_CTX_MAX = 1 << 14     # OBI's max_entries for traces_ctx_v1
TRACES_CTX = "traces_ctx_v1"
DEFAULT_PIN_DIR = "/sys/fs/bpf"

_lock = threading.Lock()
_pin_dir = DEFAULT_PIN_DIR
_pins: dict[str, str] = {}     # map name -> pin path, of the maps this process opened or made
_fds: dict[str, int] = {}
_owned: set[str] = set()      # pins this process made and removes at exit (not traces_ctx_v1)
_traces: OrderedDict[int, bytes] = OrderedDict()
_write = False


class TraceCtx(ctypes.Structure):
    """OBI's traces_ctx_v1 value."""
    _fields_ = [("trace_id", ctypes.c_uint8 * 16), ("span_id", ctypes.c_uint8 * 8)]


def configure(pin_dir: str | None = DEFAULT_PIN_DIR) -> None:
    """``bpf.pin_path``: the bpffs directory of the pins (OBI's ``$PINPATH``); the service calls
    it before any source starts."""
    global _pin_dir
    with _lock:
        _pin_dir = (pin_dir or DEFAULT_PIN_DIR).rstrip("/") or "/"


def pin_dir() -> str:
    with _lock:
        return _pin_dir


def pin_path(name: str = "req_links") -> str:
    if name == TRACES_CTX:
        return f"{pin_dir()}/otel/{TRACES_CTX}"
    return f"{pin_dir()}/ebpf_otlp_{name}_{os.getpid()}"


def _own_map(name: str, map_type: int, key_size: int, value_size: int, max_entries: int) -> str:
    """Creates and pins one of this process's maps once; returns its pin path (``OSError`` if
    bpffs is not mounted there or the kernel refuses)."""
    from ..kernel.libbpf import _check, lib, map_create

    with _lock:
        if name in _pins:
            return _pins[name]
    path = pin_path(name)
    with _lock:
        if name in _pins:
            return _pins[name]
        if os.path.exists(path):
            os.unlink(path)            # a pin an earlier process with this pid left behind
        fd = map_create(map_type, name, key_size, value_size, max_entries, 0)
        try:
            _check(lib().bpf_obj_pin(fd, path.encode()), f"pinning the {name} map at {path}")
        except OSError:
            os.close(fd)
            raise
        if not _owned:
            atexit.register(unpin)     # the programs hold the maps; the pins are only the way to them
        _pins[name], _fds[name] = path, fd
        _owned.add(name)
        return path


def ensure_map() -> str:
    """The thread -> span id map of this agent process (see the module docstring)."""
    return _own_map("req_links", BPF_MAP_TYPE_HASH, 4, 8, MAX_THREADS)


def ensure_traces_ctx() -> str:
    """Opens OBI's ``traces_ctx_v1`` pin, or creates and pins it where it does not exist yet
    (as OBI does); returns its path. ``OSError`` when the pin cannot be made or is a map of
    another shape (then it is not OBI's v1 map and is left alone)."""
    from ..kernel.libbpf import _check, lib, map_create, map_info

    path = pin_path(TRACES_CTX)
    with _lock:
        if TRACES_CTX in _pins:
            return _pins[TRACES_CTX]
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = lib().bpf_obj_get(path.encode())
        if fd < 0:
            err = ctypes.get_errno()
            if err != errno.ENOENT:
                raise OSError(err, f"opening {path}: {os.strerror(err)}")
            fd = map_create(BPF_MAP_TYPE_LRU_HASH, TRACES_CTX, 8, ctypes.sizeof(TraceCtx), TRACES_CTX_MAX, 0)
            if lib().bpf_obj_pin(fd, path.encode()) < 0:   # OBI may have pinned it meanwhile
                os.close(fd)
                fd = _check(lib().bpf_obj_get(path.encode()), f"opening {path}")
        info = map_info(fd)
        want = {"type": BPF_MAP_TYPE_LRU_HASH, "key_size": 8, "value_size": ctypes.sizeof(TraceCtx)}
        if any(info[k] != v for k, v in want.items()):
            os.close(fd)
            raise OSError(errno.EINVAL, f"{path} is not a traces_ctx_v1 map (type {info['type']}, key "
                                        f"{info['key_size']} B, value {info['value_size']} B; want LRU hash, 8, 24)")
        _pins[TRACES_CTX], _fds[TRACES_CTX] = path, fd
        return path


def ensure_link_traces() -> str:
    """Span id -> trace id of the traces_ctx_v1 entries the profiler linked samples to."""
    return _own_map("link_traces", BPF_MAP_TYPE_LRU_HASH, 8, 16, TRACES_CTX_MAX)


def _threshold(probability: float) -> int:
    return 0xFFFFFFFF if probability >= 1 else int(probability * 0xFFFFFFFF)


def cflags(probability: float = 1.0, write: bool = False) -> list[str]:
    """The http program's -D flags: ``probability``, the share of requests linked; ``write``:
    OBI's traces_ctx_v1 too (``sources.http.traces_ctx_write``)."""
    global _write
    flags = ["-DREQ_LINKS=1", f'-DREQ_LINKS_PIN="{ensure_map()}"', f"-DREQ_LINKS_MAX={MAX_THREADS}",
             f"-DREQ_LINKS_THRESHOLD={_threshold(probability)}u"]
    if write:
        flags += ["-DTRACES_CTX=1", f'-DTRACES_CTX_PIN="{ensure_traces_ctx()}"', f"-DTRACES_CTX_MAX={TRACES_CTX_MAX}"]
        _write = True
    return flags


def profiler_cflags(request_links: bool, read: bool, thread_ctx: bool = False,
                    pids: list[int] | None = None) -> list[str]:
    """The profiler's -D flags: our own links (``request_links``), OBI's (``read``), OTEP 4947
    thread contexts (``thread_ctx``: also starts their walker, over ``pids`` if given)."""
    flags = []
    if request_links:
        flags += ["-DREQ_LINKS=1", f'-DREQ_LINKS_PIN="{ensure_map()}"', f"-DREQ_LINKS_MAX={MAX_THREADS}"]
    if read:
        flags += ["-DTRACES_CTX=1", f'-DTRACES_CTX_PIN="{ensure_traces_ctx()}"', f"-DTRACES_CTX_MAX={TRACES_CTX_MAX}"]
    if thread_ctx:
        from . import thread_ctx as tc

        slots = _own_map("thread_ctx_slots", BPF_MAP_TYPE_HASH, 8, 8, tc.MAX_THREADS)
        stats = _own_map("thread_ctx_stats", BPF_MAP_TYPE_ARRAY, 4, 8, len(tc.STATS))
        flags += ["-DTHREAD_CTX=1", f'-DTHREAD_CTX_PIN="{slots}"', f"-DTHREAD_CTX_MAX={tc.MAX_THREADS}",
                  f'-DTHREAD_CTX_STATS_PIN="{stats}"']
        _start_thread_ctx(pids)
    if read or thread_ctx:
        flags += [f'-DLINK_TRACES_PIN="{ensure_link_traces()}"', f"-DLINK_TRACES_MAX={TRACES_CTX_MAX}"]
    return flags


_walker = None


def _start_thread_ctx(pids: list[int] | None) -> None:
    """The OTEP 4947 walker (receiver/profiling/thread_ctx.py), once per process."""
    global _walker
    from . import thread_ctx as tc

    with _lock:
        if _walker is not None:
            return
        for reason in tc.STATS + tc.WALK_REASONS:
            counts.setdefault("thread_ctx_" + reason, 0)
        _walker = tc.ThreadCtxWalker(_fds["thread_ctx_slots"], _fds["thread_ctx_stats"],
                                     lambda reason, n: count("thread_ctx_" + reason, n), pids=pids)
    _walker.start()


def note_thread_ctx_process(pid: int) -> None:
    """The profiler's first sample of a process: the walker looks at it now."""
    w = _walker
    if w is not None:
        w.note(pid)


def stop_thread_ctx() -> None:
    global _walker
    with _lock:
        w, _walker = _walker, None
    if w is not None:
        w.stop()


def pins() -> dict[str, str]:
    """Map name -> pin path of every pinned map made or opened so far (``compile_bpf(pins=)``)."""
    with _lock:
        return dict(_pins)


def unpin() -> None:
    """Stops the thread context walker, removes this process's own pins and closes every
    descriptor (traces_ctx_v1 stays pinned: it is shared with OBI and the OpenTelemetry eBPF
    profiler)."""
    global _write
    stop_thread_ctx()
    with _lock:
        for name, fd in _fds.items():
            if name in _owned:
                try:
                    os.unlink(_pins[name])
                except OSError:
                    pass
            os.close(fd)
        _pins.clear()
        _fds.clear()
        _owned.clear()
        _write = False


def register(span_id: int, trace_id: bytes, pid: int = 0, tid: int = 0) -> None:
    """The http source: the request with this kernel span id is in this trace (served by thread
    ``tid`` of process ``pid``: with traces_ctx_write, written to OBI's map for it)."""
    with _lock:
        _traces[span_id] = trace_id
        _traces.move_to_end(span_id)
        if len(_traces) > MAX_SPANS:
            _traces.popitem(last=False)
        if _write and pid and tid:
            _write_ctx(span_id, trace_id, pid, tid)


def _write_ctx(span_id: int, trace_id: bytes, pid: int, tid: int) -> None:
    """traces_ctx_v1[pid_tgid] = (trace, span) while req_links[tid] still holds this span. The
    kernel deletes the entry when the thread writes the response; a response written before this
    write (user space reads records up to 100 ms late) is caught by looking again after it."""
    from ..kernel.libbpf import lib

    so = lib()
    ctx_fd, links_fd = _fds[TRACES_CTX], _fds["req_links"]
    key = ctypes.c_uint64((pid << 32) | tid)
    value = TraceCtx()
    ctypes.memmove(value.trace_id, trace_id, 16)
    ctypes.memmove(value.span_id, span_id.to_bytes(8, "little"), 8)
    t, cur = ctypes.c_uint32(tid), ctypes.c_uint64(0)

    def serving() -> bool:
        return so.bpf_map_lookup_elem(links_fd, ctypes.byref(t), ctypes.byref(cur)) == 0 and cur.value == span_id

    if not serving():
        count("write_late")
        return
    if so.bpf_map_update_elem(ctx_fd, ctypes.byref(key), ctypes.byref(value), 0) < 0:
        count("write_failed")
        return
    if not serving():   # answered meanwhile: take back what the kernel could not delete
        have = TraceCtx()
        if so.bpf_map_lookup_elem(ctx_fd, ctypes.byref(key), ctypes.byref(have)) == 0 and \
                bytes(have.span_id) == bytes(value.span_id):
            so.bpf_map_delete_elem(ctx_fd, ctypes.byref(key))
        count("write_late")
        return
    count("written")


# Requests and samples by what became of their link (ebpf_receiver_profiler_request_links_total):
# linked (server requests with a kernel span id), not_linked (not sampled by
# request_links_probability, or MAX_THREADS threads were serving), pipelined (several heads in
# one record: random ids, no link), unresolved (sample links whose span id the registry no longer
# held: exported without a link); traces_ctx_v1 (sources.http.traces_ctx_write): written,
# write_late (the response was written before user space read the request), write_failed;
# OTEP 4947 thread contexts (sources.profiler.thread_ctx_read, receiver/profiling/thread_ctx.py):
# samples thread_ctx_linked, thread_ctx_unreadable (slot or record not readable in the sample),
# thread_ctx_invalid (valid neither 0 nor 1); walks: thread_ctx_no_thread_db (a publisher
# without glibc's thread_db descriptors), thread_ctx_no_module (its module not in the link map),
# thread_ctx_unreadable_process, thread_ctx_tls_unallocated (once per thread whose dynamic
# TLS block is not allocated yet), thread_ctx_threads_limit, thread_ctx_processes_limit,
# thread_ctx_map_full.
counts = {"linked": 0, "not_linked": 0, "pipelined": 0, "unresolved": 0,
          "written": 0, "write_late": 0, "write_failed": 0}


def count(reason: str, n: int = 1) -> None:
    counts[reason] = counts.get(reason, 0) + n


def count_unresolved() -> None:
    count("unresolved")


def trace_of(span_id: int) -> bytes | None:
    """The trace id of a sample's link: a request of ours, else a traces_ctx_v1 entry the
    profiler copied into ``link_traces``."""
    from ..kernel.libbpf import lib

    with _lock:
        trace = _traces.get(span_id)
        fd = _fds.get("link_traces", -1)
        if trace is not None or fd < 0:
            return trace
        k, v = ctypes.c_uint64(span_id), (ctypes.c_uint8 * 16)()
        if lib().bpf_map_lookup_elem(fd, ctypes.byref(k), ctypes.byref(v)) < 0:
            return None
        return bytes(v)


def lookup_tid(tid: int) -> int:
    """The span id the kernel set for this thread, 0 if none (tests, diagnostics)."""
    from ..kernel.libbpf import lib

    with _lock:
        fd = _fds.get("req_links", -1)
        if fd < 0:
            return 0
        k, v = ctypes.c_uint32(tid), ctypes.c_uint64(0)
        if lib().bpf_map_lookup_elem(fd, ctypes.byref(k), ctypes.byref(v)) < 0:
            return 0
        return int(v.value)
