// CPU profiler: a software cpu-clock perf event on every CPU runs on_cpu_sample at the configured
// frequency. Each non-idle sample of a selected process is counted in the kernel per unique
// (pid, tid, comm, cgroup, user stack, kernel stack). This file holds sampling, counting and the
// dispatch to the walkers: the native walker is profiler_native.bpf.h, and each runtime's walker
// (receiver/profiling/runtimes/) is a runtimes/<name>.bpf.h inlined at RUNTIME WALKERS below.
//
// Two generations: counts0/stacks0 and counts1/stacks1. settings[PROF_SET_GENERATION] says which
// one the program writes; user space flips it, waits for programs in flight, then reads and
// clears the other one. A generation's stack ids point only into its own stack map, so freeing
// a drained stack map can never pull a stack from under a key that is still being counted, and
// no stack id is ever reused for a different stack (no BPF_F_REUSE_STACKID, which would silently
// re-point earlier keys at the newer stack).
//
// A sample the maps cannot take (-EEXIST: a different stack holds its hash bucket; -ENOMEM: the
// stack map is full; or the counts map is full) is sent whole over the ring buffer instead, both
// stacks copied with bpf_get_stack, so it is neither lost nor attributed to the wrong stack.
// Only when the ring buffer is full too is it lost, counted by that first reason.
//
// The first sample of a process not seen before sends its pid over the ring buffer so user space
// captures its memory mappings at once (a short-lived process may be gone by the next drain).
//
// User stacks (UNWIND=1): a process with unwind tables loaded is walked by walk_user_stack
// (profiler_native.bpf.h), tail-called from on_cpu_sample; for a process that runs a runtime,
// that runtime's walker is tail-called next (unwind_programs[its slot]) and records its frames
// beside the native ones. A walked sample is counted in walked<g>, keyed like counts<g> with a
// 64-bit hash of the stack in place of a stack id, its value the stack and its count: one
// hash-map operation per sample, where a stack map and a counts map would take two on cold
// buckets. Processes without a table yet keep the kernel's frame-pointer walk (bpf_get_stackid)
// and counts<g>.
//
// The context is struct bpf_perf_event_data of uapi/linux/bpf_perf_event.h, spelled out here:
// that header pulls in linux/ptrace.h and with it linux/sched.h, which took 2.2 of the 6.1 s
// the compile took on the host (and about 40 times as long under qemu's TCG). asm/ptrace.h
// gives the registers (bpf_user_pt_regs_t is struct pt_regs on x86-64) in 0.1 s.
#include <asm/ptrace.h>
struct bpf_perf_event_data {
    struct pt_regs regs;
    __u64 sample_period;
    __u64 addr;
};
#include "profiler.h"
#define N_LOST PROF_N_LOST
#include "common.bpf.h"

#ifndef MAX_KEYS
#define MAX_KEYS 16384
#endif
#ifndef MAX_STACKS
#define MAX_STACKS 16384
#endif
#ifndef MAX_PROCESSES
#define MAX_PROCESSES 8192
#endif
#ifndef USER_STACKS
#define USER_STACKS 1
#endif
#ifndef KERNEL_STACKS
#define KERNEL_STACKS 1
#endif
#ifndef WAKE_EVERY
#define WAKE_EVERY 16
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif
#ifndef UNWIND
#define UNWIND 0
#endif
#if UNWIND && !USER_STACKS         /* nothing to walk */
#undef UNWIND
#define UNWIND 0
#endif
#if !UNWIND && RUNTIME_MAX_FRAMES  /* runtime walkers follow the native walk */
#undef RUNTIME_MAX_FRAMES
#define RUNTIME_MAX_FRAMES 0
#endif
#ifndef UNWIND_ROWS
#define UNWIND_ROWS 1048576
#endif
#ifndef UNWIND_ROW_STEPS            /* ceil(log2(UNWIND_ROWS)) + 1 */
#define UNWIND_ROW_STEPS 21
#endif
#ifndef UNWIND_FRAMES_PER_CALL     /* frames one walk_user_stack call walks before tail-calling itself */
#define UNWIND_FRAMES_PER_CALL 8
#endif
#ifndef UNWIND_PROCESSES
#define UNWIND_PROCESSES 1024
#endif
#ifndef RUNTIME_FRAMES_SEEN       /* (process, frame id) pairs already announced */
#define RUNTIME_FRAMES_SEEN 65536
#endif
#ifndef UNWIND_WINDOW             /* bytes of stack one read brings in (power of two) */
#define UNWIND_WINDOW 1024
#endif
#ifndef OFF_CPU                   /* off-CPU time: on_switch_out and the sched_switch probe */
#define OFF_CPU 0
#endif
#ifndef OFFCPU_THREADS            /* threads off the CPU with their stacks kept (offcpu_start) */
#define OFFCPU_THREADS 4096
#endif
#ifndef OFFCPU_KEYS               /* distinct off-CPU stacks per generation (offcpu<g>) */
#define OFFCPU_KEYS 4096
#endif

_Static_assert(((PROF_MAX_DEPTH + 1) & PROF_MAX_DEPTH) == 0 && PROF_DEPTH_MASK == PROF_MAX_DEPTH,
               "PROF_MAX_DEPTH + 1 must be a power of two");
_Static_assert((RUNTIME_MAX_FRAMES & (RUNTIME_MAX_FRAMES - 1)) == 0, "RUNTIME_MAX_FRAMES must be a power of two");
_Static_assert((1 << (UNWIND_MAPPING_STEPS - 1)) >= UNWIND_MAX_MAPPINGS, "UNWIND_MAPPING_STEPS too few");

