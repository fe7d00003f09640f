"""Compile and load a BPF program in a short-lived loader process, and take over its descriptors.

BCC's compiler (libbcc with libLLVM and libclang-cpp) costs ~100 MB of RSS in every process that
imports ``bcc``, and it is only needed until the programs are in the kernel. So the agent runs
``python -m receiver.kernel.loader`` per program: the loader compiles and loads with BCC (which
attaches the ``TRACEPOINT_PROBE``/``RAW_TRACEPOINT_PROBE`` programs), loads any extra programs it
is asked for (e.g. tail calls, stored into their program array), then sends a JSON description
of every map (types as BCC describes them) and every map, program and attachment descriptor over
a Unix socket (``SCM_RIGHTS``) and exits with ``os._exit``: BCC's cleanup would detach what the
agent now holds (its detach disables the shared perf events). A failure travels back as the
``SourceUnavailableError`` the loader raised, with its reason and fix.

The agent side (``compile_bpf``) returns a ``libbpf.BpfObject``; it never imports ``bcc``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SourceUnavailableError
from .libbpf import BpfObject

__all__ = ["compile_bpf", "Program"]

log = logging.getLogger(__name__)

# (function name, BCC program type name such as "PERF_EVENT", (program array map, index) or None)
Program = tuple[str, str, "tuple[str, int] | None"]
_LEN = struct.Struct("!I")
_FDS_PER_MESSAGE = 200        # SCM_MAX_FD is 253
LOADER_TIMEOUT_S = float(os.environ.get("EBPF_RECEIVER_LOADER_TIMEOUT", "600"))
FIX_LIBBPF = "apt-get install libbpf1 (python3-bpfcc depends on it)"
# Imports receiver.kernel without the package's __init__ (the public API pulls in gRPC and
# protobuf, which the loader does not need).
_BOOT = ("import sys, types; p = types.ModuleType('receiver'); p.__path__ = [sys.argv[1]]; "
         "sys.modules['receiver'] = p; from receiver.kernel.loader import serve; serve(int(sys.argv[2]))")


def compile_bpf(source_name: str, bpf_file: str, cflags: Sequence[str] = (),
                programs: Sequence[Program] = (), includes: Sequence[str] = (),
                pins: Mapping[str, str] | None = None) -> BpfObject:
    """Loads ``bpf/<bpf_file>`` (with ``includes``, ``bpf/`` headers inlined at its
    ``RUNTIME WALKERS`` line: see ``program_text``) and returns the object: from the compile
    cache when it holds this program for this kernel (no BCC, no loader process), else compiled
    in a loader process, which fills the cache. Raises ``SourceUnavailableError`` saying what is
    missing (BCC, the program file, kernel headers, the privilege to call bpf(), libbpf) or how
    the compile or load failed. ``pins``: map name -> bpffs path of each map the program opens
    with ``BPF_TABLE_PINNED`` (the pins must exist); a cache hit opens those pins."""
    from . import compile_cache
    from .bcc import bcc_version, find_kernel_headers, program_text
    from .libbpf import lib

    try:
        lib()
    except OSError as e:
        raise SourceUnavailableError(source_name, f"libbpf.so.1 cannot be loaded: {e}", FIX_LIBBPF) from None
    t0 = time.monotonic()
    request: dict[str, Any] = {"source": source_name, "bpf_file": bpf_file, "cflags": list(cflags),
                               "includes": list(includes),
                               "programs": [[n, t, list(a) if a else None] for n, t, a in programs],
                               "pins": dict(pins or {})}
    settings = compile_cache.settings()
    try:
        headers = find_kernel_headers(settings["kernel_headers"])
        text = program_text(bpf_file, includes)
    except (OSError, ValueError):
        headers, text = None, None     # the loader reports it as it always has
    if headers is not None:
        request["headers"] = list(headers)
    if text is None or not settings["directory"]:
        return _compile(request, t0)
    key, meta = compile_cache.cache_key(text, cflags, request["programs"], headers, bcc_version(), request["pins"])
    obj = _from_cache(source_name, key, meta, t0, pins=request["pins"])
    if obj is not None or headers is None:   # without headers, only the cache can load it
        return obj or _compile(request, t0)
    with compile_cache.locked(key):
        obj = _from_cache(source_name, key, meta, t0, count_miss=False,   # another agent may have filled it
                          pins=request["pins"])
        if obj is not None:
            return obj
        request["describe"] = True
        obj = _compile(request, t0)
        entry = obj.loader_info.pop("entry", None)
        if entry is not None:
            compile_cache.store(key, meta, entry)
        else:
            compile_cache.count("uncacheable")
            log.warning("source %s: %s cannot be cached: %s", source_name, bpf_file,
                        obj.loader_info.get("entry_error", "no entry"))
    return obj


def _from_cache(source_name: str, key: str, meta: dict[str, str], t0: float,
                count_miss: bool = True, pins: Mapping[str, str] | None = None) -> BpfObject | None:
    from . import compile_cache

    entry = compile_cache.lookup(key, meta, count_miss)
    if entry is None:
        return None
    try:
        maps, programs, attachments, attach, deferred = compile_cache.instantiate(entry, defer_tail_calls=True,
                                                                                  pins=pins)
    except (OSError, KeyError, ValueError, TypeError, IndexError) as e:
        compile_cache.count("load_failed")
        log.warning("source %s: the cached programs did not load (%s): compiling", source_name, e)
        return None
    obj = BpfObject(maps, programs, attachments)
    obj.attach_points = attach
    if deferred:   # tail-called walkers: verified while the program already samples
        compile_cache.load_deferred(obj, entry, deferred)
    obj.loader_info = {"pid": os.getpid(), "seconds": time.monotonic() - t0, "peak_mb": 0.0, "steps": {},
                       "cache": "hit", "key": key}
    log.info("source %s: loaded from the compile cache in %.2fs (%s)", source_name, obj.loader_info["seconds"],
             key[:12])
    return obj


def _compile(request: dict[str, Any], t0: float) -> BpfObject:
    """Compiles and loads in a loader process and takes over its descriptors."""
    source_name, bpf_file = request["source"], request["bpf_file"]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    package_dir = str(Path(__file__).resolve().parents[1])
    try:
        proc = subprocess.Popen([sys.executable, "-c", _BOOT, package_dir, str(theirs.fileno())],
                                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
    except OSError as e:
        ours.close()
        theirs.close()
        raise SourceUnavailableError(source_name, f"cannot start the loader process: {e}") from e
    theirs.close()
    try:
        ours.settimeout(LOADER_TIMEOUT_S)
        _send(ours, request)
        reply, fds = _receive(ours)
    except (OSError, ValueError, EOFError) as e:
        proc.kill()
        rc = proc.wait()
        raise SourceUnavailableError(source_name, f"the loader process failed (exit status {rc}) before "
                                     f"handing over {bpf_file}: {e}") from None
    finally:
        ours.close()
    proc.wait()
    if not reply.get("ok"):
        for fd in fds:
            os.close(fd)
        err = reply.get("error", {})
        raise SourceUnavailableError(err.get("source", source_name), err.get("reason", "the loader failed"),
                                     err.get("fix", ""))
    maps, names = reply["maps"], reply["programs"]
    if len(fds) != len(maps) + len(names) + reply["attachments"]:
        for fd in fds:
            os.close(fd)
        raise SourceUnavailableError(source_name, "the loader handed over a wrong number of descriptors")
    obj = BpfObject(list(zip(maps, fds, strict=False)), dict(zip(names, fds[len(maps):], strict=False)),
                    fds[len(maps) + len(names):])
    obj.attach_points = reply.get("attach", [])
    obj.loader_info = {"pid": proc.pid, "seconds": time.monotonic() - t0, "peak_mb": reply.get("peak_mb", 0.0),
                       "steps": reply.get("seconds", {}), "cache": "miss" if request.get("describe") else "off"}
    if "entry" in reply:
        obj.loader_info["entry"] = reply["entry"]
    if "entry_error" in reply:
        obj.loader_info["entry_error"] = reply["entry_error"]
    log.info("source %s: %s compiled and loaded by loader process %d in %.1fs (%s; loader peak RSS %.0f MB)",
             source_name, bpf_file, proc.pid, obj.loader_info["seconds"],
             ", ".join(f"{k} {v:.1f}s" for k, v in obj.loader_info["steps"].items()), obj.loader_info["peak_mb"])
    return obj


# ------------------------------------------------------------------ framing

def _send(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Length-prefixed JSON, then the descriptors in messages of one byte each."""
    data = json.dumps(msg).encode()
    sock.sendall(_LEN.pack(len(data)) + data)
    for i in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"F"], list(fds[i:i + _FDS_PER_MESSAGE]))


