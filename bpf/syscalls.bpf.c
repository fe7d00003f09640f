// System calls: per-syscall counts, errors (by errno) and log2 latency histograms aggregated in
// per-CPU maps; per-process series only for processes the filter (in maps) selects; calls slower
// than SLOW_THRESHOLD_NS go to a ring buffer. Reads only the raw_syscalls raw tracepoint
// arguments (sys_enter: args[1] = id; sys_exit: args[1] = return value) and BPF helpers; the
// sched_switch program reads no arguments (the thread switched out is still current there).
#include "syscalls.h"
#define N_LOST SC_N_LOST
#include "common.bpf.h"

#ifndef SLOW_THRESHOLD_NS
#define SLOW_THRESHOLD_NS 10000000ULL
#endif
#ifndef SLOW_SPANS
#define SLOW_SPANS 1
#endif
#ifndef MAX_SERIES
#define MAX_SERIES 2000
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 64
#endif
/* HAVE_TASK_STORAGE 0: kernels before 5.11 (no task local storage, no bpf_get_current_task_btf);
 * the source decides from receiver/kernel_features.py. */
#ifndef HAVE_TASK_STORAGE
#define HAVE_TASK_STORAGE 1
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 32768
#endif

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
/* The call in flight is kept per CPU while its thread runs: most calls return without the
 * thread being switched out, so they cost a per-CPU slot and no task-storage lookup. When the
 * thread is switched out (it blocks or is preempted) sched_switch moves the call to the thread's
 * own storage, which follows it to any CPU (freed with the task). */
BPF_PERCPU_ARRAY(inflight, struct sc_inflight, 1);
#if HAVE_TASK_STORAGE
BPF_TASK_STORAGE(start, struct sc_start);
#else   /* kernel-compat: a hash by thread id, bounded; entries go at sys_exit or thread exit */
BPF_HASH(start, u32, struct sc_start, MAX_THREADS);
#endif
/* Host-wide series (tgid 0) for nr < SC_MAX_NR. */
BPF_PERCPU_ARRAY(all_calls, struct sc_all, SC_MAX_NR);
/* Per-process series, and host-wide ones for nr >= SC_MAX_NR. */
BPF_PERCPU_HASH(calls, struct sc_key, struct sc_stat, MAX_SERIES * 8);
BPF_PERCPU_HASH(errors, struct sc_err_key, u64, MAX_SERIES * 8);
BPF_PERCPU_HASH(hist, struct sc_hist_key, u64, MAX_SERIES * 32);
/* tgid → comm of a selected process, taken at its first counted call: names its series even
 * when it is gone from /proc by the time they are read. */
BPF_HASH(series_comm, u32, struct filter_comm_key, MAX_SERIES);
#if FILTER_PROCESS
/* Bumped whenever a filter decision may have changed: a comm change (exec, prctl, /proc),
 * a cgroup move, the filter maps filled from user space. Cached decisions of an older
 * generation are taken again. */
BPF_ARRAY(sel_gen, u64, 1);
#endif
/* slow_skip[nr] = 1: no span for slow calls of this syscall (filled from user space). */
BPF_ARRAY(slow_skip, u8, SC_MAX_NR);
MIRROR(sc_slow_event);

static __always_inline void count_error(u32 tgid, u32 nr, long ret) {
    struct sc_err_key ek = {.tgid = tgid, .nr = nr, .err = (u32)(-ret)};
    u64 z = 0;
    u64 *e = errors.lookup_or_try_init(&ek, &z);
    if (e)
        (*e)++;
    else
        count_lost(SC_LOST_SERIES_MAP_FULL);
}

/* count/sum/min/max of one series (struct sc_stat or struct sc_all); min 0 means "none yet". */
#define UPDATE_STAT(s, d) do {                        \
        (s)->count++;                                 \
        (s)->sum_ns += (d);                           \
        if ((s)->min_ns == 0 || (d) < (s)->min_ns)    \
            (s)->min_ns = (d) ? (d) : 1;              \
        if ((d) > (s)->max_ns)                        \
            (s)->max_ns = (d);                        \
    } while (0)

static __always_inline void account(u32 tgid, u32 nr, u64 d, long ret, u32 slot) {
    if (tgid && !series_comm.lookup(&tgid)) {
        struct filter_comm_key c = {};
        bpf_get_current_comm(&c.comm, sizeof(c.comm));
        series_comm.update(&tgid, &c);   /* full: the series goes out with /proc's name only */
    }
    struct sc_key k = {.tgid = tgid, .nr = nr};
    struct sc_stat zero = {};
    struct sc_stat *s = calls.lookup_or_try_init(&k, &zero);
    if (!s) {
        count_lost(SC_LOST_SERIES_MAP_FULL);
        return;
    }
    UPDATE_STAT(s, d);
    struct sc_hist_key hk = {.tgid = tgid, .nr = nr, .slot = slot};
    u64 z = 0;
    u64 *h = hist.lookup_or_try_init(&hk, &z);
    if (h)
        (*h)++;
    else
        count_lost(SC_LOST_SERIES_MAP_FULL);
    if (ret < 0)
        count_error(tgid, nr, ret);
}

static __always_inline void account_all(u32 nr, u64 d, long ret, u32 slot) {
    if (nr >= SC_MAX_NR) {
        account(0, nr, d, ret, slot);
        return;
    }
    u32 idx = nr;
    struct sc_all *s = all_calls.lookup(&idx);
    if (!s)
        return;
    UPDATE_STAT(s, d);
    s->slots[slot & (SC_MAX_SLOTS - 1)]++;
    if (ret < 0)
        count_error(0, nr, ret);
}