#define EEXIST_ 17
#define ENOMEM_ 12
#define EFAULT_ 14

BPF_ARRAY(settings, u32, PROF_SETTINGS);
#if REQ_LINKS
/* Thread id -> span id of the request it serves, written by bpf/http.bpf.c through the same pin
 * (receiver/profiling/links.py): samples of different requests are different keys. */
BPF_TABLE_PINNED("hash", u32, u64, req_links, REQ_LINKS_MAX, REQ_LINKS_PIN);
#endif
#if TRACES_CTX
/* OBI's trace context (docs/profiler.md#request-links): pid_tgid -> the trace and span its thread
 * serves, written by OBI (or our http program); link_traces: span id -> trace id of the entries
 * samples were linked to, read by user space (receiver/profiling/links.py trace_of). */
struct traces_ctx_v1 { u8 trace_id[16]; u8 span_id[8]; };
BPF_TABLE_PINNED("lru_hash", u64, struct traces_ctx_v1, traces_ctx_v1, TRACES_CTX_MAX, TRACES_CTX_PIN);
#endif
#if TRACES_CTX || THREAD_CTX
struct link_trace { u8 trace_id[16]; };
BPF_TABLE_PINNED("lru_hash", u64, struct link_trace, link_traces, LINK_TRACES_MAX, LINK_TRACES_PIN);
static __always_inline void link_trace_keep(u64 span, const u8 *trace_id) {
    if (span && !link_traces.lookup(&span)) {
        struct link_trace t;
        __builtin_memcpy(t.trace_id, trace_id, 16);
        link_traces.update(&span, &t);
    }
}
#endif
#if THREAD_CTX
/* OTEP 4947 (docs/profiler.md#request-links): pid_tgid -> the address of the thread's
 * otel_thread_ctx_v1 TLS slot, found and kept by user space (receiver/profiling/thread_ctx.py);
 * the slot holds a pointer to the SDK's record. thread_ctx_stats: linked, unreadable (slot or
 * record not readable now), invalid (valid neither 0 nor 1). */
struct otel_thread_ctx_v1 { u8 trace_id[16]; u8 span_id[8]; u8 valid; u8 reserved; u16 attrs_data_size; };
BPF_TABLE_PINNED("hash", u64, u64, thread_ctx_slots, THREAD_CTX_MAX, THREAD_CTX_PIN);
BPF_TABLE_PINNED("array", u32, u64, thread_ctx_stats, 3, THREAD_CTX_STATS_PIN);
static __always_inline void thread_ctx_count(u32 reason) {
    u64 *n = thread_ctx_stats.lookup(&reason);
    if (n)
        __sync_fetch_and_add(n, 1);
}
static __always_inline u64 thread_ctx_link(u64 pid_tgid) {
    u64 *slot = thread_ctx_slots.lookup(&pid_tgid);
    u64 rec = 0, span = 0;
    struct otel_thread_ctx_v1 r;
    if (!slot)
        return 0;
    if (bpf_probe_read_user(&rec, sizeof(rec), (void *)*slot)) {
        thread_ctx_count(1);
        return 0;
    }
    if (!rec)
        return 0;
    if (bpf_probe_read_user(&r, sizeof(r), (void *)rec)) {
        thread_ctx_count(1);
        return 0;
    }
    if (r.valid != 1) {
        if (r.valid)
            thread_ctx_count(2);
        return 0;
    }
    __builtin_memcpy(&span, r.span_id, 8);
    if (span) {
        link_trace_keep(span, r.trace_id);
        thread_ctx_count(0);
    }
    return span;
}
#endif
/* The span id a sample of this thread links to: the request of ours it serves, else OBI's
 * traces_ctx_v1 entry for it, else its OTEP 4947 thread context record; 0 none. */
static __always_inline u64 request_link(u64 pid_tgid) {
    u64 span = 0;
#if REQ_LINKS
    u32 tid = (u32)pid_tgid;
    u64 *ours = req_links.lookup(&tid);
    if (ours)
        return *ours;
#endif
#if TRACES_CTX
    struct traces_ctx_v1 *ctx = traces_ctx_v1.lookup(&pid_tgid);
    if (ctx) {
        __builtin_memcpy(&span, ctx->span_id, 8);
        link_trace_keep(span, ctx->trace_id);
    }
#endif
#if THREAD_CTX
    if (!span)
        span = thread_ctx_link(pid_tgid);
#endif
    return span;
}
BPF_HASH(counts0, struct prof_key, u64, MAX_KEYS);
BPF_HASH(counts1, struct prof_key, u64, MAX_KEYS);
BPF_STACK_TRACE(stacks0, MAX_STACKS);
BPF_STACK_TRACE(stacks1, MAX_STACKS);
BPF_PERCPU_ARRAY(stats, u64, PROF_STATS);
BPF_TABLE("lru_hash", u32, u8, seen_processes, MAX_PROCESSES);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
MIRROR(prof_sample);
MIRROR(prof_new_process);

/* Hides a value's range from the compiler, so the mask that follows stays in the program: the
 * compiler drops "i & 127" where it knows i < 127 and walks a pointer instead, whose bound
 * older verifiers (6.1) then cannot prove. */
#define barrier_var(v) asm volatile("" : "+r"(v))

