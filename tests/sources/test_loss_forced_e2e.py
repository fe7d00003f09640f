"""Every kernel-side loss reason, forced once and counted exactly, end to end: real BPF programs,
the real agent (``tests/harness.py``'s ``Agent``) and, where a received count is needed, the real
Collector.

The other end-to-end tests assert ``lost == 0``, which a loss counter that never moves would pass
too. Here each ``<PREFIX>_LOST_<NAME>`` slot of ``bpf/<source>.h`` is driven past its bound by a
workload the test controls, and the self-metric
``ebpf_receiver_source_events_lost_total{source, reason}`` must equal what was lost: either the
known overflow (N distinct keys into a map of M entries: N - M) or, for ring buffers, what the
workload generated minus what arrived at the Collector. A ring buffer is overrun by stopping the
agent (SIGSTOP: its reader stops, the kernel side keeps writing), generating more records than
the ring holds, and letting it go on (SIGCONT).

Each test isolates its workload with the source's own filters (server port, process name), so
other processes on a shared machine cannot add to or take from the counts. What could not be
forced, and why, is said where that reason's test would be.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..harness import Agent, Collector, agent_config, free_port, wait_until

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

LOST = "ebpf_receiver_source_events_lost_total"
RECEIVED = "ebpf_receiver_source_events_received_total"


def lost(agent: Agent, source: str, reason: str) -> int:
    return int(agent.metric_value(LOST, source=source, reason=reason))


def settle_exact(agent: Agent, source: str, expected: dict[str, int], interval: float,
                 timeout: float = 60) -> None:
    """Waits until every reason's lost count of ``source`` has reached ``expected``, lets two more
    collections pass (``interval`` is the source's report interval), then asserts every reason
    of the source, the others included, is exactly as expected (0 where not named)."""
    wait_until(lambda: all(lost(agent, source, r) >= n for r, n in expected.items()), timeout, 0.3,
               f"{source} losses to reach {expected}")
    # Two more reads of the kernel's counters: a count past the expected one would show now.
    threading.Event().wait(2 * interval + 0.5)
    got = {r: lost(agent, source, r) for r in reasons_of(agent, source)}
    want = {r: expected.get(r, 0) for r in got}
    assert got == want, f"{source}: lost {got}, expected {want}"


def reasons_of(agent: Agent, source: str) -> list[str]:
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for fam in text_string_to_metric_families(agent.scrape()):
        for s in fam.samples:
            if s.name == LOST and s.labels.get("source") == source:
                out.append(s.labels["reason"])
    return sorted(set(out))


class Paused:
    """SIGSTOP the agent (its ring-buffer reader stops; the kernel side does not), SIGCONT on exit."""

    def __init__(self, agent: Agent):
        assert agent.proc is not None
        self.pid = agent.proc.pid

    def __enter__(self) -> "Paused":
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: Any) -> None:
        os.kill(self.pid, signal.SIGCONT)


def stopped_agent(agent: Agent, fn: Callable[[], Any]) -> Any:
    with Paused(agent):
        return fn()


# ------------------------------------------------------------------------------------ network


def _tcp_spans(collector: Collector, port: int) -> list[dict[str, Any]]:
    return [s for s in collector.spans()
            if s["attrs"].get("network.transport") == "tcp" and s["attrs"].get("server.port") == port]


def _connect_and_close(server: socket.socket, port: int) -> None:
    """One whole connection: both sockets close cleanly (client first), so the kernel side
    finishes both entries at CLOSE."""
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    client.close()
    assert conn.recv(1) == b""
    conn.close()


def test_network_connection_map_full_and_ringbuf_full(bpf_ok: None, collector: Collector,
                                                     tmp_path: Path) -> None:
    """connection_map_full: 20 connections held open at once on a port the filter selects are
    40 sockets (client and server side) for a conns map of max_connections = 16 entries: 24 are
    refused, and exactly the 16 tracked ones give spans when they close.

    ringbuf_full: with ring_buffer_pages = 1 (4 KiB) and the agent stopped, 40 connections make
    80 records of 128 bytes; the ring takes what fits, the rest are lost: the spans that arrive
    after SIGCONT plus the lost count must be 80."""
    port = free_port()
    cfg = {"report_interval": "1s", "ports": [port], "max_connections": 16, "ring_buffer_pages": 1,
           "metrics": False}
    agent = Agent(tmp_path, agent_config(collector, {"network": cfg})).start()
    server = socket.create_server(("127.0.0.1", port), backlog=128)
    try:
        # ---- connection_map_full: 2 x 20 sockets tracked at once into 16 entries.
        n_open = 20
        held = []
        for _ in range(n_open):
            client = socket.create_connection(("127.0.0.1", port))
            conn, _ = server.accept()
            held.append((client, conn))
        for client, conn in held:
            client.close()
            assert conn.recv(1) == b""
            conn.close()
        wait_until(lambda: len(_tcp_spans(collector, port)) >= 16, 30, 0.2, "the 16 tracked connections' spans")
        settle_exact(agent, "network", {"connection_map_full": 2 * n_open - 16}, 1.0)
        assert len(_tcp_spans(collector, port)) == 16

        # ---- ringbuf_full: the reader stopped, 80 records into a 4 KiB ring.
        n_seq = 40
        stopped_agent(agent, lambda: [_connect_and_close(server, port) for _ in range(n_seq)])

        def accounted() -> bool:
            arrived = len(_tcp_spans(collector, port)) - 16
            return arrived + lost(agent, "network", "ringbuf_full") >= 2 * n_seq

        wait_until(accounted, 60, 0.3, "the stopped window's records to arrive or be counted lost")
        arrived = len(_tcp_spans(collector, port)) - 16
        # A 4096-byte ring holds at most 4095 bytes of 128-byte records (the producer may not
        # run a whole ring ahead of the consumer): 31 records.
        assert arrived == (4096 - 1) // 128, arrived
        settle_exact(agent, "network", {"connection_map_full": 2 * n_open - 16,
                                        "ringbuf_full": 2 * n_seq - arrived}, 1.0)
        assert len(_tcp_spans(collector, port)) - 16 == arrived
    finally:
        server.close()
        assert agent.stop() == 0, agent.log()[-3000:]


# ------------------------------------------------------------------------------------ syscalls

# Forks N children, one at a time. Each renames itself to "lossseries" (the agent's process
# filter selects that name from its next call on), makes 32 distinct system calls that cannot
# fail, once each, then renames itself to "lossdone" (that prctl is the 33rd call, counted: the
# filter decided at its entry) and waits, unselected, until the parent kills it. So every child
# is 33 per-process series of exactly one call each, none with an error, and the children stay
# alive (the agent frees a process's series once it is gone). The parent prints the children's
# pids, then waits for its stdin to close.
SERIES_C = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static long scratch[1024];

static void pure_calls(void) {
    long *b = scratch, *c = scratch + 256, *d = scratch + 512;
    syscall(SYS_getpid); syscall(SYS_getppid); syscall(SYS_getuid); syscall(SYS_geteuid);
    syscall(SYS_getgid); syscall(SYS_getegid); syscall(SYS_gettid); syscall(SYS_getpgrp);
    syscall(SYS_getpgid, 0); syscall(SYS_getsid, 0); syscall(SYS_sched_yield);
    syscall(SYS_getcpu, NULL, NULL, NULL); syscall(SYS_time, NULL); syscall(SYS_uname, b);
    syscall(SYS_times, b); syscall(SYS_getrusage, 0, b); syscall(SYS_sysinfo, b);
    syscall(SYS_getcwd, b, 1024); syscall(SYS_sched_getscheduler, 0); syscall(SYS_sched_getparam, 0, b);
    syscall(SYS_sched_get_priority_max, 0); syscall(SYS_sched_get_priority_min, 0);
    syscall(SYS_getitimer, 0, b); syscall(SYS_alarm, 0); syscall(SYS_getgroups, 0, NULL);
    syscall(SYS_getresuid, b, c, d); syscall(SYS_getresgid, b, c, d); syscall(SYS_gettimeofday, b, NULL);
    syscall(SYS_clock_gettime, 1, b); syscall(SYS_clock_getres, 1, b); syscall(SYS_getrlimit, 7, b);
    syscall(SYS_getpriority, 0, 0);
}

int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    pid_t kids[256];
    for (int i = 0; i < n; i++) {
        int p[2];
        char ch;
        if (pipe(p)) return 1;
        pid_t pid = fork();
        if (pid == 0) {
            close(p[0]);
            prctl(PR_SET_NAME, "lossseries");
            pure_calls();
            prctl(PR_SET_NAME, "lossdone");
            if (write(p[1], "x", 1) != 1) _exit(1);
            for (;;) pause();
        }
        close(p[1]);
        if (read(p[0], &ch, 1) != 1) return 1;
        close(p[0]);
        kids[i] = pid;
        printf("%d\n", pid);
    }
    fflush(stdout);
    char ch;
    while (read(0, &ch, 1) > 0) {}
    for (int i = 0; i < n; i++) kill(kids[i], SIGKILL);
    while (wait(NULL) > 0) {}
    return 0;
}
"""
SERIES_PER_CHILD = 33
UNUSED_NR = 400   # no x86-64 system call has this number (the table skips 336..423)


def _syscall_spans(collector: Collector, nr: int, pid: int) -> int:
    return sum(1 for s in collector.spans()
               if s["attrs"].get("syscall.nr") == nr and s["resource"].get("process.pid") == pid)


def _host_error_series(collector: Collector) -> int:
    """Distinct host-wide (syscall, errno) error series the agent exported: they share the errors
    map with the per-process ones."""
    seen = set()
    for m in collector.metrics():
        if m.get("name") != "syscall.errors" or "process.pid" in m["resource"]:
            continue
        for dp in m.get("sum", {}).get("dataPoints", []):
            a = {kv["key"]: kv["value"].get("stringValue") for kv in dp.get("attributes", [])}
            seen.add((a.get("syscall.name"), a.get("error.type")))
    return len(seen)


def test_syscalls_series_map_full_and_ringbuf_full(bpf_ok: None, collector: Collector,
                                                  tmp_path: Path) -> None:
    """series_map_full: max_series = 64 makes the per-process calls map 8 x 64 = 512 entries;
    17 selected children make 17 x 33 = 561 series of one call each, so exactly 49 calls find
    no room, and exactly 512 series (each with its one call) reach the Collector.

    ringbuf_full: slow_threshold 1ns with every named system call in slow_exclude leaves one
    kind of slow-call record on the host: calls of an unused number. With the agent stopped,
    this test makes 6000 of them into a 256 KiB ring of 64-byte records; the spans that arrive
    after SIGCONT plus the lost count must be 6000."""
    import ctypes
    import subprocess

    from receiver.kernel.syscall_table import syscall_names

    from ..harness import compile_c

    max_series, children = 64, 17
    cfg = {"report_interval": "1s", "slow_threshold": "1ns",
           "slow_exclude": sorted(set(syscall_names().values())),
           "filter": {"process_names": ["lossseries"]}, "max_series": max_series}
    agent = Agent(tmp_path, agent_config(collector, {"syscalls": cfg})).start()
    exe = compile_c(SERIES_C, tmp_path / "lossparent", "-O1")
    parent = subprocess.Popen([str(exe), str(children)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None and parent.stdin is not None
        pids = [int(parent.stdout.readline()) for _ in range(children)]
        capacity = 8 * max_series
        generated = children * SERIES_PER_CHILD

        def counted() -> list[int]:
            return [int(p["asInt"]) for pid in pids for p in _latest_points(collector, "syscall.calls", pid)]

        wait_until(lambda: len(counted()) >= capacity, 60, 0.5, f"{capacity} per-process series in the metrics")
        settle_exact(agent, "syscalls", {"series_map_full": generated - capacity}, 1.0)
        calls = counted()
        assert len(calls) == capacity and set(calls) == {1}, (len(calls), sorted(set(calls)))
        # The errors map (8 x max_series) is shared with host-wide error series: while those stay
        # below its size, no other process's error can have been refused (and counted) above.
        assert _host_error_series(collector) < capacity

        # ---- ringbuf_full
        n = 6000
        libc = ctypes.CDLL(None, use_errno=True)
        me = os.getpid()
        stopped_agent(agent, lambda: [libc.syscall(UNUSED_NR) for _ in range(n)])

        def accounted() -> bool:
            return _syscall_spans(collector, UNUSED_NR, me) + lost(agent, "syscalls", "ringbuf_full") >= n

        wait_until(accounted, 60, 0.5, "the stopped window's slow calls to arrive or be counted lost")
        arrived = _syscall_spans(collector, UNUSED_NR, me)
        assert arrived == (64 * 4096 - 1) // 64, arrived   # what a 64-page ring holds of 64-byte records
        settle_exact(agent, "syscalls", {"series_map_full": generated - capacity, "ringbuf_full": n - arrived}, 1.0)
        assert _syscall_spans(collector, UNUSED_NR, me) == arrived
    finally:
        for pipe in (parent.stdin, parent.stdout):
            if pipe:
                pipe.close()
        parent.wait(30)
        assert agent.stop() == 0, agent.log()[-3000:]


def _latest_points(collector: Collector, name: str, pid: int) -> list[dict[str, Any]]:
    """The newest export's data points of ``name`` for ``pid``."""
    pts = collector.metric_points(name, pid)
    if not pts:
        return []
    newest = max(int(p["timeUnixNano"]) for p in pts)
    return [p for p in pts if int(p["timeUnixNano"]) == newest]


# ------------------------------------------------------------------------------------ profiler

# Threads that spin at a chosen address with rbp = 0: the kernel's frame-pointer walk of each
# gives the one-frame user stack [that address], the same at every sample (a thread interrupted
# in the kernel has the same user registers saved). "spin N SLOT0 STEP" starts N threads at
# slots SLOT0, SLOT0 + STEP, ...: STEP 0 gives N threads with one stack, STEP 1 N distinct
# stacks. "uring MS", once a line arrives on stdin, makes an io_uring with a submission-polling
# kernel thread (iou-sqp) that polls for MS milliseconds, and waits meanwhile. Both wait for stdin to close, then exit.
PROF_C = r"""
#define _GNU_SOURCE
#include <linux/io_uring.h>
#include <pthread.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SLOTS 1024
#define SLOT_BYTES 5   /* xor %rbp,%rbp (3 bytes); jmp . (2 bytes) */
extern char spin_base[];
__asm__(".text\n.globl spin_base\nspin_base:\n.rept 1024\nxor %rbp,%rbp\n1: jmp 1b\n.endr\n");

static pthread_t threads[SLOTS];
static int renamed;

static void *spin(void *slot) {
    void (*fn)(void) = (void (*)(void))(spin_base + SLOT_BYTES * (long)slot);
    fn();
    return NULL;
}

/* Out of the profiler's filter before exiting: an exiting thread, sampled once its memory is
 * gone, has no user stack (a frameless sample: stack_fault). */
static void leave_filter(int sig) {
    (void)sig;
    prctl(PR_SET_NAME, "lossgone");
    __atomic_add_fetch(&renamed, 1, __ATOMIC_SEQ_CST);
}

/* One NOP through a submission-polling io_uring: its kernel thread wakes, runs it, then polls
 * for more, busy, for the ring's idle time. */
static long nop_ring(unsigned idle_ms) {
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SQPOLL;
    p.sq_thread_idle = idle_ms;
    int fd = syscall(__NR_io_uring_setup, 4, &p);
    if (fd < 0) return fd;
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    char *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    struct io_uring_sqe *sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || sqes == MAP_FAILED) return -1;
    unsigned *tail = (unsigned *)(sq + p.sq_off.tail), mask = *(unsigned *)(sq + p.sq_off.ring_mask);
    unsigned t = *tail;
    memset(&sqes[t & mask], 0, sizeof(struct io_uring_sqe));
    sqes[t & mask].opcode = IORING_OP_NOP;
    ((unsigned *)(sq + p.sq_off.array))[t & mask] = t & mask;
    __atomic_store_n(tail, t + 1, __ATOMIC_RELEASE);
    if (__atomic_load_n((unsigned *)(sq + p.sq_off.flags), __ATOMIC_ACQUIRE) & IORING_SQ_NEED_WAKEUP)
        syscall(__NR_io_uring_enter, fd, 0, 0, IORING_ENTER_SQ_WAKEUP, NULL, 0);
    return fd;
}

int main(int argc, char **argv) {
    char ch;
    if (!strcmp(argv[1], "spin")) {
        int n = atoi(argv[2]), slot0 = atoi(argv[3]), step = atoi(argv[4]);
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 64 * 1024);
        signal(SIGUSR1, leave_filter);
        for (int i = 0; i < n; i++)
            if (pthread_create(&threads[i], &a, spin, (void *)(long)(slot0 + i * step))) return 1;
        printf("started\n");
        fflush(stdout);
        while (read(0, &ch, 1) > 0) {}
        for (int i = 0; i < n; i++) pthread_kill(threads[i], SIGUSR1);
        while (__atomic_load_n(&renamed, __ATOMIC_SEQ_CST) < n) sched_yield();
        prctl(PR_SET_NAME, "lossgone");
        _exit(0);
    } else {
        char line[16];
        printf("ready\n");
        fflush(stdout);
        if (!fgets(line, sizeof(line), stdin)) return 1;
        long fd = nop_ring(atoi(argv[2]));
        printf("%ld\n", fd);
        fflush(stdout);
        if (fd < 0) return 1;
        usleep(atoi(argv[2]) * 1000 + 500000);
        printf("polled\n");
    }
    fflush(stdout);
    while (read(0, &ch, 1) > 0) {}
    return 0;
}
"""


def _agent_bpf_map(pid: int, name: str) -> int:
    """The id of the BPF map ``name`` among those the process ``pid`` holds open."""
    import json
    import subprocess

    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("map_id:"):
                    ids.add(int(line.split()[1]))
        except OSError:
            continue
    for map_id in ids:
        info = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)],
                                         check=True, capture_output=True, text=True).stdout)
        if info.get("name") == name:
            return map_id
    raise AssertionError(f"no BPF map {name} held by {pid}")


