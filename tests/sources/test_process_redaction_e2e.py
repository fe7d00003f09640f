"""Secrets in argv, end to end: real processes exec'd with secret-bearing arguments → the real
BPF program → agent → real Collector. What the Collector wrote (its whole logs output, not only
the attributes looked at) holds no part of any secret, in ``process.command_line`` or
``process.command_args``; with ``command_line: off`` it holds nothing of argv at all."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from receiver.convert.logs import ARG_CAPTURE_BYTES
from receiver.sources.process import PROC_MAX_ARGS

from ..harness import Agent, Collector, agent_config, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

TRUE = "/bin/true"
_LONG = "--long-option="
# The case: cut by the kernel inside the password, before the '@' it would have been
# masked by. 'Kc9' is what the kernel keeps of the password.
_CUT_PAD = "x" * (ARG_CAPTURE_BYTES - len(_LONG) - len("https://user:") - 3)
_CUT = f"{_LONG}{_CUT_PAD}https://user:Kc9Kc9Kc9Kc9@host/r"
_MANY = [f"a{i}" for i in range(1, PROC_MAX_ARGS - 2)]   # argv[1..17]

# argv → the command_args the Collector must get; SECRETS: no part of any may reach it.
CASES: list[tuple[list[str], list[str]]] = [
    ([TRUE, "--password=Qz1Qz1", "--token", "-Tb2Tb2", "plain"],
     [TRUE, "--password=REDACTED", "--token", "REDACTED", "plain"]),
    ([TRUE, "clone", "https://bob:pa/ssCc3Cc3@h/r"], [TRUE, "clone", "https://REDACTED@h/r"]),
    ([TRUE, "clone", "https://bob:p@ssDd4Dd4@h/r"], [TRUE, "clone", "https://REDACTED@h/r"]),
    ([TRUE, "clone", "https://Tk7Tk7Tk7@github.com/o/r"], [TRUE, "clone", "https://REDACTED@github.com/o/r"]),
    ([TRUE, _CUT], [TRUE, f"{_LONG}{_CUT_PAD}https://REDACTED"]),
    ([TRUE, "-H", "Authorization: Bearer Hv4Hv4", "-u", "alice:Ux2Ux2", "-o", "user=u,password=Mo6Mo6"],
     [TRUE, "-H", "Authorization: REDACTED", "-u", "alice:REDACTED", "-o", "user=u,password=REDACTED"]),
    # more than the kernel captures: the secret option is the last kept, its value is never read
    ([TRUE, *_MANY, "--token", "Mx5Mx5", "after1", "after2", "after3"],
     [TRUE, *_MANY, "--token", "REDACTED"]),
]
SECRETS = ["Qz1", "Tb2", "Cc3", "Dd4", "Tk7", "Kc9", "Hv4", "Ux2", "Mo6", "Mx5"]


def _run(cases: list[list[str]]) -> list[int]:
    pids = []
    for argv in cases:
        p = subprocess.Popen(argv, executable=TRUE)
        assert p.wait() == 0
        pids.append(p.pid)
    return pids


def _execs(collector: Collector, pids: list[int]) -> dict[int, dict] | None:
    recs = {r["attrs"]["process.pid"]: r for r in collector.log_records()
            if r.get("eventName") == "process.exec" and r["attrs"].get("process.executable.path") == TRUE
            and r["attrs"]["process.pid"] in pids}
    return recs if len(recs) == len(pids) else None


def test_secrets_in_argv_never_reach_the_collector(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    assert len(CASES[-1][0]) > PROC_MAX_ARGS and len(CASES[-1][1]) == PROC_MAX_ARGS
    assert len(_CUT.encode()) > ARG_CAPTURE_BYTES
    agent = Agent(tmp_path, agent_config(collector, {"process": {}})).start()
    try:
        pids = _run([argv for argv, _ in CASES])
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
    execs = wait_until(lambda: _execs(collector, pids), 20, 0.2, "the exec records")
    for pid, (argv, expected) in zip(pids, CASES):
        attrs = execs[pid]["attrs"]
        assert attrs["process.command_args"] == expected, argv
        cut = " …" if len(argv) > PROC_MAX_ARGS else ""
        assert attrs["process.command_line"] == " ".join(expected) + cut
    written = (collector.outdir / "logs.jsonl").read_text()
    leaked = [s for s in SECRETS if s in written]
    assert not leaked, f"secrets in what the Collector wrote: {leaked}"


def test_command_line_off_exports_nothing_of_argv(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    agent = Agent(tmp_path, agent_config(collector, {"process": {"command_line": "off"}})).start()
    try:
        pids = _run([[TRUE, "--password=Of1Of1", "plain-Zr8Zr8", "https://bob:Of2Of2@h/r"]])
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
    (rec,) = wait_until(lambda: _execs(collector, pids), 20, 0.2, "the exec record").values()
    assert "process.command_args" not in rec["attrs"] and "process.command_line" not in rec["attrs"]
    written = (collector.outdir / "logs.jsonl").read_text()
    for part in ("Zr8Zr8", "Of1Of1", "Of2Of2", "--password", "bob:"):
        assert part not in written, part
