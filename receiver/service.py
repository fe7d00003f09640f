"""Wires sources → conversion → exporter from a config and runs them.

Start order: self-telemetry, exporter, then sources (a source that cannot run is disabled with
its reason; the others go on). Stop order is the reverse: sources detach and hand over what they
read, then the exporter flushes within ``shutdown_timeout``, then the telemetry server closes.
"""

from __future__ import annotations

import asyncio
import logging

from .config import EbpfConfig, parse_address
from .convert.converter import EbpfOtlpConverter
from .convert.resource import ProcessResources, detect_host_attributes
from .errors import ReceiverError, SourceUnavailableError
from .export.exporter import OtlpExporter
from .sources import Source, SourceContext, source_classes
from .sources.base import KernelClock
from .telemetry import SelfTelemetry, TelemetryServer

__all__ = ["Service"]

log = logging.getLogger(__name__)


class Service:
    def __init__(self, config: EbpfConfig, telemetry: SelfTelemetry | None = None):
        self.config = config
        self.telemetry = telemetry or SelfTelemetry()
        self.exporter = OtlpExporter(config.exporter, self.telemetry)
        self.converter = EbpfOtlpConverter()
        self.resources = ProcessResources(detect_host_attributes(config.resource))
        self.context = SourceContext(config, self.exporter, self.converter, self.telemetry,
                                     self.resources, KernelClock())
        self.sources: list[Source] = []
        self.failed: dict[str, str] = {}
        self.http: TelemetryServer | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.config.telemetry.enabled:
            host, port = parse_address(self.config.telemetry.listen)
            self.http = TelemetryServer(self.telemetry, host, port)
            self.http.start()
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        await self.exporter.start()
        classes = source_classes()
        for name in self.config.sources.enabled():
            cls = classes.get(name)
            if cls is None:
                self.failed[name] = "not available in this build"
                log.error("source %s: not available in this build", name)
                continue
            source = cls(self.context)
            try:
                await source.start()
            except SourceUnavailableError as e:
                self.failed[name] = e.reason
                self.telemetry.source_up.labels(name).set(0)
                log.error("source %s disabled: %s%s", name, e.reason, f" (fix: {e.fix})" if e.fix else "")
                continue
            self.sources.append(source)
        if not self.sources:
            raise ReceiverError("no source could start: " +
                                "; ".join(f"{n}: {r}" for n, r in self.failed.items()) +
                                " (run `ebpf-otlp-receiver check` for what is missing)")
        if self.http:
            self.http.ready = True
        log.info("running sources: %s", ", ".join(s.name for s in self.sources))

    async def _beat(self) -> None:
        while True:
            if self.http:
                self.http.beat()
            await asyncio.sleep(1.0)

    async def flush(self) -> None:
        for s in self.sources:
            await s.flush()
        await self.exporter.flush()

    async def stop(self) -> None:
        if self.http:
            self.http.ready = False
            self.http.not_ready_reason = "shutting down"
        for s in reversed(self.sources):
            try:
                await s.stop()
            except Exception:
                log.exception("source %s: error while stopping", s.name)
        self.sources.clear()
        await self.exporter.shutdown()
        if self._heartbeat:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self.http:
            self.http.stop()
            self.http = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            await stop.wait()
            log.info("stopping: detaching sources and flushing")
        finally:
            await self.stop()