def _per_cpu_array(map_id: int) -> list[int]:
    """A per-CPU array of u64 read with bpftool, summed over CPUs, by index."""
    import json
    import subprocess

    rows = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                                     check=True, capture_output=True, text=True).stdout)
    out: dict[int, int] = {}
    for row in rows:
        f = row.get("formatted", row)
        key = f["key"] if isinstance(f["key"], int) else int.from_bytes(bytes(int(b, 16) for b in f["key"]), "little")
        total = 0
        for v in f["values"]:
            val = v["value"]
            total += val if isinstance(val, int) else int.from_bytes(bytes(int(b, 16) for b in val), "little")
        out[key] = total
    return [out[i] for i in range(len(out))]


class ProfilerKernel:
    """The agent's profiler counters read straight from its BPF maps (works while it is stopped):
    ``stats`` gives every selected sample's fate (counted, recorded whole, dropped)."""

    def __init__(self, agent: Agent):
        from receiver.profiling.abi import LOST_REASONS, STAT_NAMES

        assert agent.proc is not None
        self.stat_names, self.lost_names = STAT_NAMES, LOST_REASONS
        self.stats_id = _agent_bpf_map(agent.proc.pid, "stats")
        self.lost_id = _agent_bpf_map(agent.proc.pid, "lost")

    def stats(self) -> dict[str, int]:
        return dict(zip(self.stat_names, _per_cpu_array(self.stats_id)))

    def lost(self) -> dict[str, int]:
        return dict(zip(self.lost_names, _per_cpu_array(self.lost_id)))

    def samples(self) -> int:
        s = self.stats()
        return s["counted"] + s["recorded"] + s["dropped"]


