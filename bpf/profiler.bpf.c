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
//
// User stacks (UNWIND=1): a process whose mappings user space has loaded into unwind_processes
// is walked here with the unwind tables of its files (rows from .eh_frame, see profiler.h):
// CFA from rsp or rbp plus an offset, the return address at CFA-8, rbp restored where saved.
// That needs no frame pointers, and names a leaf's caller. A mapping without a table (JIT code)
// is stepped with frame pointers; a walk that leaves the mappings, meets a rule it cannot follow
// or cannot read the stack stops there and marks the stack truncated (never a guessed frame).
// The stack is read in windows of up to UNWIND_WINDOW bytes, each ending at most at its page's end
// (a read crossing into an unmapped page would fail whole): one read serves the frames in it.
// The walk is bounded by PROF_MAX_DEPTH frames, each a binary search over at most
// UNWIND_MAX_MAPPINGS mappings (7 steps) and over the file's rows (UNWIND_ROW_STEPS steps),
// UNWIND_FRAMES_PER_CALL frames per program run, chained by tail calls.
// A walked sample is counted in walked<g>, keyed like counts<g> with a 64-bit hash of the stack
// in place of a stack id, its value the stack and its count: one hash-map operation per sample,
// where a stack map and a counts map would take two on cold buckets. Processes without a table
// yet keep the kernel's frame-pointer walk (bpf_get_stackid) and counts<g>.
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
#ifndef UNWIND
#define UNWIND 0
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
#ifndef PY_CODES_SEEN             /* (process, code object) pairs already announced */
#define PY_CODES_SEEN 65536
#endif

#ifndef UNWIND_WINDOW             /* bytes of stack one read brings in (power of two) */
#define UNWIND_WINDOW 1024
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

#if UNWIND
BPF_ARRAY(unwind_rows, struct unwind_row, UNWIND_ROWS);
BPF_HASH(unwind_processes, u32, struct unwind_process, UNWIND_PROCESSES);
BPF_ARRAY(unwind_mappings, struct unwind_mapping, UNWIND_PROCESSES * UNWIND_MAX_MAPPINGS);
BPF_HASH(walked0, struct prof_key, struct unwind_stack, MAX_KEYS);
BPF_HASH(walked1, struct prof_key, struct unwind_stack, MAX_KEYS);
BPF_PERCPU_ARRAY(unwind_scratch, struct unwind_stack, 1);
BPF_PERCPU_ARRAY(unwind_stats, u64, UNWIND_STATS);
#if PY_MAX_FRAMES
BPF_HASH(py_processes, u32, struct py_process, UNWIND_PROCESSES);
#endif

/* Hides a value's range from the compiler, so the mask that follows stays in the program: the
 * compiler drops "i & 127" where it knows i < 127 and walks a pointer instead, whose bound
 * older verifiers (6.1) then cannot prove. */
#define barrier_var(v) asm volatile("" : "+r"(v))

static __always_inline void count_unwind(int slot) {
    u64 *n = unwind_stats.lookup(&slot);
    if (n)
        (*n)++;
}

/* The mapping holding addr, or NULL. find_mapping and find_row are the same binary search over
 * two maps: BCC binds map.lookup() to a map by name at compile time and refuses map calls in
 * macros, so it is spelled out twice. */
