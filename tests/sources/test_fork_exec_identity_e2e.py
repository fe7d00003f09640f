"""The pid → resource cache across fork then exec: an entry made while the child still ran its
parent's program must not be used once it runs the new one.

Reproduced deliberately, in the worst order: only the network source runs, so no exec record
ever reaches the agent to say the pid changed program (with the process source on, that is
the order whenever the network ring buffer is read before the process one)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ..harness import Agent, Collector, agent_config, free_port, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

# The forked child (python) connects, waits to be told its connection was seen, then execs
# bash, which connects again through /dev/tcp.
CHILD = ("import os, socket, sys\n"
         "port = int(sys.argv[1])\n"
         "s = socket.create_connection(('127.0.0.1', port)); s.sendall(b'x'); s.close()\n"
         "sys.stdin.readline()\n"
         "os.execv('/bin/bash', ['bash', '-c', 'exec 3<>/dev/tcp/127.0.0.1/' + str(port) + "
         "'; echo y >&3; exec 3>&-'])\n")


def test_connection_after_exec_carries_the_new_executable(bpf_ok: None, collector: Collector,
                                                          tmp_path: Path) -> None:
    port = free_port()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(16)

    threading.Thread(target=serve, daemon=True).start()
    cfg = agent_config(collector, {"network": {"ports": [port], "metrics": False,
                                               "report_interval": "1s"}})
    agent = Agent(tmp_path, cfg).start()
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(port)], stdin=subprocess.PIPE)

        def client_spans() -> list:
            return [s for s in collector.spans() if s.get("kind") in (3, "SPAN_KIND_CLIENT")
                    and s["resource"].get("process.pid") == child.pid]

        wait_until(client_spans, 30, 0.2, "the span of the connection made before exec")
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        child.stdin.close()
        assert child.wait(10) == 0
        spans = wait_until(lambda: len(client_spans()) >= 2 and client_spans(), 30, 0.2,
                           "the span of the connection made after exec")
    finally:
        agent.stop()
        srv.close()
    spans.sort(key=lambda s: int(s["startTimeUnixNano"]))
    names = [s["resource"].get("process.executable.name") for s in spans]
    assert names[0].startswith("python"), names
    assert names[1] == "bash", names
