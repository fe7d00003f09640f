"""``ebpf-otlp-receiver warm-cache``: fills the compile cache for the running kernel.

Each enabled source's programs (for the config given, else the defaults), and the program
``profile`` loads, are compiled by BCC in a loader process and stored in the compile cache
(``bpf.cache_dir``), so that the agent's and ``profile``'s next start loads them through libbpf
in a fraction of a second. Nothing is left running: each object is closed as soon as it is in
the cache (the loader attaches a source's tracepoint programs while it loads them, with empty
maps, and they are detached at once; no perf event, ring buffer or uprobe is opened).

The cache key holds the kernel release and its tracepoint formats: warming helps only starts on
this same kernel. ``make setup`` runs it on the host; an image build on another kernel would
store entries that no node uses (docs/operations.md, "Start-up").
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from .config import EbpfConfig

__all__ = ["HELP", "add_arguments", "cmd_warm_cache", "warm"]

HELP = "compile the enabled sources' BPF programs into the compile cache for this kernel, without running them"
log = logging.getLogger(__name__)


class _Discard:
    """The consumer of a source that is never started."""

    def consume_event(self, record: Any) -> None:
        pass

    def consume_metrics(self, snapshot: Any) -> None:
        pass

    def consume_profile(self, profile: Any) -> None:
        pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (default: built-in defaults)")
    p.add_argument("--no-profile", action="store_true",
                   help="not the program `ebpf-otlp-receiver profile` loads")


def _compile_once(source_cls: Any, config: EbpfConfig) -> None:
    from .kernel import compile_cache
    from .kernel.clock import KernelClock
    from .sources.base import SourceContext
    from .telemetry import SelfTelemetry

    source = source_cls(SourceContext(config, _Discard(), SelfTelemetry(), KernelClock()))  # type: ignore[arg-type]
    bpf = source._compile()
    try:
        compile_cache.wait_deferred(120.0)   # a hit loads tail-called programs on a thread
    finally:
        bpf.cleanup()


def warm(config: EbpfConfig, profile: bool = True) -> list[tuple[str, str, float]]:
    """(what, result, seconds) for each program warmed: result is ``cached`` (compiled and
    stored), ``already cached`` (a hit), ``not cacheable`` or ``failed: <reason>``."""
    from .errors import SourceUnavailableError
    from .kernel import compile_cache
    from .profile_cli import profile_config
    from .sources import source_classes

    compile_cache.configure(config.bpf.cache_dir, config.bpf.kernel_headers)
    classes = source_classes()
    targets: list[tuple[str, Any, EbpfConfig]] = [(n, classes[n], config) for n in config.sources.enabled()
                                                  if n in classes]
    if profile:
        targets.append(("profile", classes["profiler"], profile_config([1], 99, False)))
    rows = []
    for what, cls, cfg in targets:
        before = dict(compile_cache.stats)
        t0 = time.monotonic()
        try:
            _compile_once(cls, cfg)
        except SourceUnavailableError as e:
            rows.append((what, f"failed: {e.reason}", time.monotonic() - t0))
            continue
        delta = {k: v - before.get(k, 0) for k, v in compile_cache.stats.items() if v > before.get(k, 0)}
        result = ("not cacheable" if delta.get("uncacheable") else
                  "already cached" if delta.get("hit") and not delta.get("miss") else
                  "not stored" if delta.get("store_failed") else "cached")
        rows.append((what, result, time.monotonic() - t0))
    return rows


def cmd_warm_cache(args: argparse.Namespace) -> int:
    config = EbpfConfig.load(args.config)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.bpf.cache_dir:
        print("ebpf-otlp-receiver: error: the compile cache is off (bpf.cache_dir is empty)", file=sys.stderr)
        return 1
    print(f"warming the compile cache in {config.bpf.cache_dir} for this kernel…", file=sys.stderr, flush=True)
    rows = warm(config, profile=not args.no_profile)
    for what, result, seconds in rows:
        print(f"  {what:<10} {result} ({seconds:.1f}s)")
    failed = [r for r in rows if r[1].startswith(("failed", "not stored"))]
    return 1 if failed else 0