static __always_inline struct unwind_mapping *find_mapping(struct unwind_process *proc, u64 addr) {
    u32 count = proc->count < UNWIND_MAX_MAPPINGS ? proc->count : UNWIND_MAX_MAPPINGS;
    u32 first = proc->slot * UNWIND_MAX_MAPPINGS;
    u32 lo = first, hi = first + count;
    #pragma clang loop unroll(disable)
    for (int step = 0; step < 7; step++) {   /* 2^6 = UNWIND_MAX_MAPPINGS */
        if (lo >= hi)
            break;
        u32 mid = lo + (hi - lo) / 2;
        struct unwind_mapping *m = unwind_mappings.lookup(&mid);
        if (!m)
            return NULL;
        if (m->start <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == first)
        return NULL;
    u32 at = lo - 1;
    struct unwind_mapping *m = unwind_mappings.lookup(&at);
    return m && addr < m->end ? m : NULL;
}

/* The row covering pc among rows [first, first+len), or NULL. */
static __always_inline struct unwind_row *find_row(u32 first, u32 len, u64 pc) {
    u32 lo = first, hi = first + len;
    #pragma clang loop unroll(disable)
    for (int step = 0; step < UNWIND_ROW_STEPS; step++) {
        if (lo >= hi)
            break;
        u32 mid = lo + (hi - lo) / 2;
        struct unwind_row *r = unwind_rows.lookup(&mid);
        if (!r)
            return NULL;
        if (r->pc <= pc)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == first)
        return NULL;
    u32 at = lo - 1;
    return unwind_rows.lookup(&at);
}

BPF_PERCPU_ARRAY(unwind_cache, struct unwind_cache_entry, UNWIND_CACHE_SIZE);

/* The rule for the address at (a sampled pc, or a return address - 1) in the walked process:
 * its kind (UNWIND_* or UNWIND_RULE_*) and offsets, from the per-CPU cache or the searches. */
static __always_inline u8 find_rule(struct unwind_process *proc, u64 at, s32 *cfa_offset, s16 *rbp_offset) {
    u32 idx = (u32)(at ^ (at >> 17) ^ (u64)proc->epoch * 0x9e3779b1ULL) & (UNWIND_CACHE_SIZE - 1);
    struct unwind_cache_entry *c = unwind_cache.lookup(&idx);
    if (c && c->pc == at && c->epoch == proc->epoch) {
        *cfa_offset = c->cfa_offset;
        *rbp_offset = c->rbp_offset;
        return c->kind;
    }
    count_unwind(UNWIND_STAT_RULE_SEARCHES);
    u8 kind;
    s32 cfa = 0;
    s16 rbp = 0;
    struct unwind_mapping *m = find_mapping(proc, at);
    if (!m) {
        kind = UNWIND_RULE_NO_MAPPING;
    } else if (m->table_start == UNWIND_STOP) {
        kind = UNWIND_RULE_STOP;
    } else if (m->table_len == 0) {
        kind = UNWIND_RULE_FRAME_POINTER;
    } else {
        struct unwind_row *r = find_row(m->table_start, m->table_len, at - m->bias);
        if (r) {
            kind = r->kind;
            cfa = r->cfa_offset;
            rbp = r->rbp_offset;
        } else {
            kind = UNWIND_RULE_NO_ROW;
        }
    }
    if (c) {
        c->pc = at;
        c->epoch = proc->epoch;
        c->cfa_offset = cfa;
        c->rbp_offset = rbp;
        c->kind = kind;
    }
    *cfa_offset = cfa;
    *rbp_offset = rbp;
    return kind;
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
#if PY_MAX_FRAMES
    u64 py_frame;              /* next _PyInterpreterFrame to record; 0: none */
    u32 python;                /* the process runs CPython: py holds its layout */
    struct py_process py;
#endif
    u64 win_base;              /* user address of win[0] */
    u32 win_len;               /* bytes of win read (0: none) */
    u32 pad2;
    u8 win[UNWIND_WINDOW];     /* the stack from win_base to at most its page's end */
};
BPF_PERCPU_ARRAY(unwind_states, struct unwind_state, 1);

/* Reads the 8 bytes at addr on the walked stack: from the window when they are in it, else
 * after reading a new window from addr up to its page's end (at most UNWIND_WINDOW bytes). A
 * walk reads upwards, frame after frame, so one read serves many frames. */
static __always_inline int read_stack(struct unwind_state *ws, u64 addr, u64 *out) {
    u64 off = addr - ws->win_base;
    if (off > UNWIND_WINDOW - 8 || off + 8 > ws->win_len) {
        u64 len = 4096 - (addr & 4095);
        if (len > UNWIND_WINDOW)
            len = UNWIND_WINDOW;
        if (len < 8) {              /* the 8 bytes cross a page: read them alone */
            ws->win_len = 0;
            return bpf_probe_read_user(out, 8, (void *)addr);
        }
        if (bpf_probe_read_user(ws->win, len, (void *)addr)) {
            ws->win_len = 0;
            return -1;
        }
        ws->win_base = addr;
        ws->win_len = len;
        off = 0;
    }
    barrier_var(off);
    if (off > UNWIND_WINDOW - 8)
        return -1;
    __builtin_memcpy(out, &ws->win[off], 8);
    return 0;
}

/* The last sampled process's unwind_processes (and py_processes) entries, per CPU: a CPU runs
 * the same process sample after sample, so two hash lookups per sample are spared (measured: 6 %
 * of the program's time on a steady load, 2.5 % on one where every stack is new). Valid while
 * both table versions are those it was read under. */
struct process_cache {
    u32 pid;                   /* 0: empty (pid 0, the idle task, is never walked) */
    u32 user_version;
    u32 kernel_version;
    u32 walked;                /* an unwind_processes entry: proc */
    u32 python;                /* a py_processes entry: py */
    struct unwind_process proc;
#if PY_MAX_FRAMES
    struct py_process py;
#endif
};
BPF_PERCPU_ARRAY(process_cache, struct process_cache, 1);
/* [0]: walk_user_stack, tail-called until the walk ends; [1]: walk_python_stack, after it */
BPF_PROG_ARRAY(unwind_programs, 2);

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
#if PY_MAX_FRAMES
        struct py_process *py = py_processes.lookup(&key->pid);
        pc->python = py != NULL;
        if (py)
            __builtin_memcpy(&pc->py, py, sizeof(*py));
#endif
        pc->pid = key->pid;
        pc->user_version = user_version;
        pc->kernel_version = kernel_version;
    }
    if (!pc->walked)
        return 0;
    ws->ip = ip;
    ws->sp = sp;
    ws->bp = bp;
    ws->n = 0;
    ws->done = 0;
    ws->win_len = 0;
    ws->g = g;
    ws->proc = pc->proc;
    __builtin_memcpy(&ws->key, key, sizeof(*key));