class RingPositions:
    """The consumer and producer positions of a BPF ring buffer, mapped read-only."""

    def __init__(self, map_id: int):
        import ctypes
        import mmap

        attr = (ctypes.c_uint32 * 8)(map_id)
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(321, 14, ctypes.byref(attr), ctypes.sizeof(attr))   # bpf(BPF_MAP_GET_FD_BY_ID)
        assert fd >= 0, os.strerror(ctypes.get_errno())
        self.fd = fd
        self.cons = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ, offset=0)
        self.prod = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ, offset=4096)

    def used(self) -> int:
        return int.from_bytes(self.prod[:8], "little") - int.from_bytes(self.cons[:8], "little")

    def close(self) -> None:
        self.cons.close()
        self.prod.close()
        os.close(self.fd)


def _profile_samples(collector: Collector, pid: int) -> tuple[int, int]:
    """(all samples, samples without a single frame) the Collector has of process ``pid``."""
    total = frameless = 0
    for req in collector.requests("profiles"):
        d = req.get("dictionary", {})
        strings, stacks, attrs = d.get("stringTable", []), d.get("stackTable", []), d.get("attributeTable", [])
        for rp in req.get("resourceProfiles", []):
            res = {}
            for kv in rp.get("resource", {}).get("attributes", []):
                key = kv["key"] if "key" in kv else strings[kv.get("keyStrindex", 0)]
                res[key] = kv.get("value", {}).get("intValue")
            if res.get("process.pid") is None or int(res["process.pid"]) != pid:
                continue
            for sp in rp.get("scopeProfiles", []):
                for prof in sp.get("profiles", []):
                    for s in prof.get("samples", []):
                        n = sum(int(v) for v in s.get("values", [])) or len(s.get("timestampsUnixNano", []))
                        total += n
                        if not stacks[s.get("stackIndex", 0)].get("locationIndices"):
                            frameless += n
    del attrs
    return total, frameless


