"""The kernel smoke suite, run inside a guest by ``guest.sh`` (never by the host's pytest: the
file name does not start with ``test_``). Writes everything into the results folder, which the
host reads after the guest powered off:

- ``info.json``: kernel release and the agent's kernel feature probes;
- ``check.txt`` / ``check.json``: ``ebpf-otlp-receiver check`` output and exit code;
- ``all.json``: the agent run with all four sources against the guest's Collector: which sources
  came up, which were disabled and why, and its exit code (no kernel may crash it);
- ``junit.xml``: the exact-expectation end-to-end tests of each source (the host suite's own
  tests, run unchanged), exporting to a Collector inside the guest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# source → the end-to-end tests that prove it exact (see docs/testing.md's kernel matrix section).
SMOKE_TESTS = {
    "process": ["tests/sources/test_process_e2e.py::test_exec_and_exit_records_are_exact"],
    "syscalls": ["tests/sources/test_syscalls_e2e.py::test_per_process_calls_and_errors_are_exact",
                 "tests/sources/test_syscalls_e2e.py::test_blocked_call_is_timed_while_another_thread_uses_its_cpu"],
    "network": ["tests/sources/test_network_e2e.py::test_connections_exact_ipv4_and_ipv6"],
    "profiler": ["tests/profiling/test_profiler_e2e.py::test_sidecar_exports_profiles_to_the_collector"],
}
SOURCES = tuple(SMOKE_TESTS)
# Where the kernel has a feature the source uses, the test of that feature in place of the
# source's smoke tests (feature → source, tests): with bpf_task_pt_regs the profiler walks user
# stacks from .eh_frame, and the shared library test proves that walk, while what the sidecar
# test adds (the export path) does not depend on the kernel and the host suite proves it. Each
# profiler test costs a guest a profiler compile: minutes under emulation.
FEATURE_TESTS = {
    "task_pt_regs": ("profiler", ["tests/profiling/test_unwind_e2e.py::test_shared_library_without_frame_pointers"]),
}


def smoke_tests(source: str, features: object) -> list[str]:
    """The exact tests that prove ``source`` on a kernel with ``features`` (a KernelFeatures)."""
    instead = [t for name, (s, tests) in FEATURE_TESTS.items()
               if s == source and features.has(name) for t in tests]  # type: ignore[attr-defined]
    return instead or SMOKE_TESTS[source]


def stamp(msg: str) -> None:
    print(f"guest [{time.monotonic():7.1f}] {msg}", flush=True)


def write(out: Path, name: str, data: object) -> None:
    (out / name).write_text(json.dumps(data, indent=1) if not isinstance(data, str) else data)


def run_check(out: Path) -> None:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "receiver", "check"], capture_output=True, text=True,
                       cwd=REPO, timeout=300, check=False)
    write(out, "check.txt", p.stdout + p.stderr)
    write(out, "check.json", {"returncode": p.returncode, "seconds": round(time.monotonic() - t0, 1)})
    stamp(f"check: exit {p.returncode}")


def run_all_sources(out: Path) -> None:
    """The agent with every source on: each comes up, or is disabled with its reason; the agent
    itself stays up and stops cleanly."""
    from tests.harness import Agent, Collector, agent_config

    work = Path(tempfile.mkdtemp(prefix="all-"))
    result: dict[str, object] = {}
    collector = Collector(os.environ["OTELCOL_BIN"], work).start()
    t0 = time.monotonic()
    try:
        # The profiler with off-CPU time too (no extra compile): on, or off with its reason in the log.
        cfg = agent_config(collector, {s: {"off_cpu": {"enabled": True}} if s == "profiler" else {}
                                       for s in SOURCES})
        agent = Agent(work, cfg)
        try:
            agent.start(timeout=300)
            result["ready_seconds"] = round(time.monotonic() - t0, 1)
            result["up"] = {s: agent.metric_value("ebpf_receiver_source_up", source=s) == 1
                            for s in SOURCES}
        except AssertionError as e:
            result["error"] = str(e)[-3000:]
        finally:
            if agent.proc is not None:
                try:
                    result["returncode"] = agent.stop(timeout=60)
                except AssertionError as e:
                    result["returncode"] = None
                    result["error"] = str(e)[-3000:]
        log = agent.log()
        result["disabled"] = {m.group(1): m.group(2) for m in
                              re.finditer(r"source (\w+) disabled: (.*)", log)}
        off_cpu = re.search(r"off-CPU time disabled: (.*)", log)
        result["off_cpu"] = f"disabled: {off_cpu.group(1)}" if off_cpu else "ok"
        result["log_tail"] = log[-4000:]
    finally:
        collector.stop()
    write(out, "all.json", result)
    stamp(f"all sources: {result.get('up')} disabled={result.get('disabled')} "
          f"exit={result.get('returncode')}")


def run_smoke_tests(out: Path) -> None:
    """The sources' exact tests, except for a source this kernel cannot run (its ``check`` row
    and the all-sources run already say why)."""
    from receiver.kernel import features as kernel_features

    cannot = [s for s in SOURCES if any(f.disables for f in kernel_features.degradations(s))]
    feats = kernel_features.probe()
    ids = [t for s in SOURCES if s not in cannot for t in smoke_tests(s, feats)]
    stamp(f"smoke tests (not for {cannot}, which this kernel cannot run)" if cannot else "smoke tests")
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                        "-o", "timeout=900", f"--junitxml={out / 'junit.xml'}", *ids],
                       cwd=REPO, capture_output=True, text=True, check=False)
    write(out, "pytest.txt", p.stdout[-20000:] + p.stderr[-5000:])
    stamp(f"smoke tests: exit {p.returncode}: {p.stdout.strip().splitlines()[-1:]}")


def main() -> int:
    out = Path(sys.argv[1])
    from receiver.kernel import features as kernel_features

    write(out, "info.json", {"release": os.uname().release,
                             "features": kernel_features.probe().as_dict()})
    stamp(f"kernel {os.uname().release}")
    for step in (run_check, run_all_sources, run_smoke_tests):
        try:
            step(out)
        except Exception as e:  # noqa: BLE001 -- one step failing must not hide the others' results
            stamp(f"{step.__name__} failed: {type(e).__name__}: {e}")
            write(out, f"{step.__name__}.error", f"{type(e).__name__}: {e}")
    write(out, "done", "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