#if PY_MAX_FRAMES
    ws->python = pc->python;
    if (pc->python)
        __builtin_memcpy(&ws->py, &pc->py, sizeof(ws->py));
#endif
    st->len = 0;
    st->truncated = 1;
#if PY_MAX_FRAMES
    st->py_len = 0;
    st->py_truncated = 0;
#endif
    return 1;
}

/* One frame: records ip, then finds the caller's ip/sp/bp. Sets done when the walk ends
 * (truncated stays 1 unless it reached the thread's first frame). */
static __always_inline void walk_step(struct unwind_state *ws, struct unwind_stack *st) {
    u32 i = ws->n;
    if (i >= PROF_MAX_DEPTH) {
        ws->done = 1;
        return;
    }
    u64 ip = ws->ip, sp = ws->sp, bp = ws->bp;
    ws->done = 1;
    /* A return address names its call: look up the byte before it. */
    u64 at = i ? ip - 1 : ip;
    s32 cfa_offset;
    s16 rbp_offset;
    u8 kind = find_rule(&ws->proc, at, &cfa_offset, &rbp_offset);
    if (kind == UNWIND_RULE_NO_MAPPING && i)   /* a caller outside every mapping: not a frame */
        return;
    st->ips[i & 127] = ip;
    ws->n = i + 1;
    u64 ra = 0;
    if (kind == UNWIND_RULE_FRAME_POINTER) {   /* no table: frame pointers */
        /* lower address first: the window reads upwards */
        u64 saved = 0;
        if (bp == 0 || read_stack(ws, bp, &saved) || read_stack(ws, bp + 8, &ra))
            return;
        sp = bp + 16;
        bp = saved;
        count_unwind(UNWIND_STAT_FP_STEPS);
    } else {
        if (kind == UNWIND_OUTERMOST) {
            st->truncated = 0;
            return;
        }
        /* anything else ends the walk here: no mapping (the sampled pc), a table that did not
         * load, no row, no CFI, or a rule the walker does not follow */
        if (kind != UNWIND_RSP && kind != UNWIND_RBP)
            return;
        u64 cfa = (kind == UNWIND_RSP ? sp : bp) + (s64)cfa_offset;
        /* the saved rbp lies below the return address: read it first (the window reads upwards) */
        if (rbp_offset && read_stack(ws, cfa + rbp_offset, &bp))
            return;
        if (read_stack(ws, cfa - 8, &ra))
            return;
        sp = cfa;
    }
    if (ra == 0) {                          /* the ABI's end of the frame chain */
        st->truncated = 0;
        return;
    }
    ws->ip = ra;
    ws->sp = sp;
    ws->bp = bp;
    ws->done = 0;
}

/* A 64-bit hash of the walked stack (never 0: 0 means "no walked stack" in prof_key). */
static __always_inline u64 hash_stack(struct unwind_stack *st) {
    u64 h = 0xcbf29ce484222325ULL ^ st->truncated;
    #pragma clang loop unroll(disable)
    for (u32 i = 0; i < PROF_MAX_DEPTH; i++) {
        if (i >= st->len)
            break;
        u32 at = i;
        barrier_var(at);
        h = (h ^ st->ips[at & 127]) * 0x100000001b3ULL;
        h ^= h >> 29;
    }
#if PY_MAX_FRAMES
    h ^= (u64)st->py_truncated << 32 | st->py_len;
    #pragma clang loop unroll(disable)
    for (u32 i = 0; i < PY_MAX_FRAMES; i++) {
        if (i >= st->py_len)
            break;
        u32 at = i;
        barrier_var(at);
        at &= PY_MAX_FRAMES - 1;
        h = (h ^ st->py_code[at]) * 0x100000001b3ULL;
        h = (h ^ st->py_lasti[at]) * 0x100000001b3ULL;
        h ^= h >> 29;
    }
#endif
    return h ? h : 1;
}
#endif

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
        n = (walked->len & 127) * 8;
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
#if UNWIND && USER_STACKS
    u32 zero = 0;
    struct unwind_state *ws = unwind_states.lookup(&zero);
    struct unwind_stack *st = unwind_scratch.lookup(&zero);
    int begun = ws && st ? begin_walk(ctx, &key, g, ws, st) : 0;
    if (begun > 0)
        unwind_programs.call(ctx, 0);   /* does not return unless the tail call failed */
    if (begun == 0)
        count_unwind(UNWIND_STAT_NO_TABLE);