class Workload:
    def __init__(self, exe: Path, *args: str):
        import subprocess

        self.proc = subprocess.Popen([str(exe), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.first_line = self.proc.stdout.readline().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGSTOP, returning once every thread has stopped (no sample of it after that)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

        def all_stopped() -> bool:
            states = []
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                try:
                    stat = Path(f"/proc/{self.proc.pid}/task/{tid}/stat").read_text()
                except OSError:
                    continue
                states.append(stat.rsplit(")", 1)[1].split()[0])
            return all(st in "tT" for st in states)

        wait_until(all_stopped, 30, 0.02, "every thread of the workload to stop")

    def end(self) -> None:
        """Closes its stdin and lets it go on: a spinner moves every thread out of the filter
        (a thread's exit, sampled once its memory is gone, would be a frameless sample:
        stack_fault), then exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.wait(60)
        self.kill()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe:
                pipe.close()


def _settled_profiler(agent: Agent, kernel: ProfilerKernel, interval: float) -> None:
    """Waits until the self-metric of every reason equals the kernel's counter."""
    def same() -> bool:
        k = kernel.lost()
        return all(lost(agent, "profiler", r) == n for r, n in k.items())

    wait_until(same, 60, 0.5, "the profiler's self-metrics to catch up with its kernel counters")
    threading.Event().wait(2 * interval + 0.5)


def test_profiler_every_loss_reason(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """One agent, max_stacks = 100: counts maps of 100 keys and stack maps of 100 entries in 128
    hash buckets (the kernel rounds the buckets up to a power of two), kernel stacks off,
    frame-pointer user stacks only. Whole samples (2088 bytes) travel over a 1 MiB ring buffer
    and are lost only when it is full, which the stopped agent makes it.

    Each stopped window's losses are checked against the kernel's own per-sample fate counters
    (``stats``: counted, recorded whole, dropped; with the process filter only this test's
    workloads reach them): dropped == the reasons that window can produce, by construction.

    - counts_map_full: 150 threads, one stack: 150 keys for 100 slots.
    - stack_collision: 60 threads, 60 distinct stacks, fewer than the 100 entries: a refusal can
      only be a taken bucket (with 60 stacks in 128 buckets one is taken with probability
      1 - 1e-6).
    - stack_map_full (-ENOMEM from bpf_get_stackid) cannot happen: the kernel refuses a stack
      for want of an entry only when its hash bucket is free and no entry is, which takes
      fewer entries than buckets; BCC's BPF_STACK_TRACE rounds max_entries up to the power of
      two the kernel takes as its bucket count, so with every entry used every bucket is taken
      and a new stack is a collision. The test checks the map as loaded (max_stacks 100: 128
      entries for 128 buckets) and that 300 distinct stacks leave stack_map_full at 0.
    - ringbuf_full: a new process sampled while the ring has no room even for a 16-byte notice:
      every sample of it tries to announce it and fails: lost == its samples.
    - stack_fault: an io_uring submission-polling thread (iou-sqp, a kernel worker in the
      workload's process) has no user stack and, with kernel stacks off, no frames at all:
      each of its samples is counted frameless and as stack_fault: lost == the frameless
      samples of that process at the Collector."""
    from ..harness import compile_c

    exe = compile_c(PROF_C, tmp_path / "lossprof", "-O1", "-pthread", "-no-pie")
    uring = Workload(exe, "uring", "2000")   # started before the agent: the pid filter names it
    interval = 1.0
    cfg = {"preset": "debug", "frequency": 1000, "report_interval": "1s", "max_stacks": 100,
           "kernel_stacks": False, "unwind_tables": False, "python_frames": False,
           "filter": {"process_names": ["lossprof"], "pids": [uring.pid]}}
    agent = Agent(tmp_path, agent_config(collector, {"profiler": cfg})).start()
    kernel = ProfilerKernel(agent)
    import json
    import subprocess

    def max_entries(name: str) -> int:
        out = subprocess.run(["bpftool", "-j", "map", "show", "id", str(_agent_bpf_map(agent.proc.pid, name))],  # type: ignore[union-attr]
                             check=True, capture_output=True, text=True).stdout
        return int(json.loads(out)["max_entries"])

    assert (max_entries("counts0"), max_entries("stacks0")) == (100, 128)
    ring = RingPositions(_agent_bpf_map(agent.proc.pid, "events"))   # type: ignore[union-attr]
    expected = dict.fromkeys(kernel.lost_names, 0)
    try:
        def stopped_window(threads: int, slot0: int, step: int) -> tuple[Workload, dict[str, int]]:
            """Starts the spinners, lets two drains pass (only their steady stacks in the maps),
            stops the agent until samples are dropped; returns the workload (stopped) and the
            fates' change over the window."""
            before = kernel.stats()
            w = Workload(exe, "spin", str(threads), str(slot0), str(step))
            assert w.first_line == "started"
            threading.Event().wait(2.5 * interval)
            os.kill(agent.proc.pid, signal.SIGSTOP)   # type: ignore[union-attr]
            wait_until(lambda: kernel.stats()["dropped"] - before["dropped"] >= 200, 60, 0.2,
                       "samples dropped with the ring buffer full")
            return w, before

        def resume(before: dict[str, int], *ws: Workload) -> dict[str, int]:
            """Ends the workloads while the agent is still stopped (what their ending costs is
            in the window too; no thread of theirs runs after it), takes the fates' change,
            then lets the agent go on."""
            for w in ws:
                w.end()
            after = kernel.stats()
            os.kill(agent.proc.pid, signal.SIGCONT)   # type: ignore[union-attr]
            return {k: after[k] - before[k] for k in after}

        sample_reasons = ("counts_map_full", "stack_collision", "stack_map_full")

        def check_window(d: dict[str, int], main_reason: str) -> None:
            """Every sample the window dropped is lost under one of the three sample reasons
            (their sum is exact); the reason the window forces has most of them; ringbuf_full
            and stack_fault did not move."""
            nonlocal expected
            _settled_profiler(agent, kernel, interval)
            got = {r: lost(agent, "profiler", r) for r in expected}
            delta = {r: got[r] - expected[r] for r in got}
            assert sum(delta[r] for r in sample_reasons) == d["dropped"], (delta, d)
            assert delta[main_reason] > d["dropped"] // 2, (delta, d)
            expected = got

        # ---- counts_map_full: 150 threads, one stack (ending them adds their signal
        # handler's few stacks, which may collide)
        w, before = stopped_window(150, 0, 0)
        check_window(resume(before, w), "counts_map_full")
        assert expected["ringbuf_full"] == expected["stack_fault"] == 0, expected

        # ---- stack_collision: 60 distinct stacks in 128 buckets, fewer than the 100 entries
        w, before = stopped_window(60, 0, 1)
        check_window(resume(before, w), "stack_collision")

        # ---- 300 distinct stacks (more than the 128 entries), then ringbuf_full in the same
        # stopped window
        w, before = stopped_window(300, 0, 1)
        w.end()
        # The ring is full for 2088-byte samples; fill what is left with 16-byte notices:
        # new processes (spinning at a slot the 300 did not use), until one cannot be announced.
        def notice_landed_or_lost(used: int, lost_before: int) -> Callable[[], bool]:
            return lambda: ring.used() > used or kernel.lost()["ringbuf_full"] > lost_before

        for _ in range(200):
            lost_before, used = kernel.lost()["ringbuf_full"], ring.used()
            f = Workload(exe, "spin", "1", "700", "0")
            wait_until(notice_landed_or_lost(used, lost_before), 60, 0.05, "a new process's notice")
            f.end()
            if kernel.lost()["ringbuf_full"] > lost_before:
                break
        # Now a new process: every one of its samples tries to announce it, and fails.
        mid, mid_lost = kernel.stats(), kernel.lost()["ringbuf_full"]
        noticed = Workload(exe, "spin", "1", "701", "0")
        wait_until(lambda: kernel.stats()["dropped"] - mid["dropped"] >= 50, 60, 0.1,
                   "samples of a process that cannot be announced")
        noticed.end()
        end = kernel.stats()
        announce_failures = sum(end[k] - mid[k] for k in ("counted", "recorded", "dropped"))
        assert kernel.lost()["ringbuf_full"] - mid_lost == announce_failures > 0, announce_failures
        d = resume(before)
        check_window(d, "stack_collision")
        assert expected["ringbuf_full"] == kernel.lost()["ringbuf_full"] > 0, expected
        assert expected["stack_map_full"] == 0, expected   # see the docstring: cannot happen

        # ---- stack_fault
        before = kernel.stats()
        assert uring.proc.stdin is not None and uring.proc.stdout is not None
        uring.proc.stdin.write("go\n")
        uring.proc.stdin.flush()
        assert int(uring.proc.stdout.readline()) >= 0, "io_uring_setup with SQPOLL failed"
        assert uring.proc.stdout.readline().strip() == "polled"
        faults = kernel.lost()["stack_fault"] - expected["stack_fault"]
        # Its main thread may be sampled in io_uring_setup too (with a user stack): at most that.
        samples = kernel.samples() - (before["counted"] + before["recorded"] + before["dropped"])
        assert 0 < faults <= samples, (faults, samples)
        expected["stack_fault"] += faults
        _settled_profiler(agent, kernel, interval)
        wait_until(lambda: _profile_samples(collector, uring.pid)[0] >= samples, 60, 0.5,
                   "the polling process's samples at the Collector")
        total, frameless = _profile_samples(collector, uring.pid)
        assert frameless == faults and total == samples, (total, frameless, faults, samples)
        assert {r: lost(agent, "profiler", r) for r in expected} == expected
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)   # type: ignore[union-attr]   # if a window failed
        ring.close()
        uring.kill()
        assert agent.stop() == 0, agent.log()[-3000:]


# ------------------------------------------------------------------------------------ process

# What the process program tries to put in its ring buffer, counted by a second program on the
# same tracepoints (attached after the agent's, so it runs after it on each event): one exec
# record per exec, one exit record per process (group_dead), one fork record per new process
# (not per thread), one per OOM victim. The process source has no process filter: it records
# the whole host, so the window below accounts for every process, not only this test's.
WITNESS_C = r"""
BPF_ARRAY(attempts, u64, 1);
static __always_inline void attempt(void) {
    u32 zero = 0;
    u64 *n = attempts.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
}
TRACEPOINT_PROBE(sched, sched_process_exec) { attempt(); return 0; }
TRACEPOINT_PROBE(sched, sched_process_exit) { if (args->group_dead) attempt(); return 0; }
TRACEPOINT_PROBE(task, task_newtask) { if (!(args->clone_flags & 0x00010000)) attempt(); return 0; }
TRACEPOINT_PROBE(oom, mark_victim) { attempt(); return 0; }
"""

# Forks and execs /bin/true N times, one after the other; prints each child's pid.
EXECS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0) {
            execl("/bin/true", "true", (char *)NULL);
            _exit(127);
        }
        printf("%d\n", p);
        waitpid(p, NULL, 0);
    }
    return 0;
}
"""


def test_process_ringbuf_full(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """ringbuf_full: with the agent stopped, 600 fork + exec + exit of /bin/true (about 3 KB of
    records each) overrun the 1 MiB ring. This test's processes (the forking parent and its 600
    children) made exactly 3 x 601 records; those missing at the Collector were lost. The
    process source has no process filter, so the rest of the host's processes share the ring:
    its records lost in the same window add to the count. So the count must lie between this
    test's losses and those plus every other record the host attempted in the window, as a
    witness program on the same tracepoints counts them (on a quiet host: exactly this test's).

    args_map_full and exit_map_full: test_process_args_map_full_and_exit_map_full, with small
    max_inflight_execs and max_tracked_exits."""
    import subprocess

    from bcc import BPF

    from ..harness import compile_c

    exe = compile_c(EXECS_C, tmp_path / "lossexecs", "-O1")
    agent = Agent(tmp_path, agent_config(collector, {"process": {}})).start()
    witness = BPF(text=WITNESS_C)
    table = witness["attempts"]
    n = 600
    try:
        with Paused(agent):
            w0 = table[0].value
            parent = subprocess.Popen([str(exe), str(n)], stdout=subprocess.PIPE, text=True)
            out, _ = parent.communicate(timeout=120)
            w1 = table[0].value
        assert parent.returncode == 0
        ours = {int(x) for x in out.split()} | {parent.pid}
        assert len(ours) == n + 1
        # The parent's own fork (from this test), exec and exit are in the window too.
        generated = 3 * (n + 1)

        def received() -> int:
            return sum(1 for r in collector.log_records()
                       if r.get("eventName") in ("process.exec", "process.exit", "process.fork")
                       and r["attrs"].get("process.pid") in ours)

        wait_until(lambda: received() + lost(agent, "process", "ringbuf_full") >= generated, 60, 0.5,
                   "the window's records to arrive or be counted lost")
        threading.Event().wait(11)   # two more reads of the kernel's counters (every 5 s)
        got = received()
        lost_ours = generated - got
        count = lost(agent, "process", "ringbuf_full")
        others = (w1 - w0) - generated
        assert lost_ours > 0, (got, generated)
        assert lost_ours <= count <= lost_ours + others, (lost_ours, count, others)
        assert lost(agent, "process", "args_map_full") == lost(agent, "process", "exit_map_full") == 0
    finally:
        witness.cleanup()
        assert agent.stop() == 0, agent.log()[-3000:]



# Holds a process source's map-full window open, deterministically.
# "execs N": N processes, each with an exec in flight that cannot go on: it calls
# execve(/bin/true) with argv on a userfaultfd page nobody has filled, so the kernel stalls in
# reading argv, after sys_enter_execve (the agent's exec_argv has its entry) and before
# sched_process_exec; a process it forked first reads the fault, then fills the page (argv
# {"lossheld"}) once its release pipe closes, and the exec goes on.
# "exits N": N children stopped in their exit (ptrace PTRACE_EVENT_EXIT stop: after
# exit_group(3), the agent's exit_info has their entry, before sched_process_exit), continued
# when stdin closes.
# Either prints the N pids, then "held", then waits for its stdin to close.
HOLD_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static char name[] = "lossheld";

/* A single-threaded exec (a thread's exec would SIGKILL the others). Its argv is filled from
 * another process, forked after registering the page: it holds the userfaultfd. */
static void hold_exec(int ready, int release) {
    long psz = sysconf(_SC_PAGESIZE);
    int uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
    struct uffdio_api api = {.api = UFFD_API};
    if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) _exit(2);
    char *page = mmap(NULL, psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct uffdio_register reg = {.range = {(unsigned long)page, psz}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (page == MAP_FAILED || ioctl(uffd, UFFDIO_REGISTER, &reg)) _exit(3);
    pid_t filler = fork();
    if (filler == 0) {
        struct uffd_msg msg;
        if (read(uffd, &msg, sizeof msg) != sizeof msg) _exit(5);   /* the exec reads argv: stalled */
        if (write(ready, "x", 1) != 1) _exit(6);
        char ch;
        while (read(release, &ch, 1) > 0) {}
        char *src = aligned_alloc(psz, psz);
        char *argv[2] = {name, NULL};      /* the same address in the exec's process */
        memset(src, 0, psz);
        memcpy(src, argv, sizeof argv);
        struct uffdio_copy copy = {.dst = (unsigned long)page, .src = (unsigned long)src, .len = psz};
        _exit(ioctl(uffd, UFFDIO_COPY, &copy) ? 7 : 0);
    }
    close(ready);
    close(release);
    execve("/bin/true", (char **)page, environ);
    _exit(127);
}

static void wait_stdin(void) {
    char ch;
    while (read(0, &ch, 1) > 0) {}
}

int main(int argc, char **argv) {
    int n = atoi(argv[2]);
    pid_t kids[256];
    if (!strcmp(argv[1], "execs")) {
        int ready[2], release[2];
        prctl(PR_SET_CHILD_SUBREAPER, 1);
        if (pipe(ready) || pipe(release)) return 1;
        for (int i = 0; i < n; i++) {
            kids[i] = fork();
            if (kids[i] == 0) {
                close(ready[0]);
                close(release[1]);
                hold_exec(ready[1], release[0]);
            }
        }
        close(ready[1]);
        close(release[0]);
        for (int i = 0; i < n; i++) {
            char ch;
            if (read(ready[0], &ch, 1) != 1) return 1;
        }
        for (int i = 0; i < n; i++) printf("%d\n", kids[i]);
        printf("held\n");
        fflush(stdout);
        wait_stdin();
        close(release[1]);
        while (wait(NULL) > 0) {}   /* the execs, and their fillers: reparented here (a subreaper) */
        return 0;
    }
    for (int i = 0; i < n; i++) {
        int st;
        kids[i] = fork();
        if (kids[i] == 0) {
            ptrace(PTRACE_TRACEME, 0, 0, 0);
            raise(SIGSTOP);
            _exit(3);
        }
        if (waitpid(kids[i], &st, 0) != kids[i] || !WIFSTOPPED(st)) return 1;
        ptrace(PTRACE_SETOPTIONS, kids[i], 0, PTRACE_O_TRACEEXIT | PTRACE_O_EXITKILL);
        ptrace(PTRACE_CONT, kids[i], 0, 0);
        if (waitpid(kids[i], &st, 0) != kids[i] || (st >> 8) != (SIGTRAP | (PTRACE_EVENT_EXIT << 8)))
            return 1;
        printf("%d\n", kids[i]);
    }
    printf("held\n");
    fflush(stdout);
    wait_stdin();
    for (int i = 0; i < n; i++) {
        ptrace(PTRACE_CONT, kids[i], 0, 0);
        waitpid(kids[i], NULL, 0);
    }
    return 0;
}
"""

# Attached after the agent's process program (so it runs after it on each tracepoint), on the
# agent's own exec_argv and exit_info maps (pinned for it): after each update the agent
# attempts, the key is in the map unless the update was refused (an existing key is replaced,
# never refused; only the task itself deletes its key meanwhile). So it records every refusal,
# host-wide, with the thread (exec) or process (exit) it refused. The one attempt it cannot see
# is a SIGKILL taken with its default action: the agent attempts it only when it saw the
# signal generated (its fatal_sent, which it has already cleared), so an absent key there is
# either a refusal or no attempt: counted apart, as "maybe".
MAP_WITNESS_C = r"""
struct exec_args_blob { char b[EXEC_ARGS_SIZE]; };
struct exit_blob { s32 code; s32 signal; };
BPF_TABLE_PINNED("hash", u32, struct exec_args_blob, agent_argv, MAX_EXECS, "PIN_ARGV");
BPF_TABLE_PINNED("hash", u32, struct exit_blob, agent_exits, MAX_EXITS, "PIN_EXITS");
BPF_HASH(args_refused, u32, u32, 65536);    /* tid → 1 */
BPF_HASH(exit_refused, u32, u32, 65536);    /* tgid → 1 */
BPF_ARRAY(totals, u64, 3);                  /* args refused, exit refused, exit maybe refused */

static __always_inline void add(u32 i) {
    u64 *n = totals.lookup(&i);
    if (n)
        __sync_fetch_and_add(n, 1);
}

static __always_inline int exec_attempted(void) {
    u32 tid = bpf_get_current_pid_tgid(), one = 1;
    if (!agent_argv.lookup(&tid)) {
        add(0);
        args_refused.update(&tid, &one);
    }
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_enter_execve) { return exec_attempted(); }
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) { return exec_attempted(); }

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32, one = 1;
    if (!agent_exits.lookup(&tgid)) {
        add(1);
        exit_refused.update(&tgid, &one);
    }
    return 0;
}

#define FATAL_BY_DEFAULT(s) ((s) >= 1 && (s) <= 31 && !((1u << (s)) & ((1u << 17) | (1u << 18) | \
    (1u << 19) | (1u << 20) | (1u << 21) | (1u << 22) | (1u << 23) | (1u << 28))))
TRACEPOINT_PROBE(signal, signal_deliver) {
    int sig = args->sig;
    u32 tgid = bpf_get_current_pid_tgid() >> 32, one = 1;
    if (args->sa_handler != 0 || !FATAL_BY_DEFAULT(sig) || agent_exits.lookup(&tgid))
        return 0;
    if (sig == 9) {
        add(2);
    } else {
        add(1);
        exit_refused.update(&tgid, &one);
    }
    return 0;
}
"""


def test_process_args_map_full_and_exit_map_full(bpf_ok: None, collector: Collector,
                                                 tmp_path: Path) -> None:
    """args_map_full and exit_map_full, with max_inflight_execs = max_tracked_exits = 4.

    args_map_full: 4 execs held in flight (HOLD_C "execs") fill exec_argv; 20 fork + exec of
    /bin/true then find no room. exit_map_full: 4 processes held in their exit (HOLD_C "exits")
    fill exit_info; 20 more exits find no room. The process source records the whole host, so
    other processes' execs and exits in those windows are refused too, and failed execs (a
    PATH search) are counted without any record: a witness program on the agent's own maps
    (MAP_WITNESS_C) records every refusal, host-wide, and which task it refused.

    - args_map_full == the refusals the witness saw, exactly; this test's 20 execs each reached
      the Collector, without argv exactly where the witness saw theirs refused (and, the map
      being full of the held execs, at least one was).
    - exit_map_full lies between the refusals the witness saw and those plus the SIGKILLs it
      cannot judge (see MAP_WITNESS_C; none on a quiet host, where it is exact); this test's 20
      exits reached the Collector, without an exit code exactly where the witness saw theirs
      refused (at least one), with code 0 elsewhere; the held ones with their code 3.

    Exact only if nothing was refused before the witness attached, which takes 4 execs in flight
    (or 4 exits in progress) at once elsewhere on the host while the agent starts: the kernel's
    own lost[] is read just before the witness loads, and must be 0 for both then."""
    import ctypes
    import subprocess
    import uuid

    from bcc import BPF

    from ..harness import compile_c

    size = 4
    execs = compile_c(EXECS_C, tmp_path / "lossexecs", "-O1")
    hold = compile_c(HOLD_C, tmp_path / "losshold", "-O1", "-pthread")
    cfg = {"max_inflight_execs": size, "max_tracked_exits": size}
    agent = Agent(tmp_path, agent_config(collector, {"process": cfg})).start()
    assert agent.proc is not None
    tag = uuid.uuid4().hex[:12]
    pins = {name: Path(f"/sys/fs/bpf/loss_{tag}_{name}") for name in ("exec_argv", "exit_info")}
    for name, pin in pins.items():
        subprocess.run(["bpftool", "map", "pin", "id", str(_agent_bpf_map(agent.proc.pid, name)), str(pin)],
                       check=True)
    lost_id = _agent_bpf_map(agent.proc.pid, "lost")
    witness = None
    held: list[subprocess.Popen[str]] = []
    try:
        before = _per_cpu_array(lost_id)
        text = MAP_WITNESS_C.replace("PIN_ARGV", str(pins["exec_argv"])).replace("PIN_EXITS", str(pins["exit_info"]))
        witness = BPF(text=text, cflags=[f"-DEXEC_ARGS_SIZE={8 + 20 * 128}", f"-DMAX_EXECS={size}",
                                         f"-DMAX_EXITS={size}"])
        # Counted before the witness saw anything: nothing, or the exactness below cannot hold.
        assert before[1:3] == [0, 0], before

        def holding(mode: str, table: str) -> tuple[subprocess.Popen[str], list[int]]:
            p = subprocess.Popen([str(hold), mode, str(size)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            held.append(p)
            assert p.stdout is not None
            pids = [int(p.stdout.readline()) for _ in range(size)]
            assert p.stdout.readline().strip() == "held"
            assert len(witness[table].items()) == size, f"{table} not full of the held ones"  # type: ignore[index]
            return p, pids

        def run_execs(n: int) -> list[int]:
            out = subprocess.run([str(execs), str(n)], check=True, capture_output=True, text=True).stdout
            return [int(x) for x in out.split()]

        def release(p: subprocess.Popen[str]) -> None:
            assert p.stdin is not None
            p.stdin.close()
            assert p.wait(30) == 0

        n = 20
        # ---- args_map_full
        h, exec_holders = holding("execs", "agent_argv")
        exec_kids = run_execs(n)
        release(h)
        # ---- exit_map_full
        h, exit_holders = holding("exits", "agent_exits")
        exit_kids = run_execs(n)
        release(h)

        totals = [witness["totals"][ctypes.c_int(i)].value for i in range(3)]
        args_refused = {k.value for k in witness["args_refused"].keys()}
        exit_refused = {k.value for k in witness["exit_refused"].keys()}

        def records(event: str, pids: list[int]) -> dict[int, dict[str, Any]]:
            return {r["attrs"]["process.pid"]: r for r in collector.log_records()
                    if r.get("eventName") == event and r["attrs"].get("process.pid") in pids}

        wait_until(lambda: len(records("process.exec", exec_kids + exec_holders)) == n + size
                   and len(records("process.exit", exit_kids + exit_holders)) == n + size, 60, 0.5,
                   "this test's exec and exit records at the Collector")
        # args_map_full: the kernel's count, then the self-metric, equal the witness's.
        wait_until(lambda: lost(agent, "process", "args_map_full") >= totals[0]
                   and lost(agent, "process", "exit_map_full") >= totals[1], 30, 0.3,
                   "the self-metrics to reach the witness's counts")
        threading.Event().wait(11)   # two more reads of the kernel's counters (every 5 s)
        assert lost(agent, "process", "args_map_full") == totals[0], (totals, args_refused)
        got = records("process.exec", exec_kids)
        no_args = {pid for pid, r in got.items() if not r["attrs"].get("process.command_args")}
        assert no_args == args_refused & set(exec_kids) and no_args, (sorted(no_args), len(args_refused))
        assert all(got[p]["attrs"]["process.command_args"] == ["true"] for p in set(exec_kids) - no_args)

        # exit_map_full: between the certain refusals and those plus the undecidable SIGKILLs.
        count = lost(agent, "process", "exit_map_full")
        assert totals[1] <= count <= totals[1] + totals[2], (count, totals)
        got = records("process.exit", exit_kids + exit_holders)
        no_code = {pid for pid, r in got.items() if "process.exit.code" not in r["attrs"]}
        assert no_code == exit_refused & set(exit_kids) and no_code, (sorted(no_code), len(exit_refused))
        assert all(got[p]["attrs"]["process.exit.code"] == 0 for p in set(exit_kids) - no_code)
        assert all(got[p]["attrs"]["process.exit.code"] == 3 for p in exit_holders)
        assert lost(agent, "process", "ringbuf_full") == 0
    finally:
        for p in held:
            if p.poll() is None:
                p.kill()
                p.wait(30)
            for pipe in (p.stdin, p.stdout):
                if pipe:
                    pipe.close()
        if witness is not None:
            witness.cleanup()
        for pin in pins.values():
            pin.unlink(missing_ok=True)
        assert agent.stop() == 0, agent.log()[-3000:]


# ------------------------------------------------------------------------------------ http


def _http_exchange(server: socket.socket, port: int, i: int) -> None:
    """One request and its response on a new connection, each moved by exactly one call per side
    (every byte is queued before the other side reads it, in one buffer), then both sockets
    closed, client first, so that both reach TCP CLOSE: 4 data records (client send, server
    recv, server send, client recv) and 2 close records."""
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    request = b"GET /loss/%04d HTTP/1.1\r\nHost: loss\r\nContent-Length: 0\r\n\r\n" % i
    client.sendall(request)
    assert conn.recv(65536) == request
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    conn.sendall(response)
    assert client.recv(65536) == response
    client.close()
    assert conn.recv(1) == b""
    conn.close()


HTTP_RECORDS_PER_EXCHANGE = 6


def test_http_ringbuf_full(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """ringbuf_full: ring_buffer_pages = 1 (4 KiB), the port filter on this test's server port.
    With the agent stopped, 40 exchanges (``_http_exchange``: raw sockets, so that each makes
    exactly 6 records; http.client and http.server split reads as timing has it) attempt 240
    records of 112 to 170 bytes: about 25 fit in the ring, the rest are lost. The records the
    agent reads (``events_received_total``) after SIGCONT plus the lost count must be 240, with
    some of each; call_map_full and decode_error stay 0."""
    port = free_port()
    cfg = {"report_interval": "1s", "ports": [port], "ring_buffer_pages": 1}
    agent = Agent(tmp_path, agent_config(collector, {"http": cfg})).start()
    server = socket.create_server(("127.0.0.1", port), backlog=128)
    try:
        # One exchange with the agent running: its records all arrive, and nothing is lost.
        _http_exchange(server, port, 0)
        wait_until(lambda: agent.metric_value(RECEIVED, source="http") >= HTTP_RECORDS_PER_EXCHANGE, 30, 0.2,
                   "the first exchange's records")
        settle_exact(agent, "http", {}, 1.0)
        received0 = int(agent.metric_value(RECEIVED, source="http"))
        assert received0 == HTTP_RECORDS_PER_EXCHANGE, received0

        n = 40
        stopped_agent(agent, lambda: [_http_exchange(server, port, i) for i in range(1, n + 1)])
        generated = HTTP_RECORDS_PER_EXCHANGE * n

        def arrived() -> int:
            return int(agent.metric_value(RECEIVED, source="http")) - received0

        wait_until(lambda: arrived() + lost(agent, "http", "ringbuf_full") >= generated, 60, 0.3,
                   "the stopped window's records to arrive or be counted lost")
        got = arrived()
        assert 0 < got < generated, got
        settle_exact(agent, "http", {"ringbuf_full": generated - got}, 1.0)
        assert arrived() == got
    finally:
        server.close()
        assert agent.stop() == 0, agent.log()[-3000:]


# "losscalls S M": S threads, each blocked in read(2) on its own empty socketpair end (the http
# program keeps each call's buffer by thread id from sys_enter_read until it returns), then, once
# SIGUSR1 arrives, M reads by the main thread of a byte already queued (they return at once), then
# exit. It makes no other read/write-family call after it starts its threads (no stdio: the test
# finds the threads in /proc; the main thread waits in sigwaitinfo).
CALLS_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static void *hold(void *arg) {
    char ch;
    read((int)(long)arg, &ch, 1);
    return NULL;
}

int main(int argc, char **argv) {
    int s = atoi(argv[1]), m = atoi(argv[2]), sv[2], q[2];
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, q)) return 1;
    for (int i = 0; i < m; i++)
        if (write(q[1], "x", 1) != 1) return 1;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 64 * 1024);
    for (int i = 0; i < s; i++) {
        pthread_t t;
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || pthread_create(&t, &a, hold, (void *)(long)sv[0])) return 1;
    }
    siginfo_t si;
    if (sigwaitinfo(&set, &si) != SIGUSR1) return 1;
    char ch;
    for (int i = 0; i < m; i++)
        if (read(q[0], &ch, 1) != 1) return 2;
    _exit(0);
}
"""


def _blocked_in_read(pid: int) -> int:
    """Threads of ``pid`` (not its main thread) asleep in read(2) (x86-64 number 0)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) == pid:
            continue
        try:
            call = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if call and call[0] == "0" and stat[0] == "S":
            n += 1
    return n