def _exactly(sock: socket.socket, n: int) -> bytes:
    # Never reads past the JSON: a plain recv of a byte carrying descriptors would drop them.
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the loader closed the connection")
        buf += chunk
    return bytes(buf)


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    (n,) = _LEN.unpack(_exactly(sock, _LEN.size))
    msg = json.loads(_exactly(sock, n))
    want = len(msg.get("maps", ())) + len(msg.get("programs", ())) + msg.get("attachments", 0)
    fds: list[int] = []
    try:
        while len(fds) < want:
            data, got, _flags, _addr = socket.recv_fds(sock, 1, _FDS_PER_MESSAGE)
            if not data:
                raise EOFError(f"the loader closed the connection after {len(fds)} of {want} descriptors")
            fds.extend(got)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return msg, fds


# ------------------------------------------------------------------ the loader process

def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _describe_maps(bpf: Any) -> list[tuple[dict[str, Any], int]]:
    """Every map of the module: its description (as BCC keeps it) and descriptor."""
    import ctypes

    from bcc.libbcc import lib

    fns = {"bpf_num_tables": (ctypes.c_size_t, [ctypes.c_void_p]),
           "bpf_table_name": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t])}
    for name in ("fd", "type", "max_entries", "key_size", "leaf_size"):
        fns[f"bpf_table_{name}_id"] = (ctypes.c_longlong if "size" in name or name == "max_entries"
                                       else ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t])
    for name in ("key_desc", "leaf_desc"):
        fns[f"bpf_table_{name}_id"] = (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t])
    for fn, (res, args) in fns.items():
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    out = []
    for i in range(lib.bpf_num_tables(bpf.module)):
        key_desc = (lib.bpf_table_key_desc_id(bpf.module, i) or b"").decode()
        leaf_desc = (lib.bpf_table_leaf_desc_id(bpf.module, i) or b"").decode()
        spec = {"name": lib.bpf_table_name(bpf.module, i).decode(), "type": lib.bpf_table_type_id(bpf.module, i),
                "key_size": lib.bpf_table_key_size_id(bpf.module, i),
                "value_size": lib.bpf_table_leaf_size_id(bpf.module, i),
                "max_entries": lib.bpf_table_max_entries_id(bpf.module, i),
                "key_desc": json.loads(key_desc) if key_desc else None,
                "leaf_desc": json.loads(leaf_desc) if leaf_desc else None}
        fd = lib.bpf_table_fd_id(bpf.module, i)
        if fd >= 0:
            out.append((spec, fd))
    return out


