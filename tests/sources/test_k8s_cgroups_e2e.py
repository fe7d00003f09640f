"""Containers in Kubernetes pods, by their cgroups, end to end: real cgroup v2 directories shaped
as the kubelet makes them, a workload moved into each, and the resource of its exec and exit
records as the real Collector received it: ``container.id`` and ``k8s.pod.uid``.

- systemd cgroup driver: ``kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid, "-" as "_">.slice/cri-containerd-<id>.scope``;
- cgroupfs driver: ``kubepods/besteffort/pod<uid>/<id>``.

A process still running when its record is read is placed by /proc/PID/cgroup; one already gone
by the kernel's cgroup id of its record (the agent is stopped while it runs and ends).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..harness import Agent, Collector, agent_config, fail_or_skip, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]


@dataclass
class Pod:
    uid: str
    container_id: str
    cgroup: Path       # the container's cgroup directory


@dataclass
class Node:
    collector: Collector
    agent: Agent
    systemd: Pod
    cgroupfs: Pod


def _make_pods(root: Path, made: list[Path]) -> tuple[Pod, Pod]:
    def mkdirs(path: Path) -> None:
        d = root
        for part in path.relative_to(root).parts:
            d = d / part
            if not d.exists():
                d.mkdir()
                made.append(d)

    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    systemd = Pod(uid, cid, root / "kubepods.slice" / "kubepods-burstable.slice"
                  / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice" / f"cri-containerd-{cid}.scope")
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    cgroupfs = Pod(uid, cid, root / "kubepods" / "besteffort" / f"pod{uid}" / cid)
    for pod in (systemd, cgroupfs):
        mkdirs(pod.cgroup)
    return systemd, cgroupfs


@pytest.fixture(scope="module")
def node(bpf_ok: None, otelcol_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    from receiver.kernel.identity import find_cgroup2_root

    root = find_cgroup2_root()
    if root is None:
        fail_or_skip("no cgroup v2 hierarchy mounted")
    tmp = tmp_path_factory.mktemp("k8s")
    made: list[Path] = []      # directories this module created, parents first
    collector = agent = None
    try:
        systemd, cgroupfs = _make_pods(Path(root), made)
        collector = Collector(otelcol_bin, tmp).start()
        agent = Agent(tmp, agent_config(collector, {"process": {}})).start()
        yield Node(collector, agent, systemd, cgroupfs)
    finally:
        if agent is not None:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGCONT)
            agent.stop()
        if collector is not None:
            collector.stop()
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass   # kubepods.slice may hold another run's pods


def _in_cgroup(cgroup: Path, *argv: str, stdin: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """``argv`` run inside ``cgroup``: a shell moves itself in, then execs it."""
    return subprocess.Popen(["/bin/sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "sh",
                             str(cgroup), *argv], stdin=stdin, stdout=subprocess.DEVNULL)


def _records(collector: Collector, pid: int, exe: str, *events: str) -> dict[str, list[dict]] | None:
    """``pid``'s records of ``events``, from its exec of ``exe`` on (it ran the shell before)."""
    recs = sorted((r for r in collector.log_records() if r["attrs"]["process.pid"] == pid),
                  key=lambda r: int(r["timeUnixNano"]))
    start = next((i for i, r in enumerate(recs) if r.get("eventName") == "process.exec"
                  and r["attrs"].get("process.executable.path") == exe), None)
    if start is None:
        return None
    found = {e: [r for r in recs[start:] if r.get("eventName") == e] for e in events}
    return found if all(found.values()) else None


def _pod_attributes(resource: dict) -> dict:
    return {k: resource.get(k) for k in ("container.id", "k8s.pod.uid")}


@pytest.mark.parametrize("driver", ["systemd", "cgroupfs"])
def test_running_container_process_carries_container_id_and_pod_uid(node: Node, driver: str) -> None:
    pod: Pod = getattr(node, driver)
    p = _in_cgroup(pod.cgroup, "/bin/cat", stdin=subprocess.PIPE)
    try:
        # The exec record is read while cat still runs: /proc/PID/cgroup places it.
        execs = wait_until(lambda: _records(node.collector, p.pid, "/bin/cat", "process.exec"), 30, 0.3,
                           "the exec record of cat")["process.exec"]
        assert str(p.pid) in (pod.cgroup / "cgroup.procs").read_text().split()
    finally:
        assert p.stdin is not None
        p.stdin.close()
        assert p.wait(30) == 0
    recs = wait_until(lambda: _records(node.collector, p.pid, "/bin/cat", "process.exec", "process.exit"), 30, 0.3,
                      "the exit record of cat")
    assert len(execs) == 1 and len(recs["process.exit"]) == 1
    for rec in (recs["process.exec"][0], recs["process.exit"][0]):
        assert _pod_attributes(rec["resource"]) == {"container.id": pod.container_id, "k8s.pod.uid": pod.uid}
        assert rec["resource"]["process.pid"] == p.pid
        assert rec["resource"]["process.executable.path"] == "/bin/cat"
    assert recs["process.exit"][0]["attrs"]["process.exit.code"] == 0

    # This test's own process is in no pod: a process it runs carries neither id.
    subprocess.run(["/bin/sh", "-c", "exit 4"])

    def own() -> list[dict]:
        return [r for r in node.collector.log_records() if r.get("eventName") == "process.exit"
                and r["attrs"].get("process.parent_pid") == os.getpid()
                and r["attrs"].get("process.exit.code") == 4]

    outside = wait_until(own, 30, 0.3, "the exit record of a process outside the pods")
    ids = {node.systemd.container_id, node.cgroupfs.container_id, node.systemd.uid, node.cgroupfs.uid}
    assert not ids & set(_pod_attributes(outside[-1]["resource"]).values())


def test_process_gone_before_its_record_is_read_is_placed_by_cgroup_id(node: Node) -> None:
    """/proc cannot tell: the kernel's cgroup id in the record, matched to the cgroup v2 tree."""
    assert node.agent.proc is not None
    results = {}
    node.agent.proc.send_signal(signal.SIGSTOP)   # reads nothing until every workload is reaped
    try:
        for driver in ("systemd", "cgroupfs"):
            pod: Pod = getattr(node, driver)
            p = _in_cgroup(pod.cgroup, "/bin/false")
            assert p.wait(30) == 1
            results[p.pid] = pod
            assert not Path(f"/proc/{p.pid}").exists()
    finally:
        node.agent.proc.send_signal(signal.SIGCONT)
    for pid, pod in results.items():
        recs = wait_until(lambda pid=pid: _records(node.collector, pid, "/bin/false", "process.exec",
                                                   "process.exit"), 30, 0.3, f"the records of {pid}")
        assert len(recs["process.exec"]) == 1 and len(recs["process.exit"]) == 1
        assert recs["process.exit"][0]["attrs"]["process.exit.code"] == 1
        for rec in (recs["process.exec"][0], recs["process.exit"][0]):
            assert _pod_attributes(rec["resource"]) == {"container.id": pod.container_id,
                                                         "k8s.pod.uid": pod.uid}, rec["resource"]