def test_http_call_map_full(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """call_map_full: max_calls = 8 slots (a call takes the slot of its thread id modulo 8), the
    process filter on "losscalls" (only its calls take slots; the agent never takes one). CALLS_C
    holds 8 reads in flight on socketpairs, one per thread: a thread whose slot an earlier one
    holds is lost (the test computes how many from the thread ids); then 20 more reads from the
    main thread: all lost when its slot is held, none otherwise. The sockets are AF_UNIX, so no
    record is attempted: ringbuf_full stays 0."""
    import subprocess

    from ..harness import compile_c

    size, extra = 8, 20
    exe = compile_c(CALLS_C, tmp_path / "losscalls", "-O1", "-pthread")
    cfg = {"report_interval": "1s", "max_calls": size, "filter": {"process_names": ["losscalls"]}}
    agent = Agent(tmp_path, agent_config(collector, {"http": cfg})).start()
    assert agent.proc is not None
    calls_id = _agent_bpf_map(agent.proc.pid, "calls")
    p = subprocess.Popen([str(exe), str(size), str(extra)])
    try:
        wait_until(lambda: _blocked_in_read(p.pid) == size, 30, 0.1, f"{size} threads blocked in read")
        assert _map_entries(calls_id) == size
        held = {int(t) % size for t in os.listdir(f"/proc/{p.pid}/task") if int(t) != p.pid}
        holders_lost = size - len(held)
        settle_exact(agent, "http", {"call_map_full": holders_lost} if holders_lost else {}, 1.0)
        os.kill(p.pid, signal.SIGUSR1)
        assert p.wait(30) == 0
        main_lost = extra if p.pid % size in held else 0
        lost = holders_lost + main_lost
        settle_exact(agent, "http", {"call_map_full": lost} if lost else {}, 1.0)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
        assert agent.stop() == 0, agent.log()[-3000:]


def _map_entries(map_id: int) -> int:
    import json
    import subprocess

    return len(json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                                         check=True, capture_output=True, text=True).stdout))


