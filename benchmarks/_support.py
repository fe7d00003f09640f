"""What the benchmarks share: the real Collector (its binary, built once by
deploy/scripts/build-otelcol.sh, and a config whose debug exporter drops what it receives, so only
the receiving side costs) and building their C load generators."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["otelcol_bin", "discarding_collector_yaml", "compile_c"]


def compile_c(source: str, out: Path, *flags: str) -> Path:
    """Builds a load generator with gcc (``make bench`` installs it)."""
    src = out.with_name(out.name + ".c")
    src.write_text(source)
    subprocess.run(["gcc", *flags, "-o", str(out), str(src)], check=True)
    return out


def otelcol_bin() -> str:
    b = os.environ.get("OTELCOL_BIN")
    if b:
        return b
    script = Path(__file__).resolve().parents[1] / "deploy" / "scripts" / "build-otelcol.sh"
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout.strip()


def discarding_collector_yaml(signals: tuple[str, ...] = ("traces",), metrics_port_env: str | None = None) -> str:
    """OTLP/gRPC and OTLP/HTTP in, a sampled debug exporter out, for ``signals``. With ``metrics_port_env``,
    the Collector's own metrics (e.g. ``otelcol_receiver_accepted_spans``) are served on
    127.0.0.1 at the port that environment variable names."""
    if metrics_port_env:
        telemetry_metrics = f"""\
    metrics:
      level: basic
      readers:
        - pull:
            exporter:
              prometheus:
                host: 127.0.0.1
                port: ${{env:{metrics_port_env}}}
"""
    else:
        telemetry_metrics = """\
    metrics:
      level: none
"""
    pipelines = "".join(f"""\
    {s}:
      receivers: [otlp]
      exporters: [debug]
""" for s in signals)
    return f"""\
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: ${{env:OTELCOL_OTLP_GRPC_ENDPOINT}}
        max_recv_msg_size_mib: 64
      http:
        endpoint: ${{env:OTELCOL_OTLP_HTTP_ENDPOINT}}
exporters:
  debug:
    verbosity: basic
    sampling_initial: 1
    sampling_thereafter: 1000000
service:
  telemetry:
    logs:
      level: warn
{telemetry_metrics}  pipelines:
{pipelines}"""
