"""The compile cache: what BCC produced for a program, stored once and loaded through libbpf.

A miss compiles in a loader process as always (``kernel.loader``) and that process also hands
back, for each program, the instructions BCC loaded (``bpf_function_start``), with every map
descriptor in them (``ld_imm64`` with ``BPF_PSEUDO_MAP_FD``) replaced by the map's index; each
map's spec (type, sizes, max_entries, the kernel's flags, name, BCC's key/leaf descriptions); the
program arrays it filled and the tracepoints it attached, in order; a map the program opens by
a bpffs pin (``BPF_TABLE_PINNED``, named in ``compile_bpf(pins=)``) is marked ``pinned``, and a
hit opens that pin (``BPF_OBJ_GET``) instead of creating a map. The agent stores that as an
entry. A hit needs neither BCC nor LLVM nor a loader process: the agent creates the maps
(``bpf_map_create``), writes their new descriptors into the instructions, loads the programs
(``bpf_prog_load``; the verifier checks them as it checked BCC's), fills the program arrays and
attaches (tracepoint perf events, raw tracepoints), all through ``libbpf``.

The key covers everything that changes the instructions: the program text after its ``bpf/``
includes, the cflags and extra programs, the kernel release and build, the format files of the
tracepoints the program uses, the header tree (its path and generated headers), BCC's version
and this format's version. An entry is one file ``<key>.entry``: a magic line, the SHA-256 of
its zlib'd JSON body, the body; it is written to a temporary file and renamed into place, and a
lock file makes concurrent agents compile once. An entry that fails its checksum, does not parse
or names another key, kernel or format is counted (``stats``), logged, and recompiled over;
it is never loaded.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import threading
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import host

__all__ = ["FORMAT_VERSION", "DEFAULT_DIR", "configure", "settings", "stats", "count", "cache_key", "lookup", "store",
           "locked", "instantiate", "load_deferred", "wait_deferred", "unbind_maps",
           "CacheEntryError"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2           # 2: pinned maps
DEFAULT_DIR = "/var/cache/ebpf-otlp-receiver"
MAX_ENTRIES = 64              # the oldest go first: one entry per program and configuration
_MAGIC = b"ebpf-otlp-receiver compile cache 2\n"
_TRACEPOINT = re.compile(r"^\s*TRACEPOINT_PROBE\(\s*(\w+)\s*,\s*(\w+)\s*\)", re.M)
_BPF_LD_IMM64 = 0x18
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE = 1, 2
_INSN = struct.Struct("<BBhi")

_lock = threading.Lock()
stats: Counter[str] = Counter()   # hit, miss, corrupt, mismatch, store_failed, uncacheable
_settings: dict[str, Any] = {"directory": os.environ.get("EBPF_RECEIVER_CACHE_DIR", DEFAULT_DIR),
                             "kernel_headers": os.environ.get("EBPF_RECEIVER_KERNEL_HEADERS") or None}


class CacheEntryError(ValueError):
    """An entry that must not be loaded: ``reason`` is ``corrupt`` or ``mismatch``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def configure(directory: str | None = DEFAULT_DIR, kernel_headers: str | None = None) -> None:
    """The cache directory (``None`` or "": no cache) and the configured header tree
    (``bpf.cache_dir``, ``bpf.kernel_headers``); the service calls it before any source starts."""
    with _lock:
        _settings["directory"] = directory or ""
        _settings["kernel_headers"] = kernel_headers or None


def settings() -> dict[str, Any]:
    with _lock:
        return dict(_settings)


def count(what: str) -> None:
    with _lock:
        stats[what] += 1


# ------------------------------------------------------------------ the key

def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _headers_identity(root: str, cflags: Sequence[str]) -> str:
    """The header tree: its path, where its halves resolve to, and its generated headers."""
    h = hashlib.sha256()
    dirs = [Path(root) if root else host.kernel_headers_dir()]
    dirs += [Path(f[2:]) for f in cflags if f.startswith("-I")]
    for d in dirs:
        h.update(f"{d}={d.resolve()}\n".encode())
        for name in ("include/generated/utsrelease.h", "include/generated/autoconf.h",
                     "include/linux/kconfig.h"):
            h.update(hashlib.sha256(_read(d / name)).digest())
    return h.hexdigest()


def _kernel() -> tuple[str, str, str]:
    """The running kernel: release, build, machine."""
    u = os.uname()
    return u.release, u.version, u.machine