# ------------------------------------------------------------------------------------ syscalls: start_map_full

# "lossstart K": K threads, each blocked in readv(2) on one shared empty pipe; once a line
# arrives on stdin, the pipe's write end is closed (every readv returns 0), the threads are
# joined, "released" is printed, and it waits for stdin to close. So each thread makes one readv,
# switched out in the call (it sleeps); nothing else in the process calls readv.
START_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

static int p[2];

static void *hold(void *arg) {
    char ch;
    struct iovec v = {&ch, 1};
    (void)arg;
    readv(p[0], &v, 1);
    return NULL;
}

int main(int argc, char **argv) {
    int k = atoi(argv[1]);
    pthread_t *t = calloc(k, sizeof *t);
    char line[16];
    if (pipe(p)) return 1;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 64 * 1024);
    for (int i = 0; i < k; i++)
        if (pthread_create(&t[i], &a, hold, NULL)) return 1;
    if (!fgets(line, sizeof line, stdin)) return 1;
    close(p[1]);
    for (int i = 0; i < k; i++) pthread_join(t[i], NULL);
    printf("released\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {}
    return 0;
}
"""

# Attached after the agent's syscalls program, on its start map (pinned for it), mirroring its
# per-CPU "call in flight" slot: set at sys_enter, cleared at sys_exit, at the switch and at a
# thread's exit, exactly where the agent sets and clears its own. At each switch with a call in
# flight the agent attempts start[tid] = ...; only the thread itself deletes its key, and a key
# never outlives its call, so the key is absent after the attempt exactly when it was refused.
# seen[cpu] = 1 at every switch: once every CPU has switched after the witness attached, no call
# the witness did not see enter is left in the agent's slots, nor one whose exit it missed while
# it was being attached (its counts start then).
START_WITNESS_C = r"""
struct sc_start_mirror { u64 ts; u32 nr; u32 selected; };
BPF_TABLE_PINNED("hash", u32, struct sc_start_mirror, agent_start, MAX_THREADS, "PIN_START");
BPF_PERCPU_ARRAY(pending, u64, 1);          /* syscall nr + 1 of the call in flight here; 0: none */
BPF_PERCPU_ARRAY(seen, u64, 1);
BPF_HASH(refused, u64, u64, 65536);         /* tid << 32 | nr → refusals */
BPF_ARRAY(totals, u64, 2);                  /* attempts, refusals */

