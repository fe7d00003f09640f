// CPU profiler: a software cpu-clock perf event on every CPU runs on_cpu_sample at the configured
// frequency. Each non-idle sample of a selected process is counted in the kernel per unique
// (pid, tid, comm, cgroup, user stack, kernel stack).
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
#include <uapi/linux/bpf_perf_event.h>
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

#define EEXIST_ 17
#define ENOMEM_ 12
#define EFAULT_ 14

BPF_ARRAY(settings, u32, PROF_SETTINGS);
BPF_HASH(counts0, struct prof_key, u64, MAX_KEYS);
BPF_HASH(counts1, struct prof_key, u64, MAX_KEYS);
BPF_STACK_TRACE(stacks0, MAX_STACKS);
BPF_STACK_TRACE(stacks1, MAX_STACKS);
BPF_PERCPU_ARRAY(stats, u64, PROF_STATS);
BPF_TABLE("lru_hash", u32, u8, seen_processes, MAX_PROCESSES);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
MIRROR(prof_sample);
MIRROR(prof_new_process);

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
static __always_inline void record_whole(struct bpf_perf_event_data *ctx, struct prof_key *key, int reason) {
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
    n = bpf_get_stack(ctx, e->user, sizeof(e->user), BPF_F_USER_STACK);
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
    events.ringbuf_submit(e, 0);
}

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
    u32 gslot = PROF_SET_GENERATION;
    u32 *gen = settings.lookup(&gslot);
    u32 g = gen ? *gen : 0;
    s32 uid = -1, kid = -1;
    /* Two spelled-out branches: BCC resolves map method calls by the map's name at compile time,
     * so the generation cannot be a map-pointer variable. */
    if (g) {
#if USER_STACKS
        uid = stacks1.get_stackid(ctx, BPF_F_USER_STACK);
#endif
#if KERNEL_STACKS
        kid = stacks1.get_stackid(ctx, 0);
#endif
    } else {
#if USER_STACKS
        uid = stacks0.get_stackid(ctx, BPF_F_USER_STACK);
#endif
#if KERNEL_STACKS
        kid = stacks0.get_stackid(ctx, 0);
#endif
    }
    if (refused(uid) || refused(kid)) {
        record_whole(ctx, &key, stack_lost_reason(refused(uid) ? uid : kid));
        notice_process(tgid);
        return 0;
    }
    if (uid == -EFAULT_ && kid < 0)
        count_lost(PROF_LOST_STACK_FAULT);
    key.user_stack_id = uid < 0 ? -1 : uid;
    key.kernel_stack_id = kid < 0 ? -1 : kid;

    u64 init = 0;
    u64 *n = g ? counts1.lookup_or_try_init(&key, &init) : counts0.lookup_or_try_init(&key, &init);
    if (n) {
        __sync_fetch_and_add(n, 1);
        count_stat(PROF_STAT_COUNTED);
    } else {
        record_whole(ctx, &key, PROF_LOST_COUNTS_MAP_FULL);   /* its stack ids stay unused */
    }
    notice_process(tgid);
    return 0;
}

/* An exec replaces the mappings: the next sample announces the process again. */
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    seen_processes.delete(&tgid);
    return 0;
}