static __always_inline void count_stat(int slot) {
    u64 *n = stats.lookup(&slot);
    if (n)
        (*n)++;
}

/* The stack map refused the stack (-EEXIST or -ENOMEM; -EFAULT just means "no stack of
 * this kind here"). */
static __always_inline int refused(s32 err) {
    return err == -EEXIST_ || err == -ENOMEM_;
}

static __always_inline int stack_lost_reason(s32 err) {
    return err == -EEXIST_ ? PROF_LOST_STACK_COLLISION : PROF_LOST_STACK_MAP_FULL;
}

/* Sends the whole sample over the ring buffer; counts it lost by ``reason`` if that is full. */
static __always_inline void record_whole(struct bpf_perf_event_data *ctx, struct prof_key *key, int reason,
                                         struct unwind_stack *walked) {
    struct prof_sample *e = events.ringbuf_reserve(sizeof(struct prof_sample));
    if (!e) {
        count_lost(reason);
        count_stat(PROF_STAT_DROPPED);
        return;
    }
    e->kind = PROF_REC_SAMPLE;
    e->pid = key->pid;
    e->tid = key->tid;
    e->pad = 0;
    e->cgroup_id = key->cgroup_id;
    __builtin_memcpy(e->comm, key->comm, PROF_COMM_LEN);
    long n = 0;
#if USER_STACKS
    if (walked) {
        __builtin_memcpy(e->user, walked->ips, sizeof(e->user));
        n = (walked->len & PROF_DEPTH_MASK) * 8;
    } else {
        n = bpf_get_stack(ctx, e->user, sizeof(e->user), BPF_F_USER_STACK);
    }
#endif
    e->user_bytes = n > 0 ? n : 0;
    n = 0;
#if KERNEL_STACKS
    n = bpf_get_stack(ctx, e->kernel, sizeof(e->kernel), 0);
#endif
    e->kernel_bytes = n > 0 ? n : 0;
    /* Mostly no wake-up: user space reads these at the next drain (or with the next
     * new-process notice). Every WAKE_EVERY-th record per CPU wakes it, so unread records
     * never fill more than half the buffer. */
    int slot = PROF_STAT_UNWOKEN;
    u64 *unwoken = stats.lookup(&slot);
    u64 flags = BPF_RB_NO_WAKEUP;
    if (unwoken && ++(*unwoken) >= WAKE_EVERY) {
        *unwoken = 0;
        flags = BPF_RB_FORCE_WAKEUP;
    }
    events.ringbuf_submit(e, flags);
    count_stat(PROF_STAT_RECORDED);
}

static __always_inline void notice_process(u32 tgid) {
    if (seen_processes.lookup(&tgid))
        return;
    u8 one = 1;
    seen_processes.update(&tgid, &one);
    struct prof_new_process *e = events.ringbuf_reserve(sizeof(struct prof_new_process));
    if (!e) {
        seen_processes.delete(&tgid);   /* try again on its next sample */
        count_lost(PROF_LOST_RINGBUF_FULL);
        return;
    }
    e->kind = PROF_REC_NEW_PROCESS;
    e->pid = tgid;
    /* Forced: a wake-up on commit is only sent when the consumer has read everything before it,
     * and whole samples are left unread on purpose. The process may exit soon. */
    events.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
}

/* Adds one to key's count: a lookup, and an insert only for a key not counted yet (an insert
 * that loses a race with another CPU adds to the winner's count). Returns 0, or the insert's
 * error (the map is full). Spelled out per map: BCC binds map calls by name, not in macros. */
static __always_inline int add_count(u32 g, struct prof_key *key) {
    u64 *n = g ? counts1.lookup(key) : counts0.lookup(key);
    if (n) {
        __sync_fetch_and_add(n, 1);
        return 0;
    }
    u64 one = 1;
    int err = g ? counts1.insert(key, &one) : counts0.insert(key, &one);
    if (err == -EEXIST_ && (n = g ? counts1.lookup(key) : counts0.lookup(key))) {
        __sync_fetch_and_add(n, 1);
        err = 0;
    }
    return err;
}

/* Counts one sample whose user stack is the kernel's frame-pointer walk. */
static __always_inline void count_sample(struct bpf_perf_event_data *ctx, struct prof_key *key, u32 g) {
    s32 uid = -1, kid = -1;
    /* Sampled in user mode (the ip in the lower half) there is no kernel stack to ask for. */
    int in_kernel = (s64)ctx->regs.ip < 0;
    /* Two spelled-out branches: BCC resolves map method calls by the map's name at compile time,
     * so the generation cannot be a map-pointer variable. */
    if (g) {
#if USER_STACKS
        uid = stacks1.get_stackid(ctx, BPF_F_USER_STACK);
#endif
#if KERNEL_STACKS
        if (in_kernel)
            kid = stacks1.get_stackid(ctx, 0);
#endif
    } else {
#if USER_STACKS
        uid = stacks0.get_stackid(ctx, BPF_F_USER_STACK);
#endif
#if KERNEL_STACKS
        if (in_kernel)
            kid = stacks0.get_stackid(ctx, 0);
#endif
    }
    if (refused(uid) || refused(kid)) {
        record_whole(ctx, key, stack_lost_reason(refused(uid) ? uid : kid), NULL);
        notice_process(key->pid);
        return;
    }
    if (uid == -EFAULT_ && kid < 0)
        count_lost(PROF_LOST_STACK_FAULT);
    key->user_stack_id = uid < 0 ? -1 : uid;
    key->kernel_stack_id = kid < 0 ? -1 : kid;
    if (!add_count(g, key))
        count_stat(PROF_STAT_COUNTED);
    else
        record_whole(ctx, key, PROF_LOST_COUNTS_MAP_FULL, NULL);   /* its stack ids stay unused */
    notice_process(key->pid);
}


