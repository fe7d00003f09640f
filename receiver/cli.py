"""Command line: ``run``, ``check`` (and the profiler's ``profile``).

Exit codes: 0 success, 1 runtime failure (e.g. no source could start), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from . import cli_warm, profile_cli
from ._version import __version__
from .config import EbpfConfig
from .errors import ConfigError, ReceiverError

__all__ = ["main", "build_parser", "COMMANDS"]

log = logging.getLogger("receiver")

EPILOG = """examples:
  ebpf-otlp-receiver check --config deploy/config/local.yaml
  ebpf-otlp-receiver run --config /etc/ebpf-otlp-receiver/config.yaml
  OTEL_EXPORTER_OTLP_ENDPOINT=http://otelcol:4317 ebpf-otlp-receiver run
  ebpf-otlp-receiver profile --duration 10s --pid 1234 --output cpu.pb.gz --flamegraph cpu.svg
  ebpf-otlp-receiver warm-cache --config /etc/ebpf-otlp-receiver/config.yaml

environment: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_INSECURE,
OTEL_EXPORTER_OTLP_CERTIFICATE, OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME override the file.
"""


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load_config(path: str | None) -> EbpfConfig:
    return EbpfConfig.load(path)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    # Files the agent writes (pprof files, ...) are never writable by group or others.
    os.umask(os.umask(0o022) | 0o022)
    _setup_logging(args.log_level or config.log_level)
    from .kernel import heap

    heap.limit_arenas(2)   # before gRPC and the workers start threads (issue 16: RSS)
    from .service import Service

    runner: Callable[..., object] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def on_signal(signame: str) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen == 1:
                log.info("%s: shutting down (send again to force)", signame)
                stop.set()
            else:
                log.warning("%s again: exiting without flushing", signame)
                os._exit(1)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        await Service(config).run(stop)

    runner(main())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    from .preflight import format_rows, run_checks

    rows = run_checks(config)
    print(format_rows(rows))
    blocking = [r for r in rows if not r.ok and r.needed_by]
    if blocking:
        print(f"\n{len(blocking)} requirement(s) missing for enabled sources "
              f"({', '.join(config.sources.enabled())}).")
        return 1
    print(f"\nall requirements met for: {', '.join(config.sources.enabled())}")
    return 0




def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (default: built-in defaults)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (default: built-in defaults)")


# name → (help, add_arguments, handler)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "run": ("run the sources and export until SIGINT/SIGTERM", _add_run, cmd_run),
    "check": ("preflight: what this host has and lacks for the configured sources", _add_check, cmd_check),
    "profile": (profile_cli.HELP, profile_cli.add_arguments, profile_cli.cmd_profile),
    "warm-cache": (cli_warm.HELP, cli_warm.add_arguments, cli_warm.cmd_warm_cache),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebpf-otlp-receiver",
        description="eBPF telemetry sidecar for the OpenTelemetry Collector.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"ebpf-otlp-receiver: {e}", file=sys.stderr)
        return 2
    except ReceiverError as e:
        print(f"ebpf-otlp-receiver: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
