"""Fork and OOM-kill records, end to end: real BPF program → agent → real Collector → its file
output. One agent for the module.

- ``process.fork``: one record per new process (fork, vfork), none per thread (the program skips
  clones with CLONE_THREAD), with the child as ``process.pid`` and the forking process as
  ``process.parent_pid``; the children's exit records keep that parent.
- ``process.oom_kill``: a process in a memory cgroup of 32 MiB without swap, allocating until
  the kernel's OOM killer ends it (``oom:mark_victim``), gives exactly one record naming it, and
  its exit record says SIGKILL. One victim started before the agent (its name can only come
  from the kernel's record), one after (its exec and fork were seen).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..harness import Agent, Collector, agent_config, compile_c, fail_or_skip, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

CHILDREN = 4      # fork()ed; one more comes from vfork()
THREADS = 3

FORKER_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILDREN @CHILDREN@
#define THREADS @THREADS@

static pid_t tids[THREADS];

static void *thread_main(void *arg) {
    tids[(long)arg] = (pid_t)syscall(SYS_gettid);
    return NULL;
}

int main(void) {
    pthread_t th[THREADS];
    pid_t kids[CHILDREN + 1];
    for (long i = 0; i < THREADS; i++)
        pthread_create(&th[i], NULL, thread_main, (void *)i);
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < CHILDREN; i++) {
        pid_t p = fork();
        if (p == 0)
            _exit(10 + i);
        kids[i] = p;
    }
    pid_t v = vfork();   /* clone(CLONE_VM | CLONE_VFORK): a process, not a thread */
    if (v == 0)
        _exit(10 + CHILDREN);
    kids[CHILDREN] = v;
    for (int i = 0; i <= CHILDREN; i++) {
        int st;
        if (waitpid(kids[i], &st, 0) != kids[i] || !WIFEXITED(st) || WEXITSTATUS(st) != 10 + i)
            return 1;
    }
    printf("children");
    for (int i = 0; i <= CHILDREN; i++)
        printf(" %d", kids[i]);
    printf("\nthreads");
    for (int i = 0; i < THREADS; i++)
        printf(" %d", tids[i]);
    printf("\n");
    return 0;
}
""".replace("@CHILDREN@", str(CHILDREN)).replace("@THREADS@", str(THREADS))

# Waits for a line on stdin, then allocates and touches memory until it is killed.
HOG_C = r"""
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(void) {
    char go[8];
    if (read(0, go, sizeof go) <= 0)
        return 2;
    for (;;) {
        char *p = malloc(1 << 20);
        if (!p)
            return 3;
        memset(p, 1, 1 << 20);
    }
}
"""


class MemoryCgroup:
    """A uniquely named memory cgroup of 32 MiB without swap: cgroup v2 where the memory
    controller is there (memory.max, memory.swap.max), else the cgroup v1 memory hierarchy
    (hybrid hosts)."""

    LIMIT = 32 << 20

    def __init__(self) -> None:
        name = f"ebpf-test-oom-{uuid.uuid4().hex[:12]}"
        from receiver.kernel.identity import find_cgroup2_root

        v2 = find_cgroup2_root()
        v1 = "/sys/fs/cgroup/memory"
        if v2 and "memory" in Path(v2, "cgroup.controllers").read_text().split():
            root = Path(v2)
            if "memory" not in (root / "cgroup.subtree_control").read_text().split():
                (root / "cgroup.subtree_control").write_text("+memory")
            self.path, self.v2 = root / name, True
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(self.LIMIT))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        elif Path(v1, "memory.limit_in_bytes").exists():
            self.path, self.v2 = Path(v1) / name, False
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(self.LIMIT))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(self.LIMIT))
        else:
            fail_or_skip("no memory cgroup controller (cgroup v2 memory or a v1 memory hierarchy)")

    def oom_kills(self) -> int:
        """The kernel's own count of OOM kills in this cgroup."""
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        return int(dict(line.split() for line in text.splitlines())["oom_kill"])

    def spawn(self, binary: Path) -> subprocess.Popen[bytes]:
        """``binary`` run inside the cgroup: a shell moves itself in, then execs it."""
        p = subprocess.Popen(["/bin/sh", "-c", 'echo $$ > "$1/cgroup.procs" && exec "$2"', "sh",
                              str(self.path), str(binary)], stdin=subprocess.PIPE)
        wait_until(lambda: _exe(p.pid) == str(binary) or p.poll() is not None, 10,
                   what=f"{binary.name} to start")
        assert p.poll() is None, f"{binary.name} exited {p.returncode}"
        assert str(p.pid) in (self.path / "cgroup.procs").read_text().split()
        return p

    def remove(self) -> None:
        def gone() -> bool:
            try:
                self.path.rmdir()
            except FileNotFoundError:
                return True
            except OSError:
                return False
            return True

        wait_until(gone, 10, 0.2, f"{self.path} to be removed")


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _run_until_killed(p: subprocess.Popen[bytes]) -> int:
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.close()
    try:
        return p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@dataclass
class Lifecycle:
    tmp: Path
    collector: Collector
    agent: Agent
    memcg: MemoryCgroup
    early: subprocess.Popen[bytes]    # the OOM victim started before the agent
    hog: Path                         # the same program as the late victim's executable