#endif
    count_sample(ctx, &key, g);
    return 0;
}

#if UNWIND && USER_STACKS
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
    else   /* full: sent whole (without its Python frames) */
        record_whole(ctx, key, PROF_LOST_COUNTS_MAP_FULL, st);
}
#endif

#if UNWIND && USER_STACKS && PY_MAX_FRAMES
BPF_PERCPU_ARRAY(py_stats, u64, PY_STATS);
struct py_code_key {
    u32 pid;
    u32 pad;
    u64 code;
};
/* Code objects already announced to user space (per process); an evicted one is announced again. */
BPF_TABLE("lru_hash", struct py_code_key, u8, py_codes_seen, PY_CODES_SEEN);
MIRROR(prof_py_code);

static __always_inline void count_py(int slot) {
    u64 *n = py_stats.lookup(&slot);
    if (n)
        (*n)++;
}

/* The current _PyInterpreterFrame of the sampled thread (0: not a Python thread, or idle):
 * its thread state is found in the first interpreter's list by native thread id. */
static __always_inline u64 py_thread_frame(struct unwind_state *ws) {
    struct py_process *py = &ws->py;
    u64 tid = ws->key.tid;
    if (py->pidns_ino) {                    /* thread ids as the process's namespace numbers them */
        struct bpf_pidns_info ns = {};
        if (bpf_get_ns_current_pid_tgid(py->pidns_dev, py->pidns_ino, &ns, sizeof(ns)) == 0)
            tid = ns.pid;
    }
    u64 interp = 0, ts = 0, frame = 0;
    if (bpf_probe_read_user(&interp, sizeof(interp), (void *)py->interpreters_head) || !interp)
        return 0;
    if (bpf_probe_read_user(&ts, sizeof(ts), (void *)(interp + py->threads_head)))
        return 0;
    #pragma clang loop unroll(disable)
    for (int i = 0; i < PY_MAX_THREADS; i++) {
        if (!ts)
            return 0;
        u64 native = 0;
        if (bpf_probe_read_user(&native, sizeof(native), (void *)(ts + py->ts_native_thread_id)))
            return 0;
        if (native == tid)
            break;
        if (bpf_probe_read_user(&ts, sizeof(ts), (void *)(ts + py->ts_next)))
            return 0;
    }
    if (!ts || bpf_probe_read_user(&frame, sizeof(frame), (void *)(ts + py->ts_frame)) || !frame)
        return 0;
    if (py->frame_in_cframe != PY_NO_OFFSET &&
        bpf_probe_read_user(&frame, sizeof(frame), (void *)(frame + py->frame_in_cframe)))
        return 0;
    return frame;
}

/* Announces a code object the first time this process's stacks name it. */
static __always_inline void notice_code(u32 pid, u64 code) {
    struct py_code_key k = {.pid = pid, .code = code};
    if (py_codes_seen.lookup(&k))
        return;
    u8 one = 1;
    py_codes_seen.update(&k, &one);
    struct prof_py_code *e = events.ringbuf_reserve(sizeof(struct prof_py_code));
    if (!e) {
        py_codes_seen.delete(&k);           /* announced with a later sample */
        return;
    }
    e->kind = PROF_REC_PY_CODE;
    e->pid = pid;
    e->code = code;
    events.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);   /* read now (see notice_process) */
}

/* Records one frame (code object, instruction offset) and moves to the previous one; a shim
 * frame (3.12+) is not recorded but marks the frame before it as its eval call's first. */