/* The one stack hash (never 0: 0 means "no walked stack" in prof_key): a user stack with its
 * runtime frames, and kernel_len addresses of kernel (an off-CPU block's; none for a walked
 * on-CPU sample, whose kernel stack has its own id). */
static __always_inline u64 hash_stacks(struct unwind_stack *u, u64 *kernel, u32 kernel_len) {
    u64 h = 0xcbf29ce484222325ULL ^ u->truncated;
    #pragma clang loop unroll(disable)
    for (u32 i = 0; i < PROF_MAX_DEPTH; i++) {
        if (i >= u->len)
            break;
        u32 at = i;
        barrier_var(at);
        h = (h ^ u->ips[at & PROF_DEPTH_MASK]) * 0x100000001b3ULL;
        h ^= h >> 29;
    }
    if (kernel) {
        h = (h ^ 0x6b) * 0x100000001b3ULL;   /* user | kernel */
        #pragma clang loop unroll(disable)
        for (u32 i = 0; i < PROF_MAX_DEPTH; i++) {
            if (i >= kernel_len)
                break;
            u32 at = i;
            barrier_var(at);
            h = (h ^ kernel[at & PROF_DEPTH_MASK]) * 0x100000001b3ULL;
            h ^= h >> 29;
        }
    }
#if RUNTIME_MAX_FRAMES
    h ^= ((u64)u->rt_truncated << 32 | u->rt_len) ^ (u64)u->rt_runtime << 40;
    #pragma clang loop unroll(disable)
    for (u32 i = 0; i < RUNTIME_MAX_FRAMES; i++) {
        if (i >= u->rt_len)
            break;
        u32 at = i;
        barrier_var(at);
        at &= RUNTIME_MAX_FRAMES - 1;
        h = (h ^ u->rt_id[at]) * 0x100000001b3ULL;
        h = (h ^ u->rt_aux[at]) * 0x100000001b3ULL;
        h ^= h >> 29;
    }
#endif
    return h ? h : 1;
}

#if OFF_CPU
/* ---- Off-CPU time (profiler.h): a thread's stacks taken as it goes off the CPU, the time it
 * stayed off added when it is switched in again ---- */

BPF_TABLE("lru_hash", u32, struct offcpu_start, offcpu_start, OFFCPU_THREADS);
/* Preallocated (OFFCPU_KEYS * 2.9 KiB each): allocating on insert fails under a burst of new
 * stacks (measured: 45 % of the blocks of a ping-pong load lost to -ENOMEM at every switch). */
BPF_HASH(offcpu0, struct prof_key, struct offcpu_value, OFFCPU_KEYS);
BPF_HASH(offcpu1, struct prof_key, struct offcpu_value, OFFCPU_KEYS);
BPF_PERCPU_ARRAY(offcpu_scratch, struct offcpu_start, 1);
BPF_PERCPU_ARRAY(offcpu_stats, u64, OFFCPU_STATS);
MIRROR(offcpu_start);
MIRROR(prof_offcpu_sample);

static __always_inline void count_offcpu(int slot) {
    u64 *n = offcpu_stats.lookup(&slot);
    if (n)
        (*n)++;
}

/* This CPU's record being built: the switching-out thread's key and stacks. */
static __always_inline struct offcpu_start *offcpu_record(void) {
    u32 zero = 0;
    return offcpu_scratch.lookup(&zero);
}

/* A 64-bit hash of the user stack (with its runtime frames) and the kernel stack (never 0). */
static __always_inline u64 hash_offcpu(struct offcpu_value *v) {
    return hash_stacks(&v->user, v->kernel, v->kernel_len);
}

/* Keeps the record (its key and user stack filled) under the thread's id with its kernel stack
 * and the time: the thread is going off the CPU now. */
static __always_inline void offcpu_commit(struct bpf_perf_event_data *ctx, struct offcpu_start *rec) {
    long n = 0;
#if KERNEL_STACKS
    n = bpf_get_stack(ctx, rec->v.kernel, sizeof(rec->v.kernel), 0);
#endif
    rec->v.kernel_len = n > 0 ? (u64)n / 8 : 0;
    rec->v.count = 0;
    rec->v.pad = 0;
    rec->key.user_stack_id = -1;
    rec->key.kernel_stack_id = -1;
    rec->key.user_stack_hash = hash_offcpu(&rec->v);
    rec->v.ns = bpf_ktime_get_ns();
    offcpu_start.update(&rec->key.tid, rec);
    count_offcpu(OFFCPU_STAT_RECORDED);
}
#endif

#if UNWIND
/* ---- The walk: its state between tail calls, and how a walked sample is counted ---- */

BPF_HASH(walked0, struct prof_key, struct unwind_stack, MAX_KEYS);
BPF_HASH(walked1, struct prof_key, struct unwind_stack, MAX_KEYS);
BPF_PERCPU_ARRAY(unwind_scratch, struct unwind_stack, 1);
BPF_PERCPU_ARRAY(unwind_stats, u64, UNWIND_STATS);
/* [UNWIND_NATIVE_SLOT]: walk_user_stack, tail-called until the walk ends; [a runtime's slot]: that
 * runtime's walker, after it */