@pytest.fixture(scope="module")
def lifecycle(bpf_ok: None, otelcol_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lifecycle]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    hog = compile_c(HOG_C, tmp / "oom_early", "-O1")
    late = tmp / "oom_late"
    shutil.copy(hog, late)
    memcg = MemoryCgroup()
    early = collector = agent = None
    try:
        early = memcg.spawn(hog)
        collector = Collector(otelcol_bin, tmp).start()
        agent = Agent(tmp, agent_config(collector, {"process": {}})).start()
        yield Lifecycle(tmp, collector, agent, memcg, early, late)
    finally:
        if agent is not None:
            agent.stop()
        if collector is not None:
            collector.stop()
        if early is not None and early.poll() is None:
            early.kill()
            early.wait()
        memcg.remove()


def _records(collector: Collector, event: str) -> list[dict]:
    return [r for r in collector.log_records() if r.get("eventName") == event]


def test_fork_records_name_each_child_and_its_parent_and_no_thread(lifecycle: Lifecycle) -> None:
    forker = compile_c(FORKER_C, lifecycle.tmp / "forker", "-O1", "-pthread")
    p = subprocess.run([str(forker)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    kids = [int(x) for x in lines["children"].split()]
    tids = [int(x) for x in lines["threads"].split()]
    assert len(kids) == CHILDREN + 1 and len(tids) == THREADS

    collector = lifecycle.collector

    def forker_pid() -> int | None:
        execs = [r for r in _records(collector, "process.exec")
                 if r["attrs"].get("process.executable.path") == str(forker)]
        return execs[0]["attrs"]["process.pid"] if execs else None

    pid = wait_until(forker_pid, 30, 0.3, "the forker's exec record")
    everyone = {pid, *kids, *tids}

    def settled() -> tuple[list, list] | None:
        forks = [r for r in _records(collector, "process.fork")
                 if r["attrs"]["process.pid"] in everyone or r["attrs"].get("process.parent_pid") == pid]
        exits = [r for r in _records(collector, "process.exit") if r["attrs"]["process.pid"] in everyone]
        done = {r["attrs"]["process.pid"] for r in exits} >= {pid, *kids}
        return (forks, exits) if done else None

    forks, exits = wait_until(settled, 30, 0.3, "the exit records of the forker and its children")

    # The forker itself: forked by this test process.
    own = [r for r in forks if r["attrs"]["process.pid"] == pid]
    assert len(own) == 1, own
    assert own[0]["attrs"].get("process.parent_pid") == os.getpid()

    # Its children: exactly one record each, none for its threads.
    assert not [r["attrs"] for r in forks if r["attrs"]["process.pid"] in tids]
    children = [r for r in forks if r["attrs"].get("process.parent_pid") == pid]
    assert sorted(r["attrs"]["process.pid"] for r in children) == sorted(kids)
    for rec in children:
        kid = rec["attrs"]["process.pid"]
        assert rec["attrs"] == {"process.pid": kid, "process.parent_pid": pid,
                                "process.executable.name": "forker"}
        assert rec["body"]["stringValue"] == f"fork forker (pid {pid}) -> pid {kid}"
        assert rec["severityText"] == "INFO"
        assert rec["resource"]["process.pid"] == kid
        assert rec["resource"]["process.parent_pid"] == pid

    # Exit records: one per process, none per thread; each child's with its own code and the
    # parent its fork record named (the child was gone before /proc could tell).
    by_pid = {}
    for r in exits:
        assert r["attrs"]["process.pid"] not in by_pid, r
        by_pid[r["attrs"]["process.pid"]] = r["attrs"]
    assert set(by_pid) == {pid, *kids}
    assert by_pid[pid]["process.exit.code"] == 0
    for i, kid in enumerate(kids):
        assert by_pid[kid]["process.exit.code"] == 10 + i
        assert by_pid[kid].get("process.parent_pid") == pid


def test_oom_kill_records_the_victim_and_its_sigkill(lifecycle: Lifecycle) -> None:
    memcg, collector = lifecycle.memcg, lifecycle.collector
    early = lifecycle.early
    assert _run_until_killed(early) == -signal.SIGKILL
    late = memcg.spawn(lifecycle.hog)
    assert _run_until_killed(late) == -signal.SIGKILL
    assert memcg.oom_kills() == 2   # the kernel's OOM killer, nothing else, ended both

    victims = {early.pid: "oom_early", late.pid: "oom_late"}

    def settled() -> tuple[list, list] | None:
        ooms = [r for r in _records(collector, "process.oom_kill") if r["attrs"]["process.pid"] in victims]
        exits = [r for r in _records(collector, "process.exit") if r["attrs"]["process.pid"] in victims]
        seen = {r["attrs"]["process.pid"] for r in ooms} | {r["attrs"]["process.pid"] for r in exits}
        return (ooms, exits) if len(ooms) >= 2 and len(exits) >= 2 and seen == set(victims) else None

    ooms, exits = wait_until(settled, 30, 0.3, "the OOM-kill and exit records of both victims")
    assert sorted(r["attrs"]["process.pid"] for r in ooms) == sorted(victims)
    for r in ooms:
        pid = r["attrs"]["process.pid"]
        assert r["attrs"]["process.executable.name"] == victims[pid], r["attrs"]
        assert r["body"]["stringValue"] == f"oom kill {victims[pid]} (pid {pid})"
        assert r["severityText"] == "WARN"
        assert r["resource"]["process.pid"] == pid
    # The late victim's parent is known from its fork (this test process forked its shell).
    late_oom = next(r for r in ooms if r["attrs"]["process.pid"] == late.pid)
    assert late_oom["attrs"].get("process.parent_pid") == os.getpid()

    assert sorted(r["attrs"]["process.pid"] for r in exits) == sorted(victims)
    for r in exits:
        assert r["attrs"].get("process.exit.signal") == signal.SIGKILL, r["attrs"]
        assert r["attrs"]["process.exit.code"] == 128 + signal.SIGKILL
