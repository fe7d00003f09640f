"""`make run`: a local Collector (deploy/otelcol/config.yaml) and the agent pointed at it.

Prints where the data and the self-metrics can be seen; Ctrl-C stops the agent (which flushes),
then the Collector."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "deploy/config/local.yaml"))
    ap.add_argument("--out", default=str(REPO / "out/otelcol"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("make run loads BPF programs: run it as root (sudo make run)", file=sys.stderr)
        return 1
    otelcol = os.environ.get("OTELCOL_BIN")
    if not otelcol:
        print("OTELCOL_BIN is not set (make run sets it)", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OTELCOL_OTLP_GRPC_ENDPOINT": "127.0.0.1:4317", "OTELCOL_OUTPUT_DIR": str(out)}
    col_log = open(out / "otelcol.log", "ab")
    col = subprocess.Popen([otelcol, "--config", str(REPO / "deploy/otelcol/config.yaml"),
                            "--feature-gates=service.profilesSupport"], env=env,
                           stdout=col_log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", 4317)) == 0:
                break
        if col.poll() is not None or time.monotonic() > deadline:
            print(f"the Collector did not start; see {out / 'otelcol.log'}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"""
Collector:   OTLP/gRPC on 127.0.0.1:4317, log {out / 'otelcol.log'}
Data:        {out}/logs.jsonl, traces.jsonl, metrics.jsonl, profiles.jsonl (JSON lines)
             e.g.  tail -f {out}/logs.jsonl
Self-metrics: http://127.0.0.1:9464/metrics   health: /healthz  /readyz
Ctrl-C stops the agent (it flushes) and then the Collector.
""", flush=True)
    # Own session: a terminal's Ctrl-C reaches us only, and we forward exactly one SIGINT (a
    # second one would make the agent exit without flushing).
    agent = subprocess.Popen([sys.executable, "-m", "receiver", "run", "--config", args.config],
                             cwd=REPO, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: agent.send_signal(signal.SIGTERM))
    try:
        rc = agent.wait()
    except KeyboardInterrupt:
        agent.send_signal(signal.SIGINT)
        rc = agent.wait()
    finally:
        col.send_signal(signal.SIGTERM)
        col.wait(15)
        col_log.close()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