BPF_PROG_ARRAY(unwind_programs, RUNTIME_SLOTS);
#if RUNTIME_MAX_FRAMES
BPF_HASH(runtime_processes, u32, struct runtime_process, UNWIND_PROCESSES);
MIRROR(prof_runtime_frame);
#endif

static __always_inline void count_unwind(int slot) {
    u64 *n = unwind_stats.lookup(&slot);
    if (n)
        (*n)++;
}

/* Where a walk is between tail calls (one per CPU: a perf-event program never nests on its CPU). */
struct unwind_state {
    u64 ip;
    u64 sp;
    u64 bp;
    u32 n;                     /* frames in the stack so far */
    u32 done;
    u32 g;                     /* generation the sample counts into */
    struct unwind_process proc;
    struct prof_key key;
#if RUNTIME_MAX_FRAMES
    u64 rt_cursor;             /* the runtime walker's position (CPython: next frame); 0: done */
    struct runtime_process rt; /* the process's runtime (rt.runtime 0: none) and its data */
#endif
    u64 win_base;              /* user address of win[0] */
    u32 win_len;               /* bytes of win read (0: none) */
    u32 off_cpu;               /* 1: a switch-out (on_switch_out), kept in offcpu_start, not counted */
    u8 win[UNWIND_WINDOW];     /* the stack from win_base to at most its page's end */
};
BPF_PERCPU_ARRAY(unwind_states, struct unwind_state, 1);

/* This CPU's walk state and walked stack: what every walker program starts from. */
static __always_inline struct unwind_state *walk_state(void) {
    u32 zero = 0;
    return unwind_states.lookup(&zero);
}

static __always_inline struct unwind_stack *walk_stack(void) {
    u32 zero = 0;
    return unwind_scratch.lookup(&zero);
}

/* A 64-bit hash of the walked stack (never 0: 0 means "no walked stack" in prof_key). */
static __always_inline u64 hash_stack(struct unwind_stack *st) {
    return hash_stacks(st, 0, 0);
}
/* add_count for walked<g>: a key not counted yet is inserted with its stack. */
static __always_inline int add_walked(u32 g, struct prof_key *key, struct unwind_stack *st) {
    struct unwind_stack *v = g ? walked1.lookup(key) : walked0.lookup(key);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        return 0;
    }
    st->count = 1;
    int err = g ? walked1.insert(key, st) : walked0.insert(key, st);
    if (err == -EEXIST_ && (v = g ? walked1.lookup(key) : walked0.lookup(key))) {
        __sync_fetch_and_add(&v->count, 1);
        err = 0;
    }
    return err;
}

/* Ends a walk: counts the sample in walked<g> under its key, the stack's hash in place of a
 * user stack id (a walked process has tables, which user space loads only for a process it was
 * told about: nothing to announce). */
static __always_inline void finish_walk(struct bpf_perf_event_data *ctx, struct unwind_state *ws,
                                        struct unwind_stack *st) {
    struct prof_key *key = &ws->key;
    s32 kid = -1;
#if OFF_CPU
    if (ws->off_cpu) {                      /* a switch-out: its stacks kept until it runs again */
        struct offcpu_start *rec = offcpu_record();
        if (rec) {
            bpf_probe_read_kernel(&rec->v.user, sizeof(rec->v.user), st);
            offcpu_commit(ctx, rec);
        }
        return;
    }
#endif
#if KERNEL_STACKS
    if ((s64)ctx->regs.ip < 0)
        kid = ws->g ? stacks1.get_stackid(ctx, 0) : stacks0.get_stackid(ctx, 0);
#endif
    if (refused(kid)) {
        record_whole(ctx, key, stack_lost_reason(kid), st);
        return;
    }
    key->user_stack_id = -1;
    key->kernel_stack_id = kid < 0 ? -1 : kid;
    key->user_stack_hash = hash_stack(st);
    if (!add_walked(ws->g, key, st))
        count_stat(PROF_STAT_COUNTED);
    else   /* full: sent whole (without its runtime frames) */
        record_whole(ctx, key, PROF_LOST_COUNTS_MAP_FULL, st);
}

#if RUNTIME_MAX_FRAMES
/* ---- What runtime walkers share ---- */

struct runtime_frame_key {
    u32 pid;
    u32 runtime;
    u64 id;
};
/* Frame ids already announced to user space (per process); an evicted one is announced again. */
BPF_TABLE("lru_hash", struct runtime_frame_key, u8, runtime_frames_seen, RUNTIME_FRAMES_SEEN);

/* Announces a frame id the first time this process's stacks name it. */
static __always_inline void notice_runtime_frame(struct unwind_state *ws, u64 id) {
    struct runtime_frame_key k = {.pid = ws->key.pid, .runtime = ws->rt.runtime, .id = id};
    if (runtime_frames_seen.lookup(&k))
        return;
    u8 one = 1;
    runtime_frames_seen.update(&k, &one);
    struct prof_runtime_frame *e = events.ringbuf_reserve(sizeof(struct prof_runtime_frame));
    if (!e) {
        runtime_frames_seen.delete(&k);     /* announced with a later sample */
        return;
    }
    e->kind = PROF_REC_RUNTIME_FRAME;
    e->pid = k.pid;
    e->id = id;
    e->runtime = k.runtime;
    e->pad = 0;
    events.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);   /* read now (see notice_process) */
}

