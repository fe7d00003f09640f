"""What every BPF source shares: compile and attach with BCC, read the ring buffer on the event
loop, count kernel-side losses, run a periodic collection, detach on stop.

A source's lifecycle is ``start()`` → (events and periodic ``collect()``) → ``flush()`` →
``stop()``. ``stop()`` is safe before ``start()`` and safe twice; a ``start()`` that fails
halfway cleans up what it attached and raises ``SourceUnavailableError`` saying why, so the
service disables that one source and runs the others.
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import SourceUnavailableError

if TYPE_CHECKING:
    from ..config import EbpfConfig, ProcessFilter
    from ..convert.converter import EbpfOtlpConverter
    from ..convert.resource import ProcessResources
    from ..export.otlp_grpc import OtlpGrpcExporter
    from ..telemetry import SelfTelemetry

__all__ = ["Source", "BccSource", "SourceContext", "KernelClock", "bpf_source_dir",
           "load_bcc", "compile_bpf", "Requirement", "tracepoint_has_field", "cgroup_id_of",
           "fill_process_filter"]

log = logging.getLogger(__name__)


def bpf_source_dir() -> Path:
    """Where the BPF C files are: ``receiver/bpf`` in an installed wheel, ``bpf/`` in a checkout."""
    try:
        import receiver.bpf as pkg

        for p in pkg.__path__:
            if (Path(p) / "process.bpf.c").is_file():
                return Path(p)
    except ImportError:
        pass
    return Path(__file__).resolve().parents[2] / "bpf"


def load_bcc() -> Any:
    """Imports BCC or says exactly what to install."""
    try:
        import bcc
    except ImportError:
        raise SourceUnavailableError(
            "bcc", "the BCC Python module is not importable",
            "apt-get install python3-bpfcc, and make the venv see it (make setup links it)") from None
    return bcc


def compile_bpf(source_name: str, bpf_file: str, cflags: Sequence[str] = ()) -> Any:
    """Compiles and loads ``bpf/<bpf_file>`` with BCC, or raises ``SourceUnavailableError``
    saying what is missing (BCC, the program file, kernel headers for BCC's compiler, a
    capability: a permission problem is told apart from a compile error)."""
    bcc = load_bcc()
    src_dir = bpf_source_dir()
    path = src_dir / bpf_file
    if not path.is_file():
        raise SourceUnavailableError(source_name, f"BPF program {path} is missing from the installation")
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not (build / "include").exists():
        raise SourceUnavailableError(
            source_name, f"no kernel headers at {build}",
            "apt-get install linux-headers-amd64 (or linux-headers-$(uname -r)), then "
            "deploy/scripts/prepare-host.sh links them")
    try:
        return bcc.BPF(text=path.read_text(), cflags=[f"-I{src_dir}", *cflags])
    except Exception as e:
        # BCC reports a denied bpf() as "Failed to compile BPF module": tell the two apart.
        from ..capabilities import explain_load_failure

        reason = explain_load_failure(e)
        if reason:
            raise SourceUnavailableError(source_name, reason) from e
        raise


def tracepoint_has_field(tracepoint: str, field: str) -> bool:
    """Whether the running kernel's ``category:name`` tracepoint has ``field`` (fields come and
    go between kernel versions; a program compiled against a missing one fails to load)."""
    from ..preflight import tracefs_root

    root = tracefs_root()
    if root is None:
        return False
    category, _, name = tracepoint.partition(":")
    try:
        text = (root / "events" / category / name / "format").read_text()
    except OSError:
        return False
    return any(line.strip().startswith("field:") and
               line.split(";", 1)[0].rsplit(None, 1)[-1].split("[", 1)[0] == field
               for line in text.splitlines())


def cgroup_id_of(path: str) -> int | None:
    """The kernel's id of a cgroup v2 directory (its inode number, what
    ``bpf_get_current_cgroup_id()`` returns). ``path`` is as /proc/PID/cgroup shows it
    ("/system.slice/docker-….scope"), relative to the cgroup v2 mount (found in /proc/mounts:
    /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts), or a full path under it."""
    from ..convert.resource import CgroupResolver

    root = CgroupResolver.find_cgroup2_root() or "/sys/fs/cgroup"
    if path == root or path.startswith(root.rstrip("/") + "/"):
        candidates = [path]
    else:
        candidates = [f"{root.rstrip('/')}/{path.lstrip('/')}"]
    for candidate in candidates:
        try:
            return os.stat(candidate).st_ino
        except OSError:
            continue
    return None


def fill_process_filter(bpf: Any, process_filter: "ProcessFilter", source_name: str) -> None:
    """Puts a ``ProcessFilter`` into a program's ``filter_pids`` (u32), ``filter_comms`` (comm
    bytes, NUL-padded) and ``filter_cgroups`` (u64 cgroup id) maps: filters are map contents,
    never program text. A cgroup that does not exist is logged and skipped."""
    one = ctypes.c_uint8(1)
    pids = bpf["filter_pids"]
    for pid in process_filter.pids:
        pids[ctypes.c_uint32(pid)] = one
    comms = bpf["filter_comms"]
    for name in process_filter.process_names:
        key = comms.Key()
        raw = name.encode()[: ctypes.sizeof(key) - 1]
        ctypes.memmove(ctypes.addressof(key), raw, len(raw))
        comms[key] = one
    cgroups = bpf["filter_cgroups"]
    for cg in process_filter.cgroups:
        cid = cgroup_id_of(cg)
        if cid is None:
            log.warning("%s: cgroup %s not found; not filtered on", source_name, cg)
        else:
            cgroups[ctypes.c_uint64(cid)] = one


class KernelClock:
    """Maps ``bpf_ktime_get_ns()`` (CLOCK_MONOTONIC) to Unix time; re-anchored on every
    ``refresh()`` so wall-clock steps (NTP) are followed."""

    def __init__(self) -> None:
        self.offset_ns = 0
        self.refresh()

    def refresh(self) -> None:
        # Read both clocks back to back, twice, keeping the tighter pair.
        best = None
        for _ in range(3):
            m0 = time.monotonic_ns()
            w = time.time_ns()
            m1 = time.monotonic_ns()
            if best is None or m1 - m0 < best[0]:
                best = (m1 - m0, w - (m0 + m1) // 2)
        assert best is not None
        self.offset_ns = best[1]

    def to_unix_nano(self, ktime_ns: int) -> int:
        return ktime_ns + self.offset_ns


@dataclass(frozen=True)
class Requirement:
    """One thing a source needs from the host, for ``check``: e.g. a tracepoint."""

    kind: str      # "tracepoint", "perf_event", "btf", ...
    name: str      # "sched:sched_process_exec"
    optional: bool = False


@dataclass
class SourceContext:
    """What a source is handed: where its output goes and the shared services it uses."""

    config: "EbpfConfig"
    exporter: "OtlpGrpcExporter"
    converter: "EbpfOtlpConverter"
    telemetry: "SelfTelemetry"
    resources: "ProcessResources"
    clock: KernelClock


class Source(abc.ABC):
    name: ClassVar[str]

    def __init__(self, ctx: SourceContext):
        self.ctx = ctx

    @classmethod
    def requirements(cls, config: "EbpfConfig") -> list[Requirement]:
        return []

    @abc.abstractmethod
    async def start(self) -> None: ...

    async def flush(self) -> None:
        """Hands everything read so far to the exporter."""

    @abc.abstractmethod
    async def stop(self) -> None: ...


class BccSource(Source):
    """A source backed by one ``bpf/<name>.bpf.c`` loaded through BCC.

    Subclasses set ``bpf_file`` and ``lost_reasons`` (the names of the slots of the program's
    ``lost`` per-CPU array), and override ``cflags()``, ``configure(bpf)`` (fill filter maps),
    ``handle_event(data, size)`` for ring-buffer records and ``collect()`` for periodic reads.
    """

    bpf_file: ClassVar[str]
    ring_buffers: ClassVar[Sequence[str]] = ("events",)
    lost_reasons: ClassVar[Sequence[str]] = ()
    report_interval: float = 10.0

    def __init__(self, ctx: SourceContext):
        super().__init__(ctx)
        self.bpf: Any = None
        self._reader_fds: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self._lost_seen = [0] * len(self.lost_reasons)
        self._callbacks: list[Any] = []  # keep ctypes callbacks alive while BCC holds them
        self._received = ctx.telemetry.events_received.labels(self.name)
        self._up = ctx.telemetry.source_up.labels(self.name)
        self._up.set(0)

    # -------------------------------------------------------------- subclass hooks

    def cflags(self) -> list[str]:
        return []

    def configure(self, bpf: Any) -> None:
        """Fills maps (filters, settings) after load; the programs are already attached."""

    def handle_event(self, data: int, size: int) -> None:
        """One ring-buffer record (``data`` is its address); must not block."""

    def collect(self) -> None:
        """Periodic read of aggregated maps; runs every ``report_interval`` and on stop."""

    def detach(self) -> None:
        """Anything attached outside BCC's own bookkeeping (e.g. perf events)."""

    # -------------------------------------------------------------- lifecycle

    def _compile(self) -> Any:
        return compile_bpf(self.name, self.bpf_file, self.cflags())

    async def start(self) -> None:
        if self.bpf is not None:
            return
        # uid 0 is not enough: a container or unit runs as root with only what it was granted.
        from ..capabilities import missing

        lacking = [c.name for c in missing(required_only=True)]
        if lacking:
            raise SourceUnavailableError(self.name, f"the process lacks {', '.join(lacking)}",
                                         f"run as root, or grant {' and '.join(lacking)}")
        t0 = time.monotonic()
        try:
            # Compiling takes a second or more: keep the event loop (and /healthz) responsive.
            self.bpf = await asyncio.to_thread(self._compile)
            self.configure(self.bpf)
            loop = asyncio.get_running_loop()
            for name in self.ring_buffers:
                cb = self._make_ring_callback()
                self.bpf[name].open_ring_buffer(cb)
                fd = self.bpf[name].map_fd
                loop.add_reader(fd, self._consume)
                self._reader_fds.append(fd)
        except SourceUnavailableError:
            await self.stop()
            raise
        except Exception as e:
            await self.stop()
            raise SourceUnavailableError(self.name, f"{type(e).__name__}: {e}".strip()) from e
        self._task = asyncio.get_running_loop().create_task(self._periodic(), name=f"source-{self.name}")
        self._up.set(1)
        log.info("source %s: attached in %.1fs", self.name, time.monotonic() - t0)

    def _make_ring_callback(self) -> Any:
        def on_record(_ctx: Any, data: int, size: int) -> int:
            try:
                self.handle_event(data, size)
            except Exception:  # a bad record must not stop the reader
                log.exception("source %s: cannot decode a record", self.name)
                self.count_lost("decode_error")
            return 0

        self._callbacks.append(on_record)
        return on_record

    def _consume(self) -> None:
        try:
            self.bpf.ring_buffer_consume()
        except Exception:
            log.exception("source %s: ring buffer read failed", self.name)

    def count_lost(self, reason: str, n: int = 1) -> None:
        self.ctx.telemetry.events_lost.labels(self.name, reason).inc(n)

    def _read_lost_counters(self) -> None:
        if not self.lost_reasons or self.bpf is None:
            return
        table = self.bpf["lost"]
        for i, reason in enumerate(self.lost_reasons):
            total = sum(int(v) for v in table[ctypes.c_int(i)])
            if total > self._lost_seen[i]:
                self.count_lost(reason, total - self._lost_seen[i])
                self._lost_seen[i] = total

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval)
            self.ctx.clock.refresh()
            self._run_collect()

    def _run_collect(self) -> None:
        try:
            self._consume()
            self.collect()
            self._read_lost_counters()
        except Exception:
            log.exception("source %s: periodic collection failed", self.name)

    async def flush(self) -> None:
        if self.bpf is not None:
            self._run_collect()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        loop = asyncio.get_running_loop()
        for fd in self._reader_fds:
            loop.remove_reader(fd)
        self._reader_fds.clear()
        if self.bpf is not None:
            self._run_collect()  # what arrived until now still goes out
            try:
                self.detach()
            finally:
                self.bpf.cleanup()
                self.bpf = None
        self._up.set(0)
