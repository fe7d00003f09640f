"""CPU profiler source (``bpf/profiler.bpf.c`` through ``CpuSampler``): every ``report_interval``
the kernel's per-stack counts are drained and symbolized into a ``CpuProfile``, handed to the
consumer (OTLP Profiles, one resource per process), and written as a pprof file to ``pprof_dir``
when that is set. With ``off_cpu`` on, the profile carries the interval's off-CPU time beside it
(``CpuProfile.off_cpu``: a second OTLP ``Profile`` per process, an ``offcpu-*.pb.gz`` file)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from pathlib import Path
from typing import Any

from ..config import EbpfConfig
from ..kernel import heap
from ..profiling.abi import LOST_REASONS, RECORD_SIZES
from ..profiling.model import CpuProfile
from ..profiling.output.pprof import write_pprof
from ..profiling.runtimes import RUNTIMES
from ..profiling.sampler import MIN_WHOLE_KEYS, REC_OFFCPU, CpuSampler
from .base import BccSource, Requirement

__all__ = ["ProfilerSource"]

log = logging.getLogger(__name__)


def _user_stack_counts(sampler: CpuSampler) -> dict[str, int]:
    if sampler.bpf is None or sampler.unwinder is None:
        return {}
    k = sampler.unwind_stats()
    return {"walked": k.get("walked", 0), "truncated": k.get("truncated", 0),
            "depth_limit": k.get("depth_limit", 0), "frame_pointers": k.get("no_table", 0)}


def _row_gauges(sampler: CpuSampler) -> dict[str, int]:
    if sampler.unwinder is None:
        return {}
    g = sampler.unwinder.gauges()
    return {"used": g["rows_used"], "capacity": g["rows_capacity"]}


def _watch_caches(telemetry: Any, sampler: CpuSampler, config: Any, caches: Any) -> None:
    """The profiler's caches as ``ebpf_receiver_cache_*`` series (the unwinder's exists only once
    the program is loaded: 0 until then; each runtime registers its own in ``Runtime.watch``)."""
    symbolizer, demangler = sampler.symbolizer, sampler.demangler
    for name in ("symbol_files", "symbol_processes", "symbol_frames"):
        telemetry.watch_cache(name, lambda n=name: symbolizer.cache_sizes()[n][0],
                              symbolizer.cache_sizes()[name][1],
                              lambda n=name: symbolizer.cache_sizes()[n][2])
    telemetry.watch_cache("demangled_names", demangler.__len__, demangler.limit,
                          lambda: demangler.evictions)
    # Samples refused beyond the bound are also counted as lost (stack_collision).
    telemetry.watch_cache("profile_stacks", lambda: len(sampler._whole), max(config.max_stacks, MIN_WHOLE_KEYS),
                          lambda: sampler.whole_lost)
    telemetry.watch_cache("unwind_processes",
                          lambda: sampler.unwinder.gauges()["processes"] if sampler.unwinder else 0,
                          config.unwind_processes)


class ProfilerSource(BccSource):
    name = "profiler"
    bpf_file = "profiler.bpf.c"
    lost_reasons = LOST_REASONS

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.config = ctx.config.sources.profiler
        self.report_interval = float(self.config.report_interval)
        self.sampler = CpuSampler(self.config, self.name, ctx.config.caches)
        stats = self.sampler.symbolizer.stats
        if self.config.request_links or self.config.thread_ctx_read:
            from ..profiling import links

            ctx.telemetry.watch_counters(
                "profiler_request_links", "Request links (sources.profiler.request_links): server requests "
                "linked, not_linked (not sampled, or the thread map full), pipelined (no link), and sample "
                "links unresolved (exported without a link); thread_ctx_* (sources.profiler.thread_ctx_read, "
                "docs/profiler.md#request-links)", "reason", lambda: dict(links.counts))
        ctx.telemetry.watch_counters(
            "profiler_frames", "Stack frames symbolized, by result (unresolved ones keep address, "
            "file and build id)", "result",
            lambda: {"resolved": stats.frames_resolved, "unresolved": stats.frames_unresolved})
        ctx.telemetry.watch_counters(
            "profiler_symbol_files", "ELF files behind sampled code: parsed (cache miss), served "
            "from the symbol cache, evicted from it, or unreadable", "event",
            lambda: {"parsed": stats.file_cache_misses, "cache_hit": stats.file_cache_hits,
                     "evicted": stats.file_cache_evictions, "error": stats.file_errors})
        sampler = self.sampler
        ctx.telemetry.watch_counters(
            "profiler_user_stacks", "Samples by how their user stack was walked: with unwind tables "
            "(walked; of those, truncated where the walk left the known mappings, met a rule it cannot "
            "follow or could not read the stack, and depth_limit at 127 frames), or with frame pointers "
            "only (frame_pointers: the process has no tables loaded yet)", "result",
            lambda: _user_stack_counts(sampler))
        ctx.telemetry.watch_counters(
            "profiler_unwind_tables", "Unwind tables (from .eh_frame) by event: built and loaded, "
            "evicted to make room, not loaded (no_cfi, unreadable, full: no room in unwind_table_rows), "
            "processes and mappings beyond unwind_processes/64 (walked with frame pointers), "
            "queue_full, error", "event",
            lambda: dict(sampler.unwinder.stats) if sampler.unwinder is not None else {})
        for runtime in RUNTIMES:   # each runtime's counters and caches (0 while it is off)
            runtime.watch(ctx.telemetry, lambda name=runtime.name: sampler.runtime(name), ctx.config.caches)
        _watch_caches(ctx.telemetry, sampler, self.config, ctx.config.caches)
        ctx.telemetry.watch_counters(
            "profiler_off_cpu", "Off-CPU time (sources.profiler.off_cpu) by event: switch-outs recorded, "
            "unsampled (passed over by sample_probability), filtered, no_user_stack (kernel threads); "
            "blocks counted, short (under min_block)", "event", sampler.offcpu_stats)
        ctx.telemetry.watch_counters(
            "profiler_go_labels", "Goroutine labels (docs/profiler.md, Go): Go processes entered, "
            "unsupported_version (a Go version without offsets: no labels), label sets read, unreadable, "
            "over_limit (beyond 1024 per process per report: samples without labels), labels truncated "
            "(beyond 10, or a key over 15 / value over 47 bytes) and invalid (key not UTF-8)", "event",
            lambda: dict(sampler.go_labels.stats) if sampler.go_labels is not None else {})
        ctx.telemetry.watch_gauges(
            "profiler_unwind_table_rows", "Rows of the kernel's unwind table array: used and capacity "
            "(16 bytes each)", "state",
            lambda: _row_gauges(sampler))

    @classmethod
    def requirements(cls, config: EbpfConfig) -> list[Requirement]:
        reqs = [Requirement("perf_event", "software cpu-clock"),
                Requirement("tracepoint", "sched:sched_process_exec")]
        if config.sources.profiler.off_cpu.enabled:
            reqs.append(Requirement("tracepoint", "sched:sched_switch"))
        return reqs

    def cflags(self) -> list[str]:
        return self.sampler.cflags()

    def _compile(self) -> Any:
        return self.sampler.load()

    def configure(self, bpf: Any) -> None:
        self.sampler.bind(bpf)

    def handle_event(self, data: int, size: int) -> None:
        kind = ctypes.c_uint32.from_address(data).value if size >= 4 else 0
        need = self.sampler.offcpu_record_size if kind == REC_OFFCPU else RECORD_SIZES.get(kind)
        if need is None or size < need:
            self.count_lost("decode_error")
            return
        self.sampler.on_record(data)

    def _read_lost_counters(self) -> None:
        # The kernel's lost[] slots plus what the sampler dropped in user space.
        if self.bpf is None:
            return
        for i, total in enumerate(self.sampler.lost_totals()):
            if total > self._lost_seen[i]:
                self.count_lost(self.lost_reasons[i], total - self._lost_seen[i])
                self._lost_seen[i] = total

    async def _periodic(self) -> None:
        """As ``BccSource._periodic``, but the drain (map reads and symbolization, which on first
        sight of many binaries can take seconds) runs in a worker thread, so the event loop keeps
        reading the other sources' ring buffers and answering /healthz meanwhile."""
        while True:
            await asyncio.sleep(self.report_interval)
            self.ctx.clock.refresh()
            self._consume()
            drain = asyncio.ensure_future(asyncio.to_thread(self.sampler.drain))
            try:
                profile = await asyncio.shield(drain)
            except asyncio.CancelledError:   # stopping: the drain in progress still goes out
                self._export(await drain)
                raise
            except Exception:
                log.exception("source %s: periodic collection failed", self.name)
                continue
            self._export(profile)
            del profile
            self._read_lost_counters()
            # A drain that parsed new binaries frees most of what it allocated; without this,
            # glibc keeps those pages (~30 MB after the first drain: the agent's peak, kept).
            await asyncio.to_thread(heap.trim)

    def collect(self) -> None:
        self._export(self.sampler.drain())

    def _export(self, profile: CpuProfile) -> None:
        off = profile.off_cpu
        if off is not None and not off.samples:
            profile.off_cpu = off = None
        if not profile.samples and off is None:
            return
        self._received.inc(profile.total_samples + (off.blocks if off is not None else 0))
        self.ctx.consumer.consume_profile(profile)
        if self.config.pprof_dir:
            if profile.samples:
                self._write_pprof(profile)
            if off is not None:
                self._write_pprof(off, "offcpu")

    def _write_pprof(self, profile: CpuProfile, kind: str = "cpu") -> None:
        directory = Path(self.config.pprof_dir or ".")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(profile.start_unix_nano / 1e9))
        path = directory / f"{kind}-{stamp}-{profile.start_unix_nano % 1_000_000_000:09d}.pb.gz"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_pprof(profile, path)
        except OSError as e:
            log.warning("profiler: cannot write %s: %s", path, e)

    def detach(self) -> None:
        self.sampler.detach()

    async def stop(self) -> None:
        # No sample after this: the final collect in BccSource.stop drains the generation that
        # was active, so the profile ends at the stop.
        if self.bpf is not None:
            self.sampler.detach()
        await super().stop()
