"""``ebpf-otlp-receiver profile``: a one-off CPU profile to files, without any Collector.

    ebpf-otlp-receiver profile --duration 10s [--pid N] [--frequency F] --output cpu.pb.gz
                               [--folded cpu.folded] [--flamegraph cpu.svg] [--off-cpu]

With ``--off-cpu`` the files hold off-CPU time instead: where threads waited, in nanoseconds
(pprof sample type ``off_cpu``; ``go tool pprof -sample_index=off_cpu``), every switch recorded.

Progress goes to stderr. Ctrl-C ends the profile early; the files are still written.
Exit codes as for every command: 0 done, 1 cannot profile here (e.g. not root), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from .config import EbpfConfig, parse_duration
from .errors import SourceUnavailableError

__all__ = ["HELP", "add_arguments", "cmd_profile"]

PROGRESS_EVERY_S = 1.0
MAX_DURATION_S = 24 * 3600


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 10s, 500ms, 2m)") from None
    if not 0 < seconds <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 24h")
    return seconds


def _pid(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id") from None
    if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
        raise argparse.ArgumentTypeError(f"no process with pid {text}")
    return pid


def _output_path(text: str) -> Path:
    path = Path(text)
    try:
        found = path.parent.is_dir()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot reach directory {str(path.parent)!r}: {e.strerror}") from None
    if not found:
        raise argparse.ArgumentTypeError(f"directory {str(path.parent)!r} does not exist")
    return path


HELP = "a CPU profile to pprof/folded/SVG files, without a Collector"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", "-d", type=_duration, default=10.0, metavar="DURATION",
                   help="how long to sample (default 10s); Ctrl-C ends early")
    p.add_argument("--pid", "-p", type=_pid, action="append", metavar="PID",
                   help="only this process (repeatable; default: every process)")
    p.add_argument("--frequency", "-F", type=int, default=99, metavar="HZ",
                   help="samples per second per CPU, 1 to 1000 (default 99)")
    p.add_argument("--output", "-o", type=_output_path, required=True, metavar="FILE",
                   help="pprof file, gzip-compressed (go tool pprof reads it)")
    p.add_argument("--folded", type=_output_path, metavar="FILE", help="also folded stacks (flamegraph.pl input)")
    p.add_argument("--flamegraph", type=_output_path, metavar="FILE", help="also an SVG flame graph")
    p.add_argument("--off-cpu", action="store_true",
                   help="off-CPU time instead: where threads waited, in nanoseconds (pprof sample type off_cpu)")


def _progress(text: str, final: bool = False) -> None:
    if sys.stderr.isatty():
        print(f"\r{text}", end="\n" if final else "", file=sys.stderr, flush=True)
    elif final:
        print(text, file=sys.stderr, flush=True)


def profile_config(pids: list[int], frequency: int, off_cpu: bool) -> EbpfConfig:
    """The config ``profile`` runs the profiler with (``warm-cache`` compiles its program too:
    the pids go into maps, so any pid list gives the same program)."""
    section: dict[str, object] = {"preset": "development", "frequency": frequency, "report_interval": "5s",
                                  "filter": {"pids": pids}}
    if off_cpu:
        section["off_cpu"] = {"enabled": True, "sample_probability": 1.0}
    return EbpfConfig.from_dict({"sources": {"profiler": section}}, environ={})


def cmd_profile(args: argparse.Namespace) -> int:
    from .kernel.host import has_bpf_capabilities
    from .profiling.cpu_profiler import EbpfCpuProfiler
    from .profiling.output.flamegraph import to_folded, write_flamegraph_svg
    from .profiling.output.pprof import write_pprof

    config = profile_config(args.pid or [], args.frequency, args.off_cpu)  # ConfigError → 2
    if os.geteuid() != 0 and not has_bpf_capabilities():
        print("ebpf-otlp-receiver: error: profiling loads a BPF program, which needs root or "
              "CAP_BPF+CAP_PERFMON (fix: run it with sudo)", file=sys.stderr)
        return 1
    who = f"pid {', '.join(map(str, args.pid))}" if args.pid else "all processes"
    print(f"profiling {who} at {args.frequency} Hz for {args.duration:g}s (Ctrl-C ends early); "
          "loading the BPF program…", file=sys.stderr, flush=True)
    profiler = EbpfCpuProfiler(config)
    try:
        profiler.start()
    except SourceUnavailableError as e:
        print(f"ebpf-otlp-receiver: error: {e.reason}" + (f" (fix: {e.fix})" if e.fix else ""),
              file=sys.stderr)
        return 1
    # Ctrl-C (SIGINT) ends the profile early even where the CLI inherited SIGINT ignored, as a
    # command started in the background by a non-interactive shell does: Python then leaves it
    # ignored, and `kill -INT` would never end the profile.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("attached; sampling", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    interrupted = False
    try:
        while (left := args.duration - (time.monotonic() - t0)) > 0:
            time.sleep(min(PROGRESS_EVERY_S, left))
            _progress(f"  {time.monotonic() - t0:5.1f}s  {profiler.samples_so_far()} samples")
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.monotonic() - t0   # sampled for; stop_profile's drain is not part of it
    profile = profiler.stop_profile()
    if args.off_cpu and profile.off_cpu is not None:
        off = profile.off_cpu
        _progress(f"off-CPU: {off.blocks} blocks, {sum(s.count for s in off.samples) / 1e9:.2f}s off the CPU "
                  f"in {len(off.samples)} stacks", final=True)
        profile = off
    _progress(f"{'stopped by Ctrl-C after' if interrupted else 'sampled for'} {elapsed:.1f}s: "
              f"{profile.total_samples} samples in {len(profile.samples)} stacks", final=True)
    if any(profiler.lost.values()):
        print("note: samples lost in the kernel: " + ", ".join(
            f"{n} {reason}" for reason, n in profiler.lost.items() if n), file=sys.stderr)
    walked = profiler.unwind_stats.get("walked", 0)
    if walked:
        print(f"user stacks: {walked} walked with unwind tables, {profiler.truncated_samples} of the "
              f"profiled samples truncated (the walk stopped before the thread's first frame), "
              f"{profiler.unwind_stats.get('no_table', 0)} with frame pointers only (tables not yet "
              "loaded)", file=sys.stderr)
    py = profiler.python_stats
    if py.get("walked"):
        print(f"python: {py['walked']} samples of CPython threads walked, {py.get('frames_resolved', 0)} Python "
              f"frames named, {py.get('frames_unresolved', 0)} not (code object unreadable), "
              f"{py.get('misaligned_samples', 0)} samples with Python runs and eval frames out of step",
              file=sys.stderr)
    if profiler.samples_over_bound:
        print(f"note: {profiler.samples_over_bound} samples of stacks beyond the "
              f"{profiler.max_unique_stacks} distinct ones kept are not in the files", file=sys.stderr)

    write_pprof(profile, args.output)
    written = [str(args.output)]
    if args.folded:
        args.folded.write_text(to_folded(profile))
        written.append(str(args.folded))
    if args.flamegraph:
        write_flamegraph_svg(profile, args.flamegraph,
                             title=(f"Off-CPU: {who}, {elapsed:.1f}s" if args.off_cpu
                                    else f"CPU: {who}, {args.frequency} Hz, {elapsed:.1f}s"))
        written.append(str(args.flamegraph))
    print(f"wrote {', '.join(written)}; view with: go tool pprof -http=: {args.output}", file=sys.stderr)
    return 0