/* Appends one runtime frame (and announces its id); -1 when the stack has no room left (then
 * marked truncated). */
static __always_inline int runtime_record(struct unwind_state *ws, struct unwind_stack *st, u64 id, u32 aux) {
    u32 n = st->rt_len;
    if (n >= RUNTIME_MAX_FRAMES) {
        st->rt_truncated = 1;
        return -1;
    }
    st->rt_id[n & (RUNTIME_MAX_FRAMES - 1)] = id;
    st->rt_aux[n & (RUNTIME_MAX_FRAMES - 1)] = aux;
    st->rt_len = n + 1;
    notice_runtime_frame(ws, id);
    return 0;
}

/* Marks the last recorded frame as its group's last (RUNTIME_AUX_LAST). */
static __always_inline void runtime_end_group(struct unwind_stack *st) {
    u32 n = st->rt_len;
    if (n > 0 && n <= RUNTIME_MAX_FRAMES)
        st->rt_aux[(n - 1) & (RUNTIME_MAX_FRAMES - 1)] |= RUNTIME_AUX_LAST;
}

/* Tail-calls the process's runtime walker (again); returns only if that fails (no walker in the
 * slot, or the tail-call limit reached). */
static __always_inline void runtime_continue(struct bpf_perf_event_data *ctx, struct unwind_state *ws) {
    u32 slot = ws->rt.runtime;
    if (slot > UNWIND_NATIVE_SLOT && slot < RUNTIME_SLOTS)
        unwind_programs.call(ctx, slot);
}
#endif

#include "profiler_native.bpf.h"

/* ---- Goroutine labels (receiver/profiling/runtimes/go.py) ----
 * A Go process (user space enters it with its Go version's offsets) keeps the running
 * goroutine's g in R14 while Go code runs (amd64 ABIInternal, Go 1.17+). R14 is trusted only when
 * g->m->curg or g->m->g0 points back at it (in C code R14 is anything); then curg->labels, the
 * address of the goroutine's immutable label set, goes into the sample key. User space reads
 * the set behind it. Only user memory is read. */
struct go_offsets {
    u16 m;                     /* g.m */
    u16 curg;                  /* m.curg */
    u16 g0;                    /* m.g0 */
    u16 labels;                /* g.labels (0: no entry) */
};
BPF_HASH(go_processes, u32, struct go_offsets, UNWIND_PROCESSES);

static __always_inline u64 go_labels_of(struct bpf_perf_event_data *ctx, struct go_offsets *o) {
    u64 g = 0, m = 0, curg = 0, g0 = 0, labels = 0;
    if ((s64)ctx->regs.ip >= 0) {
        g = ctx->regs.r14;
    } else {                                /* in the kernel: R14 as saved at kernel entry */
        struct pt_regs *u = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
        if (!u || bpf_probe_read_kernel(&g, sizeof(g), &u->r14))
            return 0;
    }
    if (!g || bpf_probe_read_user(&m, sizeof(m), (void *)(g + o->m)) || !m ||
        bpf_probe_read_user(&curg, sizeof(curg), (void *)(m + o->curg)))
        return 0;
    if (curg != g && (bpf_probe_read_user(&g0, sizeof(g0), (void *)(m + o->g0)) || g0 != g))
        return 0;                           /* R14 is not this thread's g */
    if (!curg || bpf_probe_read_user(&labels, sizeof(labels), (void *)(curg + o->labels)))
        return 0;
    return labels;
}

/* The last sampled process's unwind_processes (and runtime_processes) entries, per CPU: a CPU runs
 * the same process sample after sample, so two hash lookups per sample are spared (measured: 6 %
 * of the program's time on a steady load, 2.5 % on one where every stack is new). Valid while
 * both table versions are those it was read under. */
struct process_cache {
    u32 pid;                   /* 0: empty (pid 0, the idle task, is never walked) */
    u32 user_version;
    u32 kernel_version;
    u32 walked;                /* an unwind_processes entry: proc */
    struct unwind_process proc;
#if RUNTIME_MAX_FRAMES
    struct runtime_process rt; /* its runtime_processes entry (rt.runtime 0: none) */
#endif
    struct go_offsets go;      /* its go_processes entry (go.labels 0: none) */
};
BPF_PERCPU_ARRAY(process_cache, struct process_cache, 1);

/* Starts a walk of the current thread's user stack when its process has tables: fills the
 * state and scratch stack. Returns 1 then, 0 when its process has none (frame-pointer stack
 * instead), -1 when there is no user stack (a kernel thread). */
