"""Request links: the thread -> request map the http program writes and the profiler reads.

The http program (``bpf/http.bpf.c``, built with ``-DREQ_LINKS=1``) sets ``req_links[tid]`` to a
span id it draws with ``bpf_get_prandom_u32`` when a server thread reads a request's first bytes,
and deletes it when the thread writes the response. That span id is the exported SERVER span's
id. The profiler (``bpf/profiler.bpf.c``, ``-DREQ_LINKS=1``) puts ``req_links[sampled tid]`` into
its aggregation key. The trace id is not in the kernel: the http source registers span id ->
trace id here when it parses the request head (the traceparent's trace id, else a random one),
and the profile converter resolves it.

The two programs are compiled separately, so they share the map by a bpffs pin: this module
creates the map and pins it (one path per agent process), BCC's ``BPF_TABLE_PINNED`` opens it in
both programs. A compile cache entry would create a fresh map instead of opening the pin, so
programs built with links are compiled without the cache (``compile_uncached``).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

BPF_MAP_TYPE_HASH = 1
MAX_THREADS = 16384          # threads serving a request at the same time
MAX_SPANS = 65536            # span id -> trace id entries kept for the converter
PIN_DIR = "/sys/fs/bpf"

_lock = threading.Lock()
_pin: str | None = None
_fd = -1
_traces: OrderedDict[int, bytes] = OrderedDict()


def pin_path() -> str:
    return f"{PIN_DIR}/ebpf_otlp_req_links_{os.getpid()}"


def ensure_map() -> str:
    """Creates and pins the map once per process; returns its pin path (``OSError`` if bpffs
    is not mounted or the kernel refuses)."""
    global _pin, _fd
    from ..kernel.libbpf import _check, lib, map_create

    with _lock:
        if _pin is not None:
            return _pin
        path = pin_path()
        if os.path.exists(path):
            os.unlink(path)            # a pin an earlier process with this pid left behind
        fd = map_create(BPF_MAP_TYPE_HASH, "req_links", 4, 8, MAX_THREADS, 0)
        try:
            _check(lib().bpf_obj_pin(fd, path.encode()), f"pinning the request link map at {path}")
        except OSError:
            os.close(fd)
            raise
        _pin, _fd = path, fd
        atexit.register(unpin)     # the programs hold the map; the pin is only the way to it
        return path


def cflags(probability: float = 1.0) -> list[str]:
    """The -D flags of both programs; ``probability``: the share of requests linked (the http
    program's; the profiler's ignores it)."""
    threshold = 0xFFFFFFFF if probability >= 1 else int(probability * 0xFFFFFFFF)
    return ["-DREQ_LINKS=1", f'-DREQ_LINKS_PIN="{ensure_map()}"', f"-DREQ_LINKS_MAX={MAX_THREADS}",
            f"-DREQ_LINKS_THRESHOLD={threshold}u"]


def unpin() -> None:
    global _pin, _fd
    with _lock:
        if _pin is not None:
            try:
                os.unlink(_pin)
            except OSError:
                pass
            os.close(_fd)
        _pin, _fd = None, -1


def register(span_id: int, trace_id: bytes) -> None:
    """The http source: the request with this kernel span id is in this trace."""
    with _lock:
        _traces[span_id] = trace_id
        _traces.move_to_end(span_id)
        if len(_traces) > MAX_SPANS:
            _traces.popitem(last=False)


# Requests and samples by what became of their link (ebpf_receiver_profiler_request_links_total):
# linked (server requests with a kernel span id), not_linked (not sampled by
# request_links_probability, or MAX_THREADS threads were serving), pipelined (several heads in
# one record: random ids, no link), unresolved (sample links whose span id the registry no longer
# held: exported without a link).
counts = {"linked": 0, "not_linked": 0, "pipelined": 0, "unresolved": 0}


def count(reason: str) -> None:
    counts[reason] += 1


def count_unresolved() -> None:
    count("unresolved")


def trace_of(span_id: int) -> bytes | None:
    with _lock:
        return _traces.get(span_id)


def compile_uncached(source_name: str, bpf_file: str, cflags: Sequence[str], programs: Sequence[Any],
                     includes: Sequence[str] = ()) -> Any:
    """``compile_bpf`` without the compile cache (see the module docstring)."""
    from ..kernel import compile_cache, loader
    from ..kernel.bcc import find_kernel_headers

    request: dict[str, Any] = {"source": source_name, "bpf_file": bpf_file, "cflags": list(cflags),
                               "includes": list(includes),
                               "programs": [[n, t, list(a) if a else None] for n, t, a in programs]}
    try:
        headers = find_kernel_headers(compile_cache.settings()["kernel_headers"])
    except (OSError, ValueError):
        headers = None
    if headers is not None:
        request["headers"] = list(headers)
    return loader._compile(request, time.monotonic())


def lookup_tid(tid: int) -> int:
    """The span id the kernel set for this thread, 0 if none (tests, diagnostics)."""
    from ..kernel.libbpf import lib

    with _lock:
        if _fd < 0:
            return 0
        k, v = ctypes.c_uint32(tid), ctypes.c_uint64(0)
        if lib().bpf_map_lookup_elem(_fd, ctypes.byref(k), ctypes.byref(v)) < 0:
            return 0
        return int(v.value)
