// System calls: per-syscall counts, errors (by errno) and log2 latency histograms aggregated in
// per-CPU maps; per-process series only for processes the filter (in maps) selects; calls slower
// than SLOW_THRESHOLD_NS go to a ring buffer. Reads only raw_syscalls tracepoint fields.
#include "syscalls.h"

#ifndef SLOW_THRESHOLD_NS
#define SLOW_THRESHOLD_NS 10000000ULL
#endif
#ifndef SLOW_SPANS
#define SLOW_SPANS 1
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 65536
#endif
#ifndef MAX_SERIES
#define MAX_SERIES 2000
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 64
#endif

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost, u64, SC_LOST_REASONS);
BPF_TABLE("lru_hash", u32, struct sc_start, start, MAX_THREADS);   /* tid → call in flight */
BPF_PERCPU_HASH(calls, struct sc_key, struct sc_stat, MAX_SERIES * 8);
BPF_PERCPU_HASH(errors, struct sc_err_key, u64, MAX_SERIES * 8);
BPF_PERCPU_HASH(hist, struct sc_hist_key, u64, MAX_SERIES * 32);
/* Filter, filled from user space: settings[0] = 1 when a filter is active. */
BPF_ARRAY(settings, u32, 1);
BPF_HASH(filter_pids, u32, u8, 1024);
BPF_HASH(filter_comms, struct sc_comm_key, u8, 1024);
BPF_HASH(filter_cgroups, u64, u8, 1024);

static __always_inline void count_lost(int reason) {
    u64 *n = lost.lookup(&reason);
    if (n)
        (*n)++;
}

static __always_inline u32 log2_u64(u64 v) {
    u32 r = 0;
    #pragma unroll
    for (int s = 32; s > 0; s >>= 1) {
        if (v >> s) {
            v >>= s;
            r += s;
        }
    }
    return r;
}

static __always_inline u32 selected(u32 tgid) {
    u32 zero = 0;
    u32 *active = settings.lookup(&zero);
    if (!active || !*active)
        return 0;
    if (filter_pids.lookup(&tgid))
        return 1;
    struct sc_comm_key c = {};
    bpf_get_current_comm(&c.comm, sizeof(c.comm));
    if (filter_comms.lookup(&c))
        return 1;
    u64 cg = bpf_get_current_cgroup_id();
    if (filter_cgroups.lookup(&cg))
        return 1;
    return 0;
}

static __always_inline void account(u32 tgid, u32 nr, u64 d, long ret, u32 slot) {
    struct sc_key k = {.tgid = tgid, .nr = nr};
    struct sc_stat zero = {};
    struct sc_stat *s = calls.lookup_or_try_init(&k, &zero);
    if (!s) {
        count_lost(SC_LOST_SERIES_MAP_FULL);
        return;
    }
    s->count++;
    s->sum_ns += d;
    if (s->min_ns == 0 || d < s->min_ns)
        s->min_ns = d ? d : 1;
    if (d > s->max_ns)
        s->max_ns = d;
    struct sc_hist_key hk = {.tgid = tgid, .nr = nr, .slot = slot};
    u64 z = 0;
    u64 *h = hist.lookup_or_try_init(&hk, &z);
    if (h)
        (*h)++;
    else
        count_lost(SC_LOST_SERIES_MAP_FULL);
    if (ret < 0) {
        struct sc_err_key ek = {.tgid = tgid, .nr = nr, .err = (u32)(-ret)};
        u64 *e = errors.lookup_or_try_init(&ek, &z);
        if (e)
            (*e)++;
        else
            count_lost(SC_LOST_SERIES_MAP_FULL);
    }
}

TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
    long id = args->id;
    if (id < 0)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct sc_start st = {.ts = bpf_ktime_get_ns(), .nr = (u32)id, .selected = selected(pid_tgid >> 32)};
    if (start.update(&tid, &st))
        count_lost(SC_LOST_START_MAP_FULL);
    return 0;
}

TRACEPOINT_PROBE(raw_syscalls, sys_exit) {
    u64 now = bpf_ktime_get_ns();
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    u32 tgid = pid_tgid >> 32;
    struct sc_start *st = start.lookup(&tid);
    if (!st)
        return 0;   /* entered before we attached */
    u64 ts = st->ts;
    u32 nr = st->nr;
    u32 sel = st->selected;
    start.delete(&tid);
    if ((long)nr != args->id)
        return 0;   /* e.g. a call that never returned (exec'd-over) paired with a later exit */
    u64 d = now > ts ? now - ts : 0;
    long ret = args->ret;
    u32 slot = d ? log2_u64(d) : 0;
    account(0, nr, d, ret, slot);
    if (sel)
        account(tgid, nr, d, ret, slot);
#if SLOW_SPANS
    if (d > SLOW_THRESHOLD_NS) {
        struct sc_slow_event *e = events.ringbuf_reserve(sizeof(struct sc_slow_event));
        if (!e) {
            count_lost(SC_LOST_RINGBUF_FULL);
            return 0;
        }
        e->start_ns = ts;
        e->end_ns = now;
        e->ret = ret;
        e->pid = tgid;
        e->tid = tid;
        e->nr = nr;
        e->pad = 0;
        bpf_get_current_comm(&e->comm, sizeof(e->comm));
        events.ringbuf_submit(e, 0);
    }
#endif
    return 0;
}