static __always_inline int begin_walk(struct bpf_perf_event_data *ctx, struct prof_key *key, u32 g,
                                      struct unwind_state *ws, struct unwind_stack *st) {
    u64 ip, sp, bp;
    /* Sampled in user mode (the ip in the lower half) these are the user registers. Not cs:
     * it is an unsigned long before 6.9 and a u16 in a union since, and a perf-event program
     * may only load whole registers from its context. */
    if ((s64)ctx->regs.ip >= 0) {
        ip = ctx->regs.ip;
        sp = ctx->regs.sp;
        bp = ctx->regs.bp;
    } else {                                /* in the kernel: the registers saved at kernel entry */
        struct pt_regs *u = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
        if (!u)
            return -1;
        if (bpf_probe_read_kernel(&ip, sizeof(ip), &u->ip) || bpf_probe_read_kernel(&sp, sizeof(sp), &u->sp) ||
            bpf_probe_read_kernel(&bp, sizeof(bp), &u->bp))
            return -1;
        if (ip == 0)                        /* a kernel thread */
            return -1;
    }
    u32 zero = 0;
    struct process_cache *pc = process_cache.lookup(&zero);
    if (!pc)
        return 0;
    u32 slot = PROF_SET_TABLES_USER;
    u32 *user = settings.lookup(&slot);
    slot = PROF_SET_TABLES_KERNEL;
    u32 *kernel = settings.lookup(&slot);
    u32 user_version = user ? *user : 0, kernel_version = kernel ? *kernel : 0;
    if (pc->pid != key->pid || pc->user_version != user_version ||
        pc->kernel_version != kernel_version) {
        /* the versions were read first: a change from here on renews them, and the next
         * sample reads the entries again */
        struct unwind_process *proc = unwind_processes.lookup(&key->pid);
        pc->walked = proc != NULL;
        if (proc)
            pc->proc = *proc;
#if RUNTIME_MAX_FRAMES
        struct runtime_process *rt = runtime_processes.lookup(&key->pid);
        if (rt)
            __builtin_memcpy(&pc->rt, rt, sizeof(*rt));
        else
            pc->rt.runtime = 0;
#endif
        struct go_offsets *go = go_processes.lookup(&key->pid);
        if (go)
            pc->go = *go;
        else
            pc->go.labels = 0;
        pc->pid = key->pid;
        pc->user_version = user_version;
        pc->kernel_version = kernel_version;
    }
    if (!pc->walked)
        return 0;
    if (pc->go.labels)
        key->go_labels = go_labels_of(ctx, &pc->go);
    ws->ip = ip;
    ws->sp = sp;
    ws->bp = bp;
    ws->n = 0;
    ws->done = 0;
    ws->win_len = 0;
    ws->off_cpu = 0;
    ws->g = g;
    ws->proc = pc->proc;
    __builtin_memcpy(&ws->key, key, sizeof(*key));
#if RUNTIME_MAX_FRAMES
    __builtin_memcpy(&ws->rt, &pc->rt, sizeof(ws->rt));
#endif
    st->len = 0;
    st->truncated = 1;
#if RUNTIME_MAX_FRAMES
    st->rt_len = 0;
    st->rt_truncated = 0;
    st->rt_runtime = ws->rt.runtime;
    st->rt_pad = 0;
#endif
    return 1;
}

/* Each enabled runtime's runtimes/<name>.bpf.h is inlined in place of the next line (the runtime
 * table in receiver/profiling/runtimes/__init__.py lists them; receiver/kernel/bcc.py inlines). */
/* RUNTIME WALKERS */
#endif /* UNWIND */

int on_cpu_sample(struct bpf_perf_event_data *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (tgid == 0) {
        count_stat(PROF_STAT_IDLE);
        return 0;
    }
    struct prof_key key;
    __builtin_memset(&key, 0, sizeof(key));
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    key.cgroup_id = bpf_get_current_cgroup_id();
#if FILTER_PROCESS   /* known at load: no filter lookups per sample without a filter */
    if (!selected_by(tgid, key.comm, key.cgroup_id)) {
        count_stat(PROF_STAT_FILTERED);
        return 0;
    }
#endif
    key.pid = tgid;
    key.tid = (u32)pid_tgid;
    key.link_span = request_link(pid_tgid);
    u32 gslot = PROF_SET_GENERATION;
    u32 *gen = settings.lookup(&gslot);
    u32 g = gen ? *gen : 0;
#if UNWIND
    struct unwind_state *ws = walk_state();
    struct unwind_stack *st = walk_stack();
    int begun = ws && st ? begin_walk(ctx, &key, g, ws, st) : 0;
    if (begun > 0)
        unwind_programs.call(ctx, UNWIND_NATIVE_SLOT);   /* does not return unless the tail call failed */
    /* No table, or the walker is not loaded yet (a compile-cache hit loads it while the program
     * already samples): the frame-pointer stack, counted as such. */
    if (begun >= 0)
        count_unwind(UNWIND_STAT_NO_TABLE);
#endif
    count_sample(ctx, &key, g);
    return 0;
}

#if OFF_CPU
/* A thread goes off the CPU: the context-switch software event (one per CPU, every switch), in
 * the switching-out thread's context with its kernel registers, so the walk is the on-CPU one.
 * Sampling (settings[PROF_SET_OFFCPU_THRESHOLD]) decides first, before anything is read. */