static __always_inline void add(u32 i) {
    u64 *n = totals.lookup(&i);
    if (n)
        __sync_fetch_and_add(n, 1);
}

RAW_TRACEPOINT_PROBE(sys_enter) {
    long id = (long)ctx->args[1];
    u32 zero = 0;
    u64 *p = pending.lookup(&zero);
    if (id >= 0 && p)
        *p = (u64)id + 1;
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit) {
    u32 zero = 0;
    u64 *p = pending.lookup(&zero);
    if (p)
        *p = 0;
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit) {
    u32 zero = 0;
    u64 *p = pending.lookup(&zero);
    if (p)
        *p = 0;
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_switch) {
    u32 zero = 0;
    u64 *p = pending.lookup(&zero), *s = seen.lookup(&zero);
    if (s)
        *s = 1;
    if (!p || !*p)
        return 0;
    u64 nr = *p - 1, one = 1;
    *p = 0;
    add(0);
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (agent_start.lookup(&tid))
        return 0;
    add(1);
    u64 key = (u64)tid << 32 | nr;
    u64 *n = refused.lookup(&key);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        refused.update(&key, &one);
    return 0;
}
"""
READV_NR = 19   # x86-64


def _online_cpus() -> list[int]:
    out: list[int] = []
    for part in Path("/sys/devices/system/cpu/online").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def test_syscalls_start_map_full(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """start_map_full on the fallback for kernels without task local storage
    (EBPF_RECEIVER_WITHOUT=task_storage: calls in flight while their thread is switched out wait
    in a hash by thread id), with max_threads = 256. START_C holds 320 threads asleep in readv,
    more than the map holds: it fills, and the rest of this test's threads, and any other
    thread on the host that blocks in a call meanwhile (the map is host-wide), are refused.
    START_WITNESS_C, on the agent's own map, records every refusal and which thread and call it
    refused.

    - start_map_full == the refusals the witness saw, exactly, once the held threads are
      released (the map then holds only the host's other blocked threads, far fewer than 256,
      and refusals stop: the test waits for the witness's count to stay still);
    - the process's per-process readv series (the process filter selects it) counts exactly its
      readv calls the witness saw accepted: 320 minus those refused (at least 320 - 256).

    Exact only if nothing was refused before the witness mirrored the agent's slots: its counts
    start once every CPU has switched after it attached, and the kernel's lost[] must be 0 then."""
    import ctypes
    import subprocess
    import uuid

    from bcc import BPF

    from ..harness import compile_c

    size, k = 256, 320
    exe = compile_c(START_C, tmp_path / "lossstart", "-O1", "-pthread")
    cfg = {"report_interval": "1s", "max_threads": size, "slow_spans": False,
           "filter": {"process_names": ["lossstart"]}}
    agent = Agent(tmp_path, agent_config(collector, {"syscalls": cfg}),
                  env={"EBPF_RECEIVER_WITHOUT": "task_storage"}).start()
    assert agent.proc is not None
    pin = Path(f"/sys/fs/bpf/loss_{uuid.uuid4().hex[:12]}_start")
    subprocess.run(["bpftool", "map", "pin", "id", str(_agent_bpf_map(agent.proc.pid, "start")), str(pin)],
                   check=True)
    lost_id = _agent_bpf_map(agent.proc.pid, "lost")
    witness = None
    holder = None
    try:
        witness = BPF(text=START_WITNESS_C.replace("PIN_START", str(pin)), cflags=[f"-DMAX_THREADS={size}"])
        seen = witness["seen"]
        seen.clearitem(ctypes.c_int(0))
        online = _online_cpus()
        wait_until(lambda: all(seen[ctypes.c_int(0)][c] == 1 for c in online), 30, 0.05, "a switch on every CPU")
        # While BCC attached the witness's programs one by one (sys_enter before sys_exit), its
        # slots were not yet the agent's: what it recorded then is no refusal. They are now.
        witness["refused"].clear()
        for i in range(2):
            witness["totals"].clearitem(ctypes.c_int(i))
        assert _per_cpu_array(lost_id)[1] == 0, "start_map_full before the witness mirrored the agent"

        holder = subprocess.Popen([str(exe), str(k)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        tids = [int(t) for t in os.listdir(f"/proc/{holder.pid}/task")]

        def in_readv() -> int:
            n = 0
            for tid in os.listdir(f"/proc/{holder.pid}/task"):   # type: ignore[union-attr]
                try:
                    call = Path(f"/proc/{holder.pid}/task/{tid}/syscall").read_text().split()   # type: ignore[union-attr]
                except OSError:
                    continue
                n += bool(call) and call[0] == str(READV_NR)
            return n

        wait_until(lambda: in_readv() == k, 30, 0.1, f"{k} threads asleep in readv")
        tids = [int(t) for t in os.listdir(f"/proc/{holder.pid}/task")]
        assert len(tids) == k + 1

        def refused_readv() -> set[int]:
            return {key.value >> 32 for key in witness["refused"].keys()   # type: ignore[index]
                    if key.value & 0xFFFFFFFF == READV_NR and key.value >> 32 in tids}

        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        ours = refused_readv()   # final: every thread's one readv has returned
        assert len(ours) >= k - size, len(ours)

        totals = witness["totals"]

        def refusals() -> int:
            return int(totals[ctypes.c_int(1)].value)

        def still() -> bool:
            before = refusals()
            threading.Event().wait(2.5)
            return refusals() == before

        wait_until(still, 60, 0, "the host's refusals to stop (the map no longer full)")
        count = refusals()
        settle_exact(agent, "syscalls", {"start_map_full": count}, 1.0)
        assert refusals() == count
        assert refused_readv() == ours

        def readv_calls() -> list[int]:
            return [int(p["asInt"]) for p in _latest_points(collector, "syscall.calls", holder.pid)   # type: ignore[union-attr]
                    if p["attrs"].get("syscall.name") == "readv"]

        wait_until(lambda: readv_calls() == [k - len(ours)], 30, 0.3,
                   f"the holder's readv series at {k} - {len(ours)} refused")
    finally:
        if holder is not None:
            for pipe in (holder.stdin, holder.stdout):
                if pipe:
                    pipe.close()
            try:
                holder.wait(30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait(30)
        if witness is not None:
            witness.cleanup()
        pin.unlink(missing_ok=True)
        assert agent.stop() == 0, agent.log()[-3000:]