def _load(req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    import ctypes

    from .bcc import compile_in_process, load_bcc

    source = req["source"]
    t0 = time.monotonic()
    bpf = compile_in_process(source, req["bpf_file"], req["cflags"], req.get("includes", ()), req.get("headers"))
    timing = {"compile": round(time.monotonic() - t0, 2)}
    bcc = load_bcc()
    for name, prog_type, array in req["programs"]:
        t0 = time.monotonic()
        try:
            fn = bpf.load_func(name.encode(), getattr(bcc.BPF, prog_type))
        except Exception as e:
            raise SourceUnavailableError(source, f"the kernel rejected the {source} program {name}: {e}") from e
        timing[name] = round(time.monotonic() - t0, 2)
        if array:
            bpf[array[0]][ctypes.c_int(array[1])] = ctypes.c_int(fn.fd)
    maps = _describe_maps(bpf)
    programs = {k.decode(): f.fd for k, f in bpf.funcs.items()}
    attachments = [*bpf.tracepoint_fds.values(), *bpf.raw_tracepoint_fds.values()]
    attach = [["tracepoint", k.decode() if isinstance(k, bytes) else k] for k in bpf.tracepoint_fds] + \
             [["raw_tracepoint", k.decode() if isinstance(k, bytes) else k] for k in bpf.raw_tracepoint_fds]
    msg = {"ok": True, "maps": [s for s, _ in maps], "programs": list(programs),
           "attachments": len(attachments), "attach": attach, "peak_mb": _peak_mb(), "seconds": timing}
    if req.get("describe"):
        try:
            msg["entry"] = _entry(bpf, req, maps, programs)
        except Exception as e:   # noqa: BLE001 -- the programs are loaded: only the cache misses out
            msg["entry_error"] = f"{type(e).__name__}: {e}"
    return msg, [fd for _, fd in maps] + list(programs.values()) + attachments


def _entry(bpf: Any, req: dict[str, Any], maps: list[tuple[dict[str, Any], int]],
           programs: dict[str, int]) -> dict[str, Any]:
    """What a compile cache entry holds (``compile_cache``): each program's instructions as BCC
    loaded them, with the map descriptors in them replaced by map indices; each map's spec with
    the kernel's own flags; the program arrays filled and the tracepoints attached, in order."""
    import base64
    import ctypes

    from bcc.libbcc import lib as bcclib

    from .compile_cache import unbind_maps
    from .libbpf import map_info, prog_info

    for fn, res in (("bpf_function_start", ctypes.c_void_p), ("bpf_function_size", ctypes.c_size_t),
                    ("bpf_module_license", ctypes.c_char_p), ("bpf_module_kern_version", ctypes.c_uint)):
        getattr(bcclib, fn).restype = res
    bcclib.bpf_function_start.argtypes = bcclib.bpf_function_size.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    bcclib.bpf_module_license.argtypes = bcclib.bpf_module_kern_version.argtypes = [ctypes.c_void_p]
    map_fds = {fd: i for i, (_, fd) in enumerate(maps)}
    pinned = req.get("pins") or {}
    specs = []
    for spec, fd in maps:
        info = map_info(fd)
        specs.append({**spec, "flags": info["flags"], "type": info["type"], "key_size": info["key_size"],
                      "value_size": info["value_size"], "max_entries": info["max_entries"]})
        if spec["name"] in pinned:   # opened by its pin (BPF_TABLE_PINNED): a hit opens it again
            specs[-1]["pinned"] = True
    progs = []
    for name, fd in programs.items():
        start = bcclib.bpf_function_start(bpf.module, name.encode())
        size = bcclib.bpf_function_size(bpf.module, name.encode())
        if not start or not size:
            raise ValueError(f"BCC has no instructions for {name}")
        insns, relocs = unbind_maps(ctypes.string_at(start, size), map_fds)
        progs.append({"name": name, "type": prog_info(fd)["type"], "insns": base64.b64encode(insns).decode(),
                      "relocs": relocs})
    arrays = [[a[0], a[1], name] for name, _t, a in req["programs"] if a]
    attach = [["tracepoint", k.decode() if isinstance(k, bytes) else k,
               "tracepoint__" + (k.decode() if isinstance(k, bytes) else k).replace(":", "__")]
              for k in bpf.tracepoint_fds] + \
             [["raw_tracepoint", k.decode() if isinstance(k, bytes) else k,
               "raw_tracepoint__" + (k.decode() if isinstance(k, bytes) else k)] for k in bpf.raw_tracepoint_fds]
    return {"maps": specs, "programs": progs, "license": (bcclib.bpf_module_license(bpf.module) or b"GPL").decode(),
            "kern_version": int(bcclib.bpf_module_kern_version(bpf.module)), "prog_arrays": arrays, "attach": attach}


def serve(fd: int) -> None:
    """The loader process: one request, one reply, then ``os._exit`` without BCC's cleanup."""
    logging.basicConfig(level=logging.WARNING, format="loader: %(levelname)s %(message)s")
    sock = socket.socket(fileno=fd)
    rc = 0
    try:
        (n,) = _LEN.unpack(_exactly(sock, _LEN.size))
        req = json.loads(_exactly(sock, n))
        try:
            msg, fds = _load(req)
        except SourceUnavailableError as e:
            msg, fds = {"ok": False, "error": {"source": e.source, "reason": e.reason, "fix": e.fix}}, []
        except Exception as e:   # noqa: BLE001 -- whatever it was, the agent must hear it
            msg, fds = {"ok": False, "error": {"source": req.get("source", "bcc"),
                                               "reason": f"{type(e).__name__}: {e}"}}, []
        _send(sock, msg, fds)
    except BaseException:   # noqa: BLE001 -- nothing to tell the agent anymore; it sees EOF
        logging.getLogger(__name__).exception("loader failed")
        rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
