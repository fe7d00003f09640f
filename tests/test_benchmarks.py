"""Every benchmark's smoke mode (``python -m benchmarks --smoke NAME``), so a benchmark broken by a
change elsewhere fails here instead of on the next ``make bench``: it must exit 0 and end with its
``bench: NAME FIGURE=VALUE UNIT`` lines, each figure below present and finite. A smoke run proves
the path, not the numbers: no value is compared with a target. All six took 3 min 12 s on a 2-core
VM at a load average of 7 to 8 from other work (profiler 79 s, soak 51 s, memory 32 s, syscalls
16 s, network 7 s, exporter 3 s); the agents' BPF compiles in loader processes are most of it."""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import subprocess
import sys
import time

import pytest

from benchmarks.__main__ import LONG, NAMES

from .harness import REPO

# The figures each smoke run prints. Left out on purpose: the profiler's comparisons with the
# OpenTelemetry eBPF profiler and its Python-frames-off run (not run in smoke mode), and syscalls'
# blocking_roundtrip_vs_floor (printed only when the ping-pong's floor stands above the noise).
SMOKE_FIGURES = {
    "exporter": {"cpu_s_per_100k_ours", "cpu_s_per_100k_sdk", "spans_per_s", "ratio_vs_sdk",
                 "http_spans_per_s", "http_vs_grpc"},
    "profiler": {"cpu_share", "bpf_ns_per_sample", "steady_bpf_ns_per_sample", "depth_vs_perf_dwarf", "rss",
                 "python_cpu_share", "python_bpf_ns_per_sample", "python_chain_share",
                 "v8_chain_share", "v8_bpf_ns_per_sample", "go_chain_share", "jvm_chain_share",
                 "jvm_bpf_ns_per_sample"},
    "network": {"connections", "spans", "lost"},
    "syscalls": {"program_ns_above_empty", "program_ns_above_empty_filtered", "overhead_vs_floor_min",
                 "overhead_vs_floor_max", "ns_added", "floor_ns", "overhead_vs_floor"},
    "memory": {"startup", "rss_peak", "rss_steady"},
    "http": {"throughput_ratio", "bpf_ns_per_request", "spans_per_request", "agent_cpu_per_10k_rps",
             "grpc_calls_ratio", "grpc_spans_per_call", "grpc_bpf_ns_per_call", "grpc_agent_cpu_us_per_call",
             "grpc_records_per_call", "grpc_agent_cpu_per_app_cpu", "grpc_load_average"},
    "startup": {"profile_attach_s", "agent_ready_s", "cold_agent_ready_s", "cold_profile_attach_s"},
    "soak": {"rss_peak_mb", "rss_end_mb", "rss_growth_pct", "startup_s"},
    "offcpu": {"throughput_ratio", "estimate_error", "recorded_per_switch"},
}
# Below pytest's own timeout (300 s), so a slow run fails with its output.
TIMEOUT_S = 270
BENCH_LINE = re.compile(r"^bench: (\w+) (\w+)=(\S+) (\S+)$")


def test_every_benchmark_has_a_smoke_mode_and_its_figures_listed() -> None:
    assert set(SMOKE_FIGURES) == set(NAMES + LONG)
    for name in NAMES + LONG:
        run = importlib.import_module(f"benchmarks.{name}").run
        assert "smoke" in inspect.signature(run).parameters, f"benchmarks/{name}.py: run() takes no smoke"


@pytest.mark.parametrize("name", NAMES + LONG)
def test_smoke_run_ends_with_finite_figures(name: str, bpf_ok: None, otelcol_bin: str) -> None:
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", name], cwd=REPO,
                              env={**os.environ, "OTELCOL_BIN": otelcol_bin}, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"smoke run of {name} still running after {TIMEOUT_S} s; output so far:\n{out[-4000:]}")
    elapsed = time.monotonic() - t0
    said = f"{name} smoke run ({elapsed:.0f} s, exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, said
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines and BENCH_LINE.match(lines[-1]), f"does not end with a bench line: {said}"
    figures: dict[str, float] = {}
    for ln in lines:
        if ln.startswith("bench:"):
            m = BENCH_LINE.match(ln)
            assert m and m[1] == name, f"malformed bench line {ln!r}: {said}"
            figures[m[2]] = float(m[3])
    missing = SMOKE_FIGURES[name] - set(figures)
    assert not missing, f"figures missing: {sorted(missing)}: {said}"
    not_finite = {k: v for k, v in figures.items() if not math.isfinite(v)}
    assert not not_finite, f"figures not finite: {not_finite}: {said}"