static __always_inline void py_step(struct unwind_state *ws, struct unwind_stack *st) {
    struct py_process *py = &ws->py;
    u64 f = ws->py_frame;
    u64 code = 0, instr = 0, previous = 0;
    u8 entry = 0;
    ws->py_frame = 0;
    if (bpf_probe_read_user(&code, sizeof(code), (void *)(f + py->fr_code)) ||
        bpf_probe_read_user(&instr, sizeof(instr), (void *)(f + py->fr_instr)) ||
        bpf_probe_read_user(&previous, sizeof(previous), (void *)(f + py->fr_previous)) ||
        bpf_probe_read_user(&entry, sizeof(entry), (void *)(f + py->fr_entry))) {
        st->py_truncated = 1;
        return;
    }
    u32 n = st->py_len;
    if (py->entry_kind == PY_ENTRY_SHIM && entry == py->entry_value) {
        if (n > 0 && n <= PY_MAX_FRAMES)
            st->py_lasti[(n - 1) & (PY_MAX_FRAMES - 1)] |= PY_LASTI_ENTRY;
        ws->py_frame = previous;
        return;
    }
    if (n >= PY_MAX_FRAMES) {
        st->py_truncated = 1;
        return;
    }
    u64 first = code + py->code_adaptive;
    u32 lasti = instr >= first && instr - first < PY_LASTI_UNKNOWN ? (u32)(instr - first) : PY_LASTI_UNKNOWN;
    if (py->entry_kind == PY_ENTRY_FLAG && entry)
        lasti |= PY_LASTI_ENTRY;
    st->py_code[n & (PY_MAX_FRAMES - 1)] = code;
    st->py_lasti[n & (PY_MAX_FRAMES - 1)] = lasti;
    st->py_len = n + 1;
    count_py(PY_STAT_FRAMES);
    notice_code(ws->key.pid, code);
    ws->py_frame = previous;
}

/* Walks PY_FRAMES_PER_CALL Python frames per call, tail-calling itself, then ends the walk. */
int walk_python_stack(struct bpf_perf_event_data *ctx) {
    u32 zero = 0;
    struct unwind_state *ws = unwind_states.lookup(&zero);
    struct unwind_stack *st = unwind_scratch.lookup(&zero);
    if (!ws || !st)
        return 0;
    if (ws->py_frame == 1) {                /* first call: find the thread's current frame */
        ws->py_frame = py_thread_frame(ws);
        count_py(ws->py_frame ? PY_STAT_WALKED : PY_STAT_NO_THREAD);
    }
    #pragma clang loop unroll(disable)
    for (int k = 0; k < PY_FRAMES_PER_CALL; k++) {
        if (!ws->py_frame)
            break;
        py_step(ws, st);
    }
    if (ws->py_frame)
        unwind_programs.call(ctx, 1);       /* returns only at the tail-call limit */
    if (ws->py_frame)
        st->py_truncated = 1;
    if (st->py_truncated)
        count_py(PY_STAT_TRUNCATED);
    finish_walk(ctx, ws, st);
    return 0;
}
#endif

#if UNWIND && USER_STACKS
/* Walks UNWIND_FRAMES_PER_CALL frames, then tail-calls itself until the walk ends (at most
 * PROF_MAX_DEPTH frames: 16 calls of 8, inside the kernel's 33), then counts the sample. Each
 * call is verified once, so the verifier's work does not grow with the depth bound. */
int walk_user_stack(struct bpf_perf_event_data *ctx) {
    u32 zero = 0;
    struct unwind_state *ws = unwind_states.lookup(&zero);
    struct unwind_stack *st = unwind_scratch.lookup(&zero);
    if (!ws || !st)
        return 0;
    #pragma clang loop unroll(disable)
    for (int k = 0; k < UNWIND_FRAMES_PER_CALL; k++) {
        if (ws->done)
            break;
        walk_step(ws, st);
    }
    if (!ws->done)
        unwind_programs.call(ctx, 0);   /* returns only at the tail-call limit: truncated */
    u32 n = ws->n;
    st->len = n > PROF_MAX_DEPTH ? PROF_MAX_DEPTH : n;
    if (st->truncated)
        count_unwind(n >= PROF_MAX_DEPTH ? UNWIND_STAT_DEPTH_LIMIT : UNWIND_STAT_TRUNCATED);
    count_unwind(UNWIND_STAT_WALKED);
#if PY_MAX_FRAMES
    if (ws->python) {                       /* a CPython process: its Python frames next */
        ws->py_frame = 1;                   /* "find the thread's frame first" */
        unwind_programs.call(ctx, 1);
    }
#endif
    finish_walk(ctx, ws, st);
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
#if USER_STACKS && PY_MAX_FRAMES
    gone |= py_processes.delete(&tgid) == 0;
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
#if USER_STACKS && PY_MAX_FRAMES
    gone |= py_processes.delete(&child) == 0;
#endif
    if (gone)
        tables_changed();
    return 0;
}
#endif
