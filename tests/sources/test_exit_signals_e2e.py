"""Exit signals against the shell's own ``$?``: every signal whose default action ends a process.

A fatal signal with its default action that does not dump core (TERM, HUP, PIPE, ALRM, ...) is
turned into a group exit by the kernel when it is sent, so ``signal:signal_deliver`` only ever
sees SIGKILL; the source must still report the signal that was sent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ..harness import Agent, Collector, agent_config, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

FATAL = [s for s in signal.Signals if s not in (
    signal.SIGCHLD, signal.SIGCONT, signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN,
    signal.SIGTTOU, signal.SIGURG, signal.SIGWINCH) and s < 32]

# Reset every handler Python installs (INT, PIPE, XFSZ) to the default, then wait to be killed.
TARGET = ("import os, signal, sys, time\n"
          "for s in signal.Signals:\n"
          "    if s < 32 and s not in (signal.SIGKILL, signal.SIGSTOP):\n"
          "        signal.signal(s, signal.SIG_DFL)\n"
          "print(os.getpid(), flush=True)\n"
          "time.sleep(60)\n")


def test_every_fatal_signal_is_reported_as_the_shell_sees_it(bpf_ok: None, collector: Collector,
                                                             tmp_path: Path) -> None:
    agent = Agent(tmp_path, agent_config(collector, {"process": {"fork_events": False}})).start()
    shell_says: dict[int, int] = {}   # pid → $?
    sent: dict[int, signal.Signals] = {}
    try:
        for sig in FATAL:
            # No core files (the shell still says 128+N); the target runs in the foreground,
            # so the shell does not ignore INT and QUIT for it.
            sh = subprocess.Popen(
                ["bash", "-c", 'ulimit -c 0; "$0" -c "$1"; echo "status $?"', sys.executable, TARGET],
                stdout=subprocess.PIPE, text=True)
            assert sh.stdout is not None
            pid = int(sh.stdout.readline())
            os.kill(pid, sig)
            out, _ = sh.communicate(timeout=20)
            shell_says[pid] = int(out.split("status ", 1)[1])
            sent[pid] = sig
            assert shell_says[pid] == 128 + sig, (sig.name, out)
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]

    def exits() -> dict[int, dict] | None:
        found = {r["attrs"]["process.pid"]: r["attrs"] for r in collector.log_records()
                 if r.get("eventName") == "process.exit" and r["attrs"]["process.pid"] in sent}
        return found if len(found) == len(sent) else None

    found = wait_until(exits, 30, 0.2, f"{len(sent)} exit records")
    wrong = {sent[pid].name: (a.get("process.exit.code"), a.get("process.exit.signal"))
             for pid, a in found.items()
             if (a.get("process.exit.code"), a.get("process.exit.signal"))
             != (shell_says[pid], shell_says[pid] - 128)}
    assert not wrong, f"(code, signal) reported where the shell said 128+N: {wrong}"


MT_EXIT_C = r"""
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

static void *idle(void *arg) { (void)arg; for (;;) pause(); return NULL; }

int main(void) {
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, idle, NULL);
    usleep(100 * 1000);
    exit(7);   /* exit_group: the other threads are reaped with a SIGKILL nobody sent */
}
"""


def test_exit_group_of_a_threaded_process_keeps_its_code(bpf_ok: None, collector: Collector,
                                                         tmp_path: Path) -> None:
    from ..harness import compile_c

    binary = compile_c(MT_EXIT_C, tmp_path / "mt_exit", "-O1", "-pthread")
    agent = Agent(tmp_path, agent_config(collector, {"process": {"fork_events": False}})).start()
    try:
        pids = []
        for _ in range(5):
            p = subprocess.Popen([str(binary)])
            assert p.wait(10) == 7
            pids.append(p.pid)
    finally:
        agent.stop()

    def exits() -> list | None:
        recs = [r["attrs"] for r in collector.log_records() if r.get("eventName") == "process.exit"
                and r["attrs"]["process.pid"] in pids]
        return recs if len(recs) == len(pids) else None

    recs = wait_until(exits, 20, what="the exit records")
    assert [(a.get("process.exit.code"), a.get("process.exit.signal")) for a in recs] == [(7, None)] * 5