int on_switch_out(struct bpf_perf_event_data *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (tgid == 0)                          /* the idle task */
        return 0;
    u32 slot = PROF_SET_OFFCPU_THRESHOLD;
    u32 *threshold = settings.lookup(&slot);
    if (threshold && *threshold != 0xffffffff && bpf_get_prandom_u32() > *threshold) {
        count_offcpu(OFFCPU_STAT_UNSAMPLED);
        return 0;
    }
    struct offcpu_start *rec = offcpu_record();
    if (!rec)
        return 0;
    struct prof_key *key = &rec->key;
    __builtin_memset(key, 0, sizeof(*key));
    bpf_get_current_comm(&key->comm, sizeof(key->comm));
    key->cgroup_id = bpf_get_current_cgroup_id();
#if FILTER_PROCESS
    if (!selected_by(tgid, key->comm, key->cgroup_id)) {
        count_offcpu(OFFCPU_STAT_FILTERED);
        return 0;
    }
#endif
    key->pid = tgid;
    key->tid = (u32)pid_tgid;
    key->link_span = request_link(pid_tgid);
#if UNWIND
    struct unwind_state *ws = walk_state();
    struct unwind_stack *st = walk_stack();
    int begun = ws && st ? begin_walk(ctx, key, 0, ws, st) : 0;
    if (begun < 0) {
        count_offcpu(OFFCPU_STAT_NO_USER_STACK);
        return 0;
    }
    if (begun > 0) {
        ws->off_cpu = 1;
        unwind_programs.call(ctx, UNWIND_NATIVE_SLOT);   /* does not return unless the tail call failed */
    }
#endif
    /* the kernel's frame-pointer walk: a process without tables (or no unwinding here) */
    struct unwind_stack *u = &rec->v.user;
    u->count = 0;
    u->truncated = 0;
    u->len = 0;
#if RUNTIME_MAX_FRAMES
    u->rt_len = 0;
    u->rt_truncated = 0;
    u->rt_runtime = 0;
    u->rt_pad = 0;
#endif
#if USER_STACKS
    long n = bpf_get_stack(ctx, u->ips, sizeof(u->ips), BPF_F_USER_STACK);
    if (n <= 0) {                           /* a kernel thread */
        count_offcpu(OFFCPU_STAT_NO_USER_STACK);
        return 0;
    }
    u->len = (u64)n / 8;
#endif
    notice_process(tgid);
    offcpu_commit(ctx, rec);
    return 0;
}

/* A thread is switched in: the time since its switch-out (if one was recorded) is counted under
 * the stacks it left with. Runs in the other (outgoing) thread's context: reads only the map. */
TRACEPOINT_PROBE(sched, sched_switch) {
    u32 tid = args->next_pid;
    if (tid == 0)
        return 0;
    struct offcpu_start *s = offcpu_start.lookup(&tid);
    if (!s)
        return 0;
    u64 ns = bpf_ktime_get_ns() - s->v.ns;
    u32 slot = PROF_SET_OFFCPU_MIN_US;
    u32 *min_us = settings.lookup(&slot);
    if (min_us && ns < (u64)*min_us * 1000) {
        count_offcpu(OFFCPU_STAT_SHORT);
        offcpu_start.delete(&tid);
        return 0;
    }
    slot = PROF_SET_GENERATION;
    u32 *gen = settings.lookup(&slot);
    u32 g = gen ? *gen : 0;
    struct offcpu_value *v = g ? offcpu1.lookup(&s->key) : offcpu0.lookup(&s->key);
    if (!v) {
        s->v.ns = ns;
        s->v.count = 1;
        int err = g ? offcpu1.insert(&s->key, &s->v) : offcpu0.insert(&s->key, &s->v);
        if (!err) {
            count_offcpu(OFFCPU_STAT_COUNTED);
            offcpu_start.delete(&tid);
            return 0;
        }
        if (err == -EEXIST_)                /* another CPU inserted it meanwhile */
            v = g ? offcpu1.lookup(&s->key) : offcpu0.lookup(&s->key);
        if (!v) {                           /* full: sent whole, as record_whole does */
            struct prof_offcpu_sample *e = events.ringbuf_reserve(sizeof(struct prof_offcpu_sample));
            if (!e) {
                count_lost(PROF_LOST_OFFCPU_MAP_FULL);
            } else {
                e->kind = PROF_REC_OFFCPU;
                e->pad = 0;
                bpf_probe_read_kernel(&e->rec, sizeof(e->rec), s);
                int slot = PROF_STAT_UNWOKEN;
                u64 *unwoken = stats.lookup(&slot);
                u64 flags = BPF_RB_NO_WAKEUP;
                if (unwoken && ++(*unwoken) >= WAKE_EVERY) {
                    *unwoken = 0;
                    flags = BPF_RB_FORCE_WAKEUP;
                }
                events.ringbuf_submit(e, flags);
                count_offcpu(OFFCPU_STAT_COUNTED);
            }
            offcpu_start.delete(&tid);
            return 0;
        }
    }
    __sync_fetch_and_add(&v->ns, ns);
    __sync_fetch_and_add(&v->count, 1);
    count_offcpu(OFFCPU_STAT_COUNTED);
    offcpu_start.delete(&tid);
    return 0;
}
#endif

/* Renews the kernel's version of the process tables (see process_cache): an entry is gone. */
static __always_inline void tables_changed(void) {
    u32 slot = PROF_SET_TABLES_KERNEL;
    u32 *v = settings.lookup(&slot);
    if (v)
        __sync_fetch_and_add(v, 1);
}

/* An exec replaces the mappings: the next sample announces the process again (and its old
 * mapping list must not walk the new image). */
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    seen_processes.delete(&tgid);
#if UNWIND
    int gone = unwind_processes.delete(&tgid) == 0;
#if RUNTIME_MAX_FRAMES
    gone |= runtime_processes.delete(&tgid) == 0;
#endif
    if (gone)
        tables_changed();
#endif
    return 0;
}

#if UNWIND
/* A new task never inherits a mapping list left under its id by an exited process (pid reuse
 * before user space forgot it); a thread's id is never a live process's id. */
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 child = args->child_pid;
    int gone = unwind_processes.delete(&child) == 0;
#if RUNTIME_MAX_FRAMES
    gone |= runtime_processes.delete(&child) == 0;
#endif
    if (gone)
        tables_changed();
    return 0;
}
#endif