def cache_key(text: str, cflags: Sequence[str], programs: Sequence[Any], headers: Sequence[Any] | None,
              bcc_version: str, pins: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """The entry's key and what it was made of (``meta``: checked again when the entry loads).
    The header tree is in ``meta`` but not in the key: a host without headers still finds the
    entry (and loads it, needing none), while another header tree replaces it. ``pins`` (map name
    -> bpffs path of a map the program opens with ``BPF_TABLE_PINNED``): a path in a cflag is
    keyed by the map's name, not the path, since the instructions only hold the map's descriptor
    (a per-process pin path still finds the entry; a hit opens the pin, ``instantiate``)."""
    if pins:
        def unpinned(flag: str) -> str:
            for name, path in sorted(pins.items(), key=lambda kv: -len(kv[1])):
                flag = flag.replace(path, f"<pin:{name}>")
            return flag
        cflags = [unpinned(f) for f in cflags]
    release, build, machine = _kernel()
    tracefs = host.tracefs_root()
    formats = hashlib.sha256()
    for category, name in sorted(set(_TRACEPOINT.findall(text))):
        formats.update(f"{category}:{name}\n".encode())
        if tracefs is not None:
            formats.update(_read(tracefs / "events" / category / name / "format"))
    hdr_flags = tuple(headers[2]) if headers else ()
    meta = {"format": str(FORMAT_VERSION), "kernel": release, "kernel_build": build, "machine": machine,
            "bcc": bcc_version, "tracepoint_formats": formats.hexdigest(),
            "program": hashlib.sha256(text.encode()).hexdigest(),
            "cflags": hashlib.sha256(json.dumps([list(cflags), [list(p) if isinstance(p, (list, tuple)) else p
                                                                for p in programs]]).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    if headers:
        meta["headers"] = _headers_identity(headers[0], hdr_flags)
    return key, meta


# ------------------------------------------------------------------ entries on disk

def _dir() -> Path | None:
    d = settings()["directory"]
    return Path(d) if d else None


def _entry_path(key: str) -> Path | None:
    d = _dir()
    return d / "bpf" / f"{key}.entry" if d else None


def lookup(key: str, meta: Mapping[str, str], count_miss: bool = True) -> dict[str, Any] | None:
    """The entry for ``key``, checked (checksum, format, key, kernel); ``None`` on a miss. A
    corrupt or mismatching entry is counted, logged and treated as a miss (a compile replaces it);
    ``count_miss=False`` (the look again under the lock) counts only a hit."""
    path = _entry_path(key)
    if path is None:
        return None
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if count_miss:
            count("miss")
        return None
    except OSError as e:
        if count_miss:
            log.warning("compile cache: cannot read %s: %s; compiling", path, e)
            count("miss")
        return None
    try:
        entry = decode(raw)
        for k, v in meta.items():   # "headers" only when this host has some
            if entry["meta"].get(k) != v:
                raise CacheEntryError("mismatch", f"{k} is {entry['meta'].get(k)!r}, here {v!r}")
        if entry.get("key") != key:
            raise CacheEntryError("mismatch", "the entry names another key")
    except CacheEntryError as e:
        if count_miss:
            count(e.reason)
            log.warning("compile cache: %s entry %s (%s): compiling again", e.reason, path.name, e)
        return None
    count("hit")
    with contextlib.suppress(OSError):
        os.utime(path)   # recently used: pruned last
    return entry


def decode(raw: bytes) -> dict[str, Any]:
    """An entry file's content, or ``CacheEntryError``."""
    if not raw.startswith(_MAGIC):
        raise CacheEntryError("mismatch" if raw.startswith(b"ebpf-otlp-receiver compile cache") else "corrupt",
                              "not an entry of this format")
    digest, body = raw[len(_MAGIC):len(_MAGIC) + 32], raw[len(_MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise CacheEntryError("corrupt", "checksum mismatch")
    try:
        entry = json.loads(zlib.decompress(body))
    except (zlib.error, ValueError) as e:
        raise CacheEntryError("corrupt", f"unreadable body: {e}") from None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT_VERSION or not isinstance(entry.get("meta"), dict):
        raise CacheEntryError("mismatch", "another format version")
    return entry


def encode(entry: Mapping[str, Any]) -> bytes:
    body = zlib.compress(json.dumps(entry, separators=(",", ":")).encode(), 6)
    return _MAGIC + hashlib.sha256(body).digest() + body


def store(key: str, meta: Mapping[str, str], content: Mapping[str, Any]) -> Path | None:
    """Writes the entry atomically (temporary file, fsync, rename); a failure is counted and
    logged, never raised: the programs are loaded either way."""
    path = _entry_path(key)
    if path is None:
        return None
    entry = {"format": FORMAT_VERSION, "key": key, "meta": dict(meta), **content}
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".entry")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode(entry))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _prune(path.parent)
    except OSError as e:
        count("store_failed")
        log.warning("compile cache: cannot store %s: %s", path, e)
        return None
    return path


def _prune(d: Path) -> None:
    """Keeps the ``MAX_ENTRIES`` most recently used entries, and the lock files of twice as many."""
    for pattern, keep in (("*.entry", MAX_ENTRIES), ("*.lock", 2 * MAX_ENTRIES)):
        files = []
        for p in d.glob(pattern):
            with contextlib.suppress(OSError):
                files.append((p.stat().st_mtime, p))
        for _, old in sorted(files)[:-keep]:
            with contextlib.suppress(OSError):
                old.unlink()


@contextlib.contextmanager
def locked(key: str) -> Iterator[None]:
    """Holds the entry's lock file (``flock``), so concurrent agents with the same miss compile
    once; without a usable cache directory it holds nothing."""
    path = _entry_path(key)
    fd = -1
    if path is not None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("compile cache: cannot lock %s: %s", path, e)
            if fd >= 0:
                os.close(fd)
            fd = -1
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)   # releases the lock


# ------------------------------------------------------------------ instructions

def unbind_maps(insns: bytes, map_fds: Mapping[int, int]) -> tuple[bytes, list[list[int]]]:
    """``insns`` with each map descriptor (``ld_imm64`` with ``BPF_PSEUDO_MAP_FD`` or
    ``_VALUE``) zeroed, and the relocations ``[instruction index, map index]`` to bind them again.
    A descriptor that is no map of the module, or another kind of pseudo load, is a ``ValueError``."""
    if len(insns) % 8:
        raise ValueError("instructions are not whole struct bpf_insn")
    out = bytearray(insns)
    relocs: list[list[int]] = []
    i, n = 0, len(insns) // 8
    while i < n:
        code, regs, off, imm = _INSN.unpack_from(out, i * 8)
        if code == _BPF_LD_IMM64:
            src = regs >> 4
            if src in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
                if imm not in map_fds:
                    raise ValueError(f"instruction {i} refers to fd {imm}, which is no map of the program")
                relocs.append([i, map_fds[imm]])
                _INSN.pack_into(out, i * 8, code, regs, off, 0)
            elif src != 0:
                raise ValueError(f"instruction {i}: a pseudo load of kind {src} cannot be cached")
            i += 2
            continue
        i += 1
    return bytes(out), relocs


def _bind_maps(insns: bytes, relocs: Sequence[Sequence[int]], fds: Sequence[int]) -> bytes:
    out = bytearray(insns)
    for index, map_index in relocs:
        code, regs, off, _imm = _INSN.unpack_from(out, index * 8)
        if code != _BPF_LD_IMM64 or (regs >> 4) not in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
            raise CacheEntryError("corrupt", f"relocation {index} is not a map load")
        _INSN.pack_into(out, index * 8, code, regs, off, fds[map_index])
    return bytes(out)


def _open_pinned(spec: Mapping[str, Any], pins: Mapping[str, str]) -> int:
    """The descriptor of a pinned map (``BPF_OBJ_GET``), checked against the entry's spec."""
    from . import libbpf

    path = pins.get(spec["name"])
    if path is None:
        raise CacheEntryError("mismatch", f"map {spec['name']} is pinned, but no pin path was given for it")
    fd = libbpf.lib().bpf_obj_get(path.encode())
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"opening the map pinned at {path}: {os.strerror(err)}")
    info = libbpf.map_info(fd)
    for k in ("type", "key_size", "value_size", "max_entries"):
        if info[k] != spec[k]:
            os.close(fd)
            raise OSError(f"the map pinned at {path} has {k} {info[k]}, the program wants {spec[k]}")
    return int(fd)


def instantiate(entry: Mapping[str, Any], defer_tail_calls: bool = False,
                pins: Mapping[str, str] | None = None) -> tuple[
        list[tuple[dict[str, Any], int]], dict[str, int], list[int], list[list[str]], list[dict[str, Any]]]:
    """Creates the entry's maps, loads its programs, fills its program arrays and attaches it:
    (maps with descriptors, programs by name, attachment descriptors, attach points, deferred).
    With ``defer_tail_calls``, the programs only reached by tail calls (the profiler's walkers,
    the longest to verify) are not loaded but returned in ``deferred`` for ``load_deferred``:
    until then a tail call into their empty slot falls through, as the programs expect. A map
    the entry marks ``pinned`` is opened at its path in ``pins`` (map name -> path), not created.
    On any failure everything created is closed and the error raised."""
    from . import libbpf

    reached = {name for _, _, name in entry["prog_arrays"]}
    attached = {prog for _, _, prog in entry["attach"]}
    later = reached - attached if defer_tail_calls else set()
    created: list[int] = []
    try:
        maps: list[tuple[dict[str, Any], int]] = []
        for spec in entry["maps"]:
            if spec.get("pinned"):
                fd = _open_pinned(spec, pins or {})
                created.append(fd)
                maps.append((spec, fd))
                continue
            fd = libbpf.map_create(spec["type"], spec["name"], spec["key_size"], spec["value_size"],
                                   spec["max_entries"], spec.get("flags", 0))
            created.append(fd)
            maps.append((spec, fd))
        fds = [fd for _, fd in maps]
        programs: dict[str, int] = {}
        for prog in entry["programs"]:
            if prog["name"] in later:
                continue
            fd = _load_program(entry, prog, fds)
            created.append(fd)
            programs[prog["name"]] = fd
        by_name = {spec["name"]: fd for spec, fd in maps}
        for array, index, name in entry["prog_arrays"]:
            if name not in later:
                libbpf.update_int(by_name[array], int(index), programs[name])
        tracefs = host.tracefs_root()
        attachments: list[int] = []
        for kind, point, prog_name in entry["attach"]:
            if kind == "tracepoint":
                if tracefs is None:
                    raise OSError("tracefs is not mounted")
                fd = libbpf.attach_tracepoint(str(tracefs), point, programs[prog_name])
            elif kind == "raw_tracepoint":
                fd = libbpf.attach_raw_tracepoint(point, programs[prog_name])
            else:
                raise CacheEntryError("corrupt", f"unknown attach kind {kind!r}")
            created.append(fd)
            attachments.append(fd)
    except BaseException:
        for fd in reversed(created):
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    deferred = [{"program": prog, "slots": [(by_name[a], int(i)) for a, i, n in entry["prog_arrays"]
                                            if n == prog["name"]]}
                for prog in entry["programs"] if prog["name"] in later]
    return maps, programs, attachments, [[k, p] for k, p, _ in entry["attach"]], deferred


def _load_program(entry: Mapping[str, Any], prog: Mapping[str, Any], map_fds: Sequence[int]) -> int:
    from . import libbpf

    insns = _bind_maps(base64.b64decode(prog["insns"]), prog["relocs"], map_fds)
    return libbpf.prog_load(prog["type"], prog["name"], entry["license"], insns, entry.get("kern_version", 0))


_deferred_threads: list[threading.Thread] = []


def load_deferred(obj: Any, entry: Mapping[str, Any], deferred: Sequence[Mapping[str, Any]]) -> None:
    """Loads the deferred programs on a thread and stores each in its program array slots as it
    is verified; ``wait_deferred`` waits for every such thread (the agent, before it drops the
    capabilities loading needs). A program that fails to load is logged and counted: its slot
    stays empty, so its walk is skipped, as where the kernel cannot run it."""
    from . import libbpf

    map_fds = [t.map_fd for t in obj.tables.values()]

    def run() -> None:
        for item in deferred:
            prog = item["program"]
            with obj.lock:
                if not obj.tables:      # cleaned up meanwhile
                    return
            try:
                fd = _load_program(entry, prog, map_fds)
            except (OSError, ValueError) as e:
                count("deferred_load_failed")
                log.warning("compile cache: program %s did not load: %s", prog["name"], e)
                continue
            with obj.lock:
                if not obj.tables:
                    os.close(fd)
                    return
                obj.programs[prog["name"]] = fd
                for array_fd, index in item["slots"]:
                    libbpf.update_int(array_fd, index, fd)

    t = threading.Thread(target=run, name="bpf-deferred-load", daemon=True)
    obj.deferred = t
    with _lock:
        _deferred_threads[:] = [x for x in _deferred_threads if x.is_alive()]
        _deferred_threads.append(t)
    t.start()


def wait_deferred(timeout: float | None = None) -> bool:
    """Waits for every deferred load; ``False`` if one was still running at ``timeout``."""
    with _lock:
        threads = list(_deferred_threads)
    for t in threads:
        t.join(timeout)
    return not any(t.is_alive() for t in threads)
