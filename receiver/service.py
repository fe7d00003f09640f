"""Wires sources → pipeline → exporter from a config and runs them.

Start order: self-telemetry, sources (all at once, the profiler after them), each up as soon as it is loaded (from the
compile cache, or compiled in its own loader process; a source that cannot run is disabled with
its reason; the others go on; what they read waits in the export queues), then every capability no longer
needed is dropped (receiver/kernel/privileges.py), then the exporter starts, so its threads never hold
more. Capabilities belong to threads: threads the sources start meanwhile (the profiler's
workers) are held before they run and drop their own set with the event-loop thread's drop
(``privileges.StartupThreads``); the loader's compile threads, which need the set, end before it.
Stop order is the reverse: sources detach and hand over what they
read, then the exporter flushes within ``shutdown_timeout``, then the telemetry server closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .config import EbpfConfig, parse_address
from .errors import ReceiverError, SourceUnavailableError
from .export.exporter import OtlpExporter
from .kernel import compile_cache, heap, privileges
from .kernel.clock import KernelClock
from .kernel.identity import CgroupResolver, detect_host_attributes
from .pipeline import Pipeline, ProcessResources
from .profiling import links
from .sources import Source, SourceContext, source_classes
from .telemetry import SelfTelemetry, TelemetryServer
from .web_config import WebConfig

__all__ = ["Service"]

log = logging.getLogger(__name__)


class _Loader(ThreadPoolExecutor):
    """The default executor while sources start: its threads compile and load BPF programs, so
    they run at once with the start-up capabilities (not held by ``StartupThreads``), and all
    have ended before the drop."""

    def __init__(self, gate: privileges.StartupThreads) -> None:
        super().__init__(thread_name_prefix="loader")
        self._gate = gate

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._gate.privileged():
            return super().submit(fn, *args, **kwargs)


class Service:
    def __init__(self, config: EbpfConfig, telemetry: SelfTelemetry | None = None,
                 least_privilege: bool = True):
        self.config = config
        self.least_privilege = least_privilege  # drop capabilities once the programs are loaded
        self.telemetry = telemetry or SelfTelemetry()
        self.exporter = OtlpExporter(config.exporter, self.telemetry)
        caches = config.caches
        resources = ProcessResources(detect_host_attributes(config.resource), caches.process_resources,
                                     CgroupResolver(max_entries=caches.cgroups))
        self.telemetry.watch_cache("process_resources", resources.__len__, caches.process_resources,
                                   lambda: resources.evictions)
        self.telemetry.watch_cache("cgroups", resources.cgroups.__len__, caches.cgroups,
                                   lambda: resources.cgroups.evictions)
        self.pipeline = Pipeline(config, self.exporter, resources)
        self.context = SourceContext(config, self.pipeline, self.telemetry, KernelClock())
        self.sources: list[Source] = []
        self.failed: dict[str, str] = {}
        self.http: TelemetryServer | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        compile_cache.configure(self.config.bpf.cache_dir, self.config.bpf.kernel_headers)
        for name in self.config.sources.enabled():   # from the first scrape: 0 until it is up
            self.telemetry.source_up.labels(name).set(0)
        links.configure(self.config.bpf.pin_path)   # request links' bpffs pins
        if self.config.telemetry.enabled:
            host, port = parse_address(self.config.telemetry.listen)
            web_file = self.config.telemetry.web_config_file
            self.http = TelemetryServer(self.telemetry, host, port,
                                        readiness_grace=self.config.telemetry.readiness_grace,
                                        web=WebConfig.load(web_file) if web_file else None)
            self.http.start()
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        loop = asyncio.get_running_loop()
        gate = privileges.StartupThreads()
        if self.least_privilege:
            gate.hold()   # threads the sources start wait for the drop (see the module docstring)
        try:
            await self._start_sources(loop, gate)
            # Programs loaded while their source already runs (the profiler's walkers, from the
            # compile cache) need the start-up capabilities: they finish before the drop.
            while not compile_cache.wait_deferred(0):
                await asyncio.sleep(0.05)
            if self.least_privilege:
                self._drop_privileges(gate)
        finally:
            gate.release(None)   # not dropped (failed start, or least_privilege off): run as is
        # After the drop, so the threads gRPC starts inherit the reduced capabilities; what
        # the sources read meanwhile waits in the queues.
        await self.exporter.start()
        if self.http:
            self.http.ready = True
        log.info("running sources: %s", ", ".join(s.name for s in self.sources))
        heap.freeze_startup_objects()

    async def _start_sources(self, loop: asyncio.AbstractEventLoop,
                             gate: privileges.StartupThreads) -> None:
        """Starts every enabled source but the profiler at once, then the profiler (each loads
        from the compile cache or compiles in its own loader process) and reports each up as soon
        as it is; in config order after."""
        loader = _Loader(gate)  # compiles; ends after load
        loop.set_default_executor(loader)
        classes = source_classes()
        started: dict[str, Source] = {}

        async def start(name: str) -> None:
            cls = classes.get(name)
            if cls is None:
                self.failed[name] = "not available in this build"
                log.error("source %s: not available in this build", name)
                return
            source = cls(self.context)
            try:
                await source.start()
            except SourceUnavailableError as e:
                self.failed[name] = e.reason
                self.telemetry.source_up.labels(name).set(0)
                log.error("source %s disabled: %s%s", name, e.reason, f" (fix: {e.fix})" if e.fix else "")
                return
            started[name] = source

        enabled = self.config.sources.enabled()
        # All at once. (The kernel guests' syscalls smoke test once failed with this and passed
        # without: the cause was a race in that source's collect, which any change of timing
        # could expose; tests/test_startup_sources.py makes it happen and proves it fixed.)
        # The profiler after the others: its first ring-buffer records name every running
        # process on the event loop (their ELF files read: seconds, tens of them on a busy host),
        # which held up the start of a source still loading (a warm syscalls waited ~90 s at load 20).
        await asyncio.gather(*(start(name) for name in enabled if name != "profiler"))
        if "profiler" in enabled:
            await start("profiler")
        self.sources.extend(started[n] for n in enabled if n in started)
        if not self.sources:
            raise ReceiverError("no source could start: " +
                                "; ".join(f"{n}: {r}" for n, r in self.failed.items()) +
                                " (run `ebpf-otlp-receiver check` for what is missing)")
        loader.shutdown(wait=True)
        # Created now, its threads start on first use: after the drop, with the reduced set.
        loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="worker"))

    def _drop_privileges(self, gate: privileges.StartupThreads) -> None:
        """Keeps only the capabilities the running sources still use (receiver/kernel/privileges.py)
        in every thread: this one, the threads held since the sources started (each drops its
        own), the telemetry server's (restarted); then checks every thread of the process."""
        with gate.privileged():   # the CAP_BPF probe runs a thread and waits for it
            keep = privileges.needed_capabilities([s.name for s in self.sources],
                                                  self.config.sources.profiler.kernel_stacks,
                                                  tls_late_libraries=self.config.sources.http.keep_sys_admin_for_tls)
        try:
            kept, dropped = privileges.drop_capabilities(keep)
        except OSError as e:
            log.warning("could not drop capabilities: %s", e)
            return
        failed = gate.release(set(kept))
        if self.http:
            self.http.restart_thread()
        # The telemetry server's previous thread and its requests get a moment to end.
        left = privileges.threads_with_capabilities(wait=2.0)
        log.info("capabilities after start: kept %s; dropped %d others%s",
                 ", ".join(kept) or "none", len(dropped), "" if left else ", in every thread")
        if failed:
            log.warning("threads started during start-up could not drop capabilities: %s",
                        "; ".join(failed))
        if left:
            log.warning("threads still holding dropped capabilities: %s", "; ".join(left))

    async def _beat(self) -> None:
        while True:
            if self.http:
                self.http.beat()
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self.http:
            self.http.ready = False
            self.http.not_ready_reason = "shutting down"
        detached, failed = [], []
        for s in reversed(self.sources):
            try:
                await s.stop()
                detached.append(s.name)
            except Exception:
                failed.append(s.name)
                log.exception("source %s: error while stopping", s.name)
        self.sources.clear()
        await self.exporter.shutdown()
        if self._heartbeat:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self.http:
            self.http.stop()
            self.http = None
        log.info("%s", self.shutdown_summary(detached, failed))

    def shutdown_summary(self, detached: list[str], failed: list[str]) -> str:
        """The last line of the log: what went out, what did not, what was left attached."""
        t = self.telemetry.totals()

        def part(counts: dict[str, float]) -> str:
            total = int(sum(counts.values()))
            detail = ", ".join(f"{k} {int(v)}" for k, v in sorted(counts.items()) if v)
            return f"{total}" + (f" ({detail})" if detail else "")

        return (f"shutdown: sent {part(t['sent'])} items, dropped {part(t['dropped'])}, "
                f"lost in the kernel {part(t['lost'])}; detached {len(detached)} source(s)"
                + (f" ({', '.join(sorted(detached))})" if detached else "")
                + (f", {len(failed)} failed to detach ({', '.join(failed)})" if failed else ""))

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            await stop.wait()
            log.info("stopping: detaching sources and flushing")
        finally:
            await self.stop()
