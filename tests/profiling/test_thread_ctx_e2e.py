"""OTEP 4947 thread context (``otel_thread_ctx_v1``, docs/profiler.md#request-links) with real BPF,
a real C program and a real Collector (``sources.profiler.thread_ctx_read``).

The program links a shared library that defines ``__thread void *otel_thread_ctx_v1`` (built
with ``-fPIC -mtls-dialect=gnu2``: a TLSDESC access, as an SDK's), and runs four threads: one
burns CPU with a record whose ``valid`` is 1, one burns CPU with no record (NULL pointer), one
burns CPU with a record whose ``valid`` is 0, and one sleeps in short naps with the valid record.
The library is linked (static TLS) or dlopen'ed with glibc's optional static TLS at 0 (dynamic
TLS, the thread's DTV). The agent finds the process's TLS slots from its memory (glibc's thread_db descriptors,
receiver/profiling/thread_ctx.py); the profiler reads the record in each sample. The first
thread's CPU samples and the sleeper's off-CPU samples link to the record's trace and span; the
others' samples link to nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ..harness import Agent, Collector, agent_config, wait_until
from .test_request_links_e2e import _linked_samples

pytestmark = [pytest.mark.bpf, pytest.mark.collector]

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"

LIB = """\
__thread void *otel_thread_ctx_v1;   /* OTEP 4947: the SDK's per-thread record pointer */
void otel_ctx_set(void *record) { otel_thread_ctx_v1 = record; }
"""

APP = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
#ifdef DLOPEN
#include <dlfcn.h>
static void (*otel_ctx_set)(void *record);
#else
void otel_ctx_set(void *record);
#endif

struct otel_thread_ctx_v1 { uint8_t trace_id[16]; uint8_t span_id[8]; uint8_t valid; uint8_t reserved;
                            uint16_t attrs_data_size; uint8_t attrs_data[]; };

static pthread_barrier_t ready;
static int tids[4];
static const char *trace, *span;

__attribute__((noinline)) void otep_linked_work(void) { volatile uint64_t x = 0; for (;;) x++; }
__attribute__((noinline)) void otep_unlinked_work(void) { volatile uint64_t x = 0; for (;;) x++; }
__attribute__((noinline)) void otep_invalid_work(void) { volatile uint64_t x = 0; for (;;) x++; }
__attribute__((noinline)) void otep_sleeping_work(void) { for (;;) usleep(20000); }

static void *run(void *arg) {
    long which = (long)arg;
    tids[which] = (int)syscall(SYS_gettid);
    if (which != 1) {
        struct otel_thread_ctx_v1 *r = calloc(1, sizeof(*r) + 16);
        for (int i = 0; i < 16; i++) sscanf(trace + 2 * i, "%2hhx", &r->trace_id[i]);
        for (int i = 0; i < 8; i++) sscanf(span + 2 * i, "%2hhx", &r->span_id[i]);
        r->valid = which == 2 ? 0 : 1;
        otel_ctx_set(r);
    }
    pthread_barrier_wait(&ready);
    switch (which) {
    case 0: otep_linked_work(); break;
    case 1: otep_unlinked_work(); break;
    case 2: otep_invalid_work(); break;
    default: otep_sleeping_work();
    }
    return NULL;
}

int main(int argc, char **argv) {
    trace = argv[1];
    span = argv[2];
#ifdef DLOPEN
    void *lib = dlopen(argv[3], RTLD_NOW);
    if (!lib || !(otel_ctx_set = (void (*)(void *))dlsym(lib, "otel_ctx_set"))) {
        fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
#endif
    pthread_barrier_init(&ready, NULL, 5);
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, run, (void *)i);
    pthread_barrier_wait(&ready);
    printf("{\"linked\": %d, \"unlinked\": %d, \"invalid\": %d, \"sleeping\": %d}\n",
           tids[0], tids[1], tids[2], tids[3]);
    fflush(stdout);
    pause();
    return 0;
}
"""


