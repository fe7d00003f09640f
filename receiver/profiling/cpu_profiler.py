"""The library's CPU profiler: ``EbpfCpuProfiler(config).start()`` … ``.stop()`` → pprof.

Synchronous for the caller: a background thread reads the ring buffer (new processes, so
short-lived ones get symbolized; samples whose stack the stack map refused) and drains the kernel
maps every ``report_interval`` so they never fill; ``stop()`` detaches, drains the rest and
returns the whole session as one profile. Needs root (or CAP_BPF + CAP_PERFMON), like the agent.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Self

from ..config import EbpfConfig, ProfilerSourceConfig
from ..proto import profile_pb2
from .abi import LOST_REASONS
from .model import OFF_CPU, CpuProfile, Frame, StackSample
from .output.pprof import to_pprof
from .sampler import CpuSampler

__all__ = ["EbpfCpuProfiler"]

log = logging.getLogger(__name__)

RING_POLL_MS = 100


class EbpfCpuProfiler:
    """Samples on-CPU stacks of every process (or those ``config.filter`` selects)."""

    def __init__(self, config: EbpfConfig | ProfilerSourceConfig | None = None):
        if isinstance(config, EbpfConfig):
            config = config.sources.profiler
        self.config = config or ProfilerSourceConfig(preset="development")
        self.sampler = CpuSampler(self.config)
        self._merged: dict[tuple[int, int, str, tuple[Frame, ...]], StackSample] = {}
        self._merged_off: dict[tuple[int, int, str, tuple[Frame, ...]], StackSample] = {}
        self.off_cpu_blocks = 0          # off-CPU blocks recorded (config.off_cpu)
        self.off_cpu_stats: dict[str, int] = {}   # the off-CPU counters (stop_profile)
        self._start_ns = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._callback: Any = None   # kept alive while BCC holds it
        self.errors = 0              # records or drains that failed (logged)
        # The session's profile is its result, so it is kept whole, up to a bound on distinct
        # (thread, stack) keys; samples of keys beyond it are only counted.
        self.max_unique_stacks = max(16 * self.config.max_stacks, 65536)
        self.samples_over_bound = 0
        self.lost: dict[str, int] = {}   # kernel-side losses by reason, set by stop_profile()
        self.truncated_samples = 0       # samples whose walked user stack stopped early (stop_profile)
        self.unwind_stats: dict[str, int] = {}   # the kernel walker's counters (stop_profile)
        self.runtime_stats: dict[str, dict[str, int]] = {}   # each running runtime's counters (stop_profile)

    @property
    def python_stats(self) -> dict[str, int]:
        """CPython's counters at stop (``runtime_stats["cpython"]``; empty when it did not run)."""
        return self.runtime_stats.get("cpython", {})

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> Self:
        """Loads and attaches the program; raises ``SourceUnavailableError`` saying why not."""
        if self._thread is not None:
            return self
        bpf = self.sampler.load()
        try:
            self.sampler.bind(bpf)
            self._callback = self._on_record
            bpf["events"].open_ring_buffer(self._callback)
        except BaseException:
            self.sampler.bpf = bpf
            self.sampler.close()
            raise
        self._start_ns = time.time_ns()
        self._merged.clear()
        self.samples_over_bound = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ebpf-cpu-profiler", daemon=True)
        self._thread.start()
        return self

    def _on_record(self, _ctx: Any, data: int, _size: int) -> int:
        try:
            self.sampler.on_record(data)
        except Exception:
            self.errors += 1
            log.exception("profiler: cannot handle a ring-buffer record")
        return 0

    def _run(self) -> None:
        bpf = self.sampler.bpf
        interval = float(self.config.report_interval)
        next_drain = time.monotonic() + interval
        while not self._stop.is_set():
            bpf.ring_buffer_poll(RING_POLL_MS)
            if time.monotonic() >= next_drain:
                next_drain += interval
                try:
                    bpf.ring_buffer_consume()   # whole samples are sent without a wake-up
                    self._merge(self.sampler.drain())
                except Exception:   # keep sampling; stop() drains again
                    self.errors += 1
                    log.exception("profiler: draining the kernel maps failed")

    def _merge(self, profile: CpuProfile) -> None:
        if profile.off_cpu is not None:
            self.off_cpu_blocks += profile.off_cpu.blocks
            self._merge_into(self._merged_off, profile.off_cpu)
        self._merge_into(self._merged, profile)

    def _merge_into(self, merged: dict[tuple[int, int, str, tuple[Frame, ...]], StackSample],
                    profile: CpuProfile) -> None:
        for s in profile.samples:
            key = (s.pid, s.tid, s.thread_name, s.frames)
            have = merged.get(key)
            if have is not None:
                have.count += s.count
            elif len(merged) < self.max_unique_stacks:
                merged[key] = StackSample(s.frames, s.count, s.pid, s.tid, s.thread_name,
                                                s.process_name, s.container_id, s.cgroup_id)
            else:
                if not self.samples_over_bound:
                    log.warning("profiler: more than %d distinct stacks in this session; samples of "
                                "further stacks are counted in samples_over_bound, not kept",
                                self.max_unique_stacks)
                self.samples_over_bound += s.count

    def samples_so_far(self) -> int:
        """Samples counted in the kernel since ``start()`` (for progress reports)."""
        return self.sampler.stats()["counted"] if self.sampler.bpf is not None else 0

    def stop_profile(self) -> CpuProfile:
        """Detaches and returns everything sampled since ``start()`` as a ``CpuProfile``."""
        if self._thread is None:
            raise RuntimeError("the profiler is not running")
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self.sampler.detach()
            self.sampler.bpf.ring_buffer_consume()   # notices of processes sampled last
            self._merge(self.sampler.drain())
            self.lost = dict(zip(LOST_REASONS, self.sampler.lost_totals()))
            self.truncated_samples = self.sampler.truncated_samples
            self.unwind_stats = self.sampler.unwind_stats()
            self.runtime_stats = {rt.name: rt.all_stats() for rt in self.sampler.runtimes or ()}
            self.off_cpu_stats = self.sampler.offcpu_stats()
        finally:
            self.sampler.close()
        end = time.time_ns()
        profile = CpuProfile(start_unix_nano=self._start_ns, duration_ns=end - self._start_ns,
                             frequency_hz=self.sampler.frequency, samples=list(self._merged.values()))
        if self.sampler.off_cpu:
            profile.off_cpu = CpuProfile(start_unix_nano=self._start_ns, duration_ns=end - self._start_ns,
                                         frequency_hz=self.sampler.frequency, samples=list(self._merged_off.values()),
                                         sample_type=OFF_CPU, blocks=self.off_cpu_blocks)
        self._merged.clear()
        self._merged_off.clear()
        return profile

    def stop(self) -> profile_pb2.Profile:
        """Detaches and returns everything sampled since ``start()`` as a pprof ``Profile``."""
        return to_pprof(self.stop_profile())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self.stop_profile()