/* Runs in the thread being switched out (current is still prev): a call it has in flight on
 * this CPU moves to its task storage. Every thread leaves a CPU through here, so a slot with a
 * start is always the current thread's own call: sys_enter and sys_exit need not read the
 * thread id. BCC attaches programs in name order, sched_switch before sys_enter, so no slot
 * set by one thread is found by another (at stop the maps are read before detaching). */
RAW_TRACEPOINT_PROBE(sched_switch) {
    u32 zero = 0;
    struct sc_inflight *f = inflight.lookup(&zero);
    if (!f)
        return 0;
#if FILTER_PROCESS
    f->sel_key = 0;   /* the next thread here is filtered afresh */
#endif
    if (!f->ts)
        return 0;
    u64 ts = f->ts;
    f->ts = 0;
#if HAVE_TASK_STORAGE   /* a thread that dies in its call (exit_group) frees this with itself */
    struct sc_start *st = start.task_storage_get(bpf_get_current_task_btf(), 0,
                                                 BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!st) {
        count_lost(SC_LOST_START_MAP_FULL);
        return 0;
    }
    st->ts = ts;
    st->nr = f->nr;
    st->selected = f->selected;
#else   /* kernel-compat */
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct sc_start v = {.ts = ts, .nr = f->nr, .selected = f->selected};
    if (start.update(&tid, &v))
        count_lost(SC_LOST_START_MAP_FULL);
#endif
    return 0;
}

/* The hot path: one per-CPU slot, one time read; no thread id (see sched_switch). */
RAW_TRACEPOINT_PROBE(sys_enter) {
    long id = (long)ctx->args[1];
    if (id < 0)
        return 0;
    u32 zero = 0;
    struct sc_inflight *f = inflight.lookup(&zero);
    if (!f)
        return 0;
#if FILTER_PROCESS   /* known at load: no map lookup per call without a filter */
    u64 *gen = sel_gen.lookup(&zero);
    u64 key = gen ? *gen + 1 : 0;   /* read before deciding: a bump meanwhile re-decides */
    if (!key || f->sel_key != key) {
        f->selected = selected_current(bpf_get_current_pid_tgid() >> 32);
        f->sel_key = key;
    }
#endif
    f->nr = (u32)id;
    f->ts = bpf_ktime_get_ns();
    return 0;
}

#if FILTER_PROCESS
static __always_inline void selection_may_change(void) {
    u32 zero = 0;
    u64 *gen = sel_gen.lookup(&zero);
    if (gen)
        __sync_fetch_and_add(gen, 1);
}

/* Fires before the new comm is copied in: a thread entering a call on another CPU in between
 * could cache its old name's decision until it is switched out (a /proc/PID/comm write by
 * another process; a thread renaming itself or exec'ing is in that call then). */
RAW_TRACEPOINT_PROBE(task_rename) {
    selection_may_change();
    return 0;
}

RAW_TRACEPOINT_PROBE(cgroup_attach_task) {   /* after the move */
    selection_may_change();
    return 0;
}
#endif

#if !HAVE_TASK_STORAGE   /* kernel-compat: a thread that dies inside a call frees its entry */
RAW_TRACEPOINT_PROBE(sched_process_exit) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    start.delete(&tid);
    u32 zero = 0;   /* and its exit_group in flight here, which its last switch would move */
    struct sc_inflight *f = inflight.lookup(&zero);
    if (f)
        f->ts = 0;
    return 0;
}
#endif

RAW_TRACEPOINT_PROBE(sys_exit) {
    u64 now = bpf_ktime_get_ns();
    u32 zero = 0;
    struct sc_inflight *f = inflight.lookup(&zero);
    if (!f)
        return 0;
    u64 ts;
    u32 nr, sel;
    if (f->ts) {   /* the thread stayed on this CPU: the fast path */
        ts = f->ts;
        nr = f->nr;
        sel = f->selected;
        f->ts = 0;
    } else {
#if HAVE_TASK_STORAGE
        struct sc_start *st = start.task_storage_get(bpf_get_current_task_btf(), 0, 0);
#else   /* kernel-compat */
        u32 tid = (u32)bpf_get_current_pid_tgid();
        struct sc_start *st = start.lookup(&tid);
#endif
        if (!st || !st->ts)
            return 0;   /* entered before we attached, or a new task's first return (fork) */
        ts = st->ts;
        nr = st->nr;
        sel = st->selected;
        st->ts = 0;
#if !HAVE_TASK_STORAGE
        start.delete(&tid);
#endif
    }
    u64 d = now > ts ? now - ts : 0;
    long ret = (long)ctx->args[1];
    u32 slot = d ? log2_u64(d) : 0;
    account_all(nr, d, ret, slot);
    if (sel)
        account(bpf_get_current_pid_tgid() >> 32, nr, d, ret, slot);
#if SLOW_SPANS
    if (d > SLOW_THRESHOLD_NS) {
        u32 skip_idx = nr;
        u8 *skip = slow_skip.lookup(&skip_idx);
        if (skip && *skip)
            return 0;
        struct sc_slow_event *e = events.ringbuf_reserve(sizeof(struct sc_slow_event));
        if (!e) {
            count_lost(SC_LOST_RINGBUF_FULL);
            return 0;
        }
        e->start_ns = ts;
        e->end_ns = now;
        e->ret = ret;
        u64 pid_tgid = bpf_get_current_pid_tgid();
        e->pid = pid_tgid >> 32;
        e->tid = (u32)pid_tgid;
        e->nr = nr;
        e->pad = 0;
        bpf_get_current_comm(&e->comm, sizeof(e->comm));
        events.ringbuf_submit(e, 0);
    }
#endif
    return 0;
}