def _build(tmp_path: Path, dynamic: bool) -> Path:
    cc = shutil.which("cc")
    assert cc, "no C compiler (cc) to build the test program"
    (tmp_path / "ctx.c").write_text(LIB)
    (tmp_path / "app.c").write_text(APP)
    subprocess.run([cc, "-O1", "-fPIC", "-mtls-dialect=gnu2", "-shared", "-o", "libotelctx.so", "ctx.c"],
                   cwd=tmp_path, check=True)
    link = ["-DDLOPEN", "-ldl"] if dynamic else ["-L.", "-lotelctx", "-Wl,-rpath,$ORIGIN"]
    subprocess.run([cc, "-O1", "-g", "-fno-omit-frame-pointer", "-o", "otep_app", "app.c", *link, "-lpthread"],
                   cwd=tmp_path, check=True)
    relocs = subprocess.run(["readelf", "-rW", str(tmp_path / "libotelctx.so")], capture_output=True,
                            text=True, check=True).stdout
    assert "R_X86_64_TLSDESC" in relocs, relocs   # the SDK's access: a TLS descriptor
    return tmp_path / "otep_app"


@pytest.mark.parametrize("tls", ["static", "dynamic", "started_later"])
def test_samples_link_to_the_thread_context_record_the_thread_publishes(
        bpf_ok: None, collector: Collector, tmp_path: Path, pin_dir: Path, tls: str) -> None:
    """static: the library is linked (static TLS: tp - l_tls_offset + value); dynamic: it is
    dlopen'ed with glibc's optional static TLS at 0 (the thread's DTV entry + value);
    started_later: linked, the program starts after the agent, which filters by process name (the
    walker looks at every process, and at this one when the profiler first samples it)."""
    dynamic, late = tls == "dynamic", tls == "started_later"
    app = _build(tmp_path, dynamic)
    env = dict(os.environ, GLIBC_TUNABLES="glibc.rtld.optional_static_tls=0") if dynamic else None

    def start() -> subprocess.Popen[str]:
        p = subprocess.Popen([str(app), TRACE, SPAN, str(tmp_path / "libotelctx.so")], stdout=subprocess.PIPE,
                             text=True, env=env)
        assert p.stdout is not None
        json.loads(p.stdout.readline())
        return p

    proc = None if late else start()
    try:
        filt = {"process_names": ["otep_app"]} if proc is None else {"pids": [proc.pid]}
        cfg = {"profiler": {"preset": "debug", "report_interval": "2s", "filter": filt,
                            "thread_ctx_read": True, "java_frames": False,
                            "off_cpu": {"enabled": True, "sample_probability": 1.0}}}
        agent = Agent(tmp_path, agent_config(collector, cfg, bpf={"pin_path": str(pin_dir)})).start(timeout=300)
        try:
            if proc is None:
                proc = start()

            def enough() -> bool:
                samples = _linked_samples(collector)

                def n(fn: str, kind: str) -> int:
                    return sum(v for k, names, v, _ in samples if k == kind and fn in names)
                return (all(n(fn, "samples") >= 100 for fn in ("otep_linked_work", "otep_unlinked_work",
                                                               "otep_invalid_work"))
                        and n("otep_sleeping_work", "off_cpu") > 0)

            wait_until(enough, 180, 0.5, "100 CPU samples of each burning thread and the sleeper's off-CPU time")
            linked_counter = agent.metric_value("ebpf_receiver_profiler_request_links_total",
                                                reason="thread_ctx_linked")
            no_db = agent.metric_value("ebpf_receiver_profiler_request_links_total", reason="thread_ctx_no_thread_db")
            # the main thread and the unlinked one never touch the variable: with dynamic TLS they
            # have no block yet (the walker went through the DTV), with static TLS they do
            unallocated = agent.metric_value("ebpf_receiver_profiler_request_links_total",
                                             reason="thread_ctx_tls_unallocated")
        finally:
            assert agent.stop() == 0
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    samples = _linked_samples(collector)
    linked = [(n, lk) for kind, names, n, lk in samples if kind == "samples" and "otep_linked_work" in names]
    total = sum(n for n, _ in linked)
    hits = sum(n for n, lk in linked if lk == (TRACE, SPAN))
    assert total and hits >= 0.9 * total, (hits, total, {lk for _, lk in linked})
    slept = [(n, lk) for kind, names, n, lk in samples if kind == "off_cpu" and "otep_sleeping_work" in names]
    assert slept and sum(n for n, lk in slept if lk == (TRACE, SPAN)) >= 0.9 * sum(n for n, _ in slept), slept
    for fn in ("otep_unlinked_work", "otep_invalid_work"):   # no record; a record with valid == 0
        other = [lk for kind, names, _, lk in samples if fn in names]
        assert other and all(lk is None for lk in other), (fn, {lk for lk in other if lk})
    assert linked_counter >= hits / 2 and no_db == 0   # the kernel counted what it linked
    assert unallocated == (2 if dynamic else 0)
