"""What every BPF source shares: compile and attach with BCC (in a loader process), read the ring buffer on the event
loop, count kernel-side losses, run a periodic collection, detach on stop.

A source decodes and aggregates what its program sees and hands typed records to its consumer
(``SourceContext.consumer``, the pipeline in the agent, a recorder in tests); it never sees the
exporter. Its lifecycle is ``start()`` → (records and periodic ``collect()``) → ``stop()``.
``stop()`` is safe before ``start()`` and safe twice; a ``start()`` that fails halfway cleans up
what it attached and raises ``SourceUnavailableError`` saying why, so the service disables that
one source and runs the others.
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import SourceUnavailableError
from ..kernel.bcc import check_mirror
from ..kernel.capabilities import missing
from ..kernel.clock import KernelClock
from ..kernel.loader import compile_bpf

if TYPE_CHECKING:
    from ..config import EbpfConfig
    from ..consumer import Consumer
    from ..telemetry import SelfTelemetry

__all__ = ["Source", "BccSource", "SourceContext", "Requirement", "Mirror"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requirement:
    """One thing a source needs from the host, for ``check``: e.g. a tracepoint."""

    kind: str      # "tracepoint", "perf_event"
    name: str      # "sched:sched_process_exec"


# (map name, "Key" or "Leaf", ctypes mirror): checked against BCC's view at load.
Mirror = tuple[str, str, Any]


@dataclass
class SourceContext:
    """What a source is handed: its consumer and the shared services it uses."""

    config: "EbpfConfig"
    consumer: "Consumer"
    telemetry: "SelfTelemetry"
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

    @abc.abstractmethod
    async def stop(self) -> None: ...


class BccSource(Source):
    """A source backed by one ``bpf/<name>.bpf.c`` loaded through BCC.

    Subclasses set ``bpf_file``, ``lost_reasons`` (the slots of the program's ``lost`` per-CPU
    array, read from its header with ``header_enum``) and ``mirrors`` (ctypes mirrors of its
    structs, checked at load), and override ``cflags()``, ``configure(bpf)`` (fill filter maps),
    ``handle_event(data, size)`` for ring-buffer records and ``collect()`` for periodic reads.
    """

    bpf_file: ClassVar[str]
    ring_buffers: ClassVar[Sequence[str]] = ("events",)
    lost_reasons: ClassVar[Sequence[str]] = ()
    mirrors: ClassVar[Sequence[Mirror]] = ()
    min_record_size: ClassVar[int] = 0   # shorter ring-buffer records are decode errors
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
        ctx.telemetry.declare_losses(self.name, (*self.lost_reasons, "decode_error"))

    # -------------------------------------------------------------- subclass hooks

    def cflags(self) -> list[str]:
        return []

    def configure(self, bpf: Any) -> None:
        """Fills maps (filters, settings) after load; the programs are already attached."""

    def handle_event(self, data: int, size: int) -> None:
        """One ring-buffer record (``data`` is its address); must not block."""

    def collect(self) -> None:
        """Periodic read of aggregated maps; runs every ``report_interval`` and on stop, always
        with the program loaded."""

    def detach(self) -> None:
        """Anything attached outside BCC's own bookkeeping (e.g. perf events)."""

    # -------------------------------------------------------------- lifecycle

    def _compile(self) -> Any:
        bpf = compile_bpf(self.name, self.bpf_file, self.cflags())
        try:
            for map_name, part, mirror in self.mirrors:
                check_mirror(bpf, map_name, part, mirror, self.name)
        except BaseException:
            bpf.cleanup()
            raise
        return bpf

    async def start(self) -> None:
        if self.bpf is not None:
            return
        # uid 0 is not enough: a container or unit runs as root with only what it was granted.
        lacking = [c.name for c in missing(required_only=True)]
        if lacking:
            raise SourceUnavailableError(self.name, f"the process lacks {', '.join(lacking)}",
                                         f"grant {' and '.join(lacking)}")
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
            if size < self.min_record_size:   # never read past the end of a record
                self.count_lost("decode_error")
                return 0
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
