"""Nanoseconds added per syscall on a tight getppid loop: (a) no BPF, (b) empty
raw_syscalls sys_enter/sys_exit programs (the floor the tracepoints themselves cost), (c) our
syscall source. Reports (c − a) / (b − a); target ≤ 1.5. Rounds are interleaved and the median
taken, so drift on a shared machine hits all three alike."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import tempfile
from pathlib import Path

LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""

EMPTY_BPF = r"""
TRACEPOINT_PROBE(raw_syscalls, sys_enter) { return 0; }
TRACEPOINT_PROBE(raw_syscalls, sys_exit) { return 0; }
"""

# For the breakdown only: the least any latency measurement costs with raw tracepoints (a
# per-task start slot and two clock reads), so the report shows what our aggregation adds on top.
TIMING_ONLY_BPF = r"""
BPF_TASK_STORAGE(start, u64);
RAW_TRACEPOINT_PROBE(sys_enter) {
    u64 *s = start.task_storage_get(bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (s)
        *s = bpf_ktime_get_ns();
    return 0;
}
RAW_TRACEPOINT_PROBE(sys_exit) {
    u64 *s = start.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (s)
        *s = bpf_ktime_get_ns() - *s;
    return 0;
}
"""

CALLS = 2_000_000
ROUNDS = 7


def _ns_per_call(binary: Path) -> float:
    return float(subprocess.run([str(binary), str(CALLS)], capture_output=True, text=True,
                                check=True).stdout)


def run() -> int:
    from bcc import BPF

    from receiver.config import EbpfConfig
    from receiver.convert.converter import EbpfOtlpConverter
    from receiver.convert.resource import ProcessResources, detect_host_attributes
    from receiver.export.otlp_grpc import OtlpGrpcExporter
    from receiver.sources.base import KernelClock, SourceContext
    from receiver.sources.syscalls import SyscallsSource
    from receiver.telemetry import SelfTelemetry

    tmp = Path(tempfile.mkdtemp(prefix="bench-syscalls-"))
    (tmp / "loop.c").write_text(LOOP_C)
    binary = tmp / "loop"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(tmp / "loop.c")], check=True)

    config = EbpfConfig.from_dict({"sources": {"syscalls": {"enabled": True, "slow_spans": True}}},
                                  environ={})
    telemetry = SelfTelemetry()
    # Nothing listens there: the source's output is queued and dropped, which is not measured.
    exporter = OtlpGrpcExporter(config.exporter.__class__(endpoint="http://127.0.0.1:9"), telemetry)
    ctx = SourceContext(config, exporter, EbpfOtlpConverter(), telemetry,
                        ProcessResources(detect_host_attributes(config.resource)), KernelClock())

    results: dict[str, list[float]] = {"none": [], "empty": [], "timing": [], "ours": []}

    async def measure() -> None:
        source = SyscallsSource(ctx)
        for _ in range(ROUNDS):
            results["none"].append(_ns_per_call(binary))
            empty = BPF(text=EMPTY_BPF)
            results["empty"].append(await asyncio.to_thread(_ns_per_call, binary))
            empty.cleanup()
            timing = BPF(text=TIMING_ONLY_BPF)
            results["timing"].append(await asyncio.to_thread(_ns_per_call, binary))
            timing.cleanup()
            await source.start()
            results["ours"].append(await asyncio.to_thread(_ns_per_call, binary))
            await source.stop()

    asyncio.run(measure())
    a, b, t, c = (statistics.median(results[k]) for k in ("none", "empty", "timing", "ours"))
    print(f"syscalls: getppid ns/call, median of {ROUNDS} rounds × {CALLS} calls")
    print(f"  (a) no BPF            {a:8.1f} ns")
    print(f"  (b) empty programs    {b:8.1f} ns   floor = {b - a:.1f} ns")
    print(f"  (c) syscall source    {c:8.1f} ns   added = {c - a:.1f} ns")
    print(f"  breakdown: a per-task start slot and two clock reads alone add {t - a:.1f} ns; "
          f"counts, errors and histograms add {c - t:.1f} ns on top")
    print(f"bench: syscalls ns_added={c - a:.1f} ns")
    print(f"bench: syscalls floor_ns={b - a:.1f} ns")
    print(f"bench: syscalls overhead_vs_floor={(c - a) / (b - a):.2f} ratio")
    return 0
