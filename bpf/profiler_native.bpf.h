/* The native walker: a user stack walked in the kernel with unwind tables made from .eh_frame
 * (rows and mappings: profiler.h; tables built and loaded by receiver/profiling/unwind/).
 * Inlined into profiler.bpf.c, which defines the walk state and finish_walk before it.
 *
 * A process whose mappings user space has loaded into unwind_processes is walked with the unwind
 * tables of its files: CFA from rsp or rbp plus an offset, the return address at CFA-8, rbp
 * restored where saved. That needs no frame pointers, and names a leaf's caller. A mapping without
 * a table (JIT code) is stepped with frame pointers; a walk that leaves the mappings, meets a rule
 * it cannot follow or cannot read the stack stops there and marks the stack truncated (never a
 * guessed frame). The stack is read in windows of up to UNWIND_WINDOW bytes, each ending at most at
 * its page's end (a read crossing into an unmapped page would fail whole): one read serves the
 * frames in it. The walk is bounded by PROF_MAX_DEPTH frames, each a binary search over at most
 * UNWIND_MAX_MAPPINGS mappings (UNWIND_MAPPING_STEPS steps) and over the file's rows
 * (UNWIND_ROW_STEPS steps), UNWIND_FRAMES_PER_CALL frames per program run, chained by tail calls. */

#define PAGE_BYTES 4096

BPF_ARRAY(unwind_rows, struct unwind_row, UNWIND_ROWS);
BPF_HASH(unwind_processes, u32, struct unwind_process, UNWIND_PROCESSES);
BPF_ARRAY(unwind_mappings, struct unwind_mapping, UNWIND_PROCESSES * UNWIND_MAX_MAPPINGS);
BPF_PERCPU_ARRAY(unwind_cache, struct unwind_cache_entry, UNWIND_CACHE_SIZE);
#if RUNTIME_MAX_FRAMES
/* Each walked frame's rbp (per CPU), for runtime walkers that read frames by frame pointer (V8). */
struct unwind_fps {
    u64 fp[PROF_MAX_DEPTH + 1];
};
BPF_PERCPU_ARRAY(unwind_fps, struct unwind_fps, 1);
#endif

/* The mapping holding addr, or NULL. find_mapping and find_row are the same binary search over
 * two maps: BCC binds map.lookup() to a map by name at compile time and refuses map calls in
 * macros, so it is spelled out twice. */
static __always_inline struct unwind_mapping *find_mapping(struct unwind_process *proc, u64 addr) {
    u32 count = proc->count < UNWIND_MAX_MAPPINGS ? proc->count : UNWIND_MAX_MAPPINGS;
    u32 first = proc->slot * UNWIND_MAX_MAPPINGS;
    u32 lo = first, hi = first + count;
    #pragma clang loop unroll(disable)
    for (int step = 0; step < UNWIND_MAPPING_STEPS; step++) {
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

/* Reads the 8 bytes at addr on the walked stack: from the window when they are in it, else
 * after reading a new window from addr up to its page's end (at most UNWIND_WINDOW bytes). A
 * walk reads upwards, frame after frame, so one read serves many frames. */
static __always_inline int read_stack(struct unwind_state *ws, u64 addr, u64 *out) {
    u64 off = addr - ws->win_base;
    if (off > UNWIND_WINDOW - 8 || off + 8 > ws->win_len) {
        u64 len = PAGE_BYTES - (addr & (PAGE_BYTES - 1));
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
    st->ips[i & PROF_DEPTH_MASK] = ip;
#if RUNTIME_MAX_FRAMES
    u32 zero = 0;
    struct unwind_fps *fps = unwind_fps.lookup(&zero);
    if (fps)
        fps->fp[i & PROF_DEPTH_MASK] = bp;
#endif
    ws->n = i + 1;
    u64 ra = 0;
#ifdef JIT_WALKER_SLOT   /* a runtime whose JIT code keeps no frame pointer steps it itself (HotSpot) */
    if (kind == UNWIND_RULE_FRAME_POINTER && ws->rt.runtime == JIT_WALKER_SLOT)
        return;
#endif
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

/* Walks UNWIND_FRAMES_PER_CALL frames, then tail-calls itself until the walk ends (at most
 * PROF_MAX_DEPTH frames: 16 calls of 8, inside the kernel's 33), then hands the sample to its
 * process's runtime walker, if any, or counts it. Each call is verified once, so the verifier's
 * work does not grow with the depth bound. */
int walk_user_stack(struct bpf_perf_event_data *ctx) {
    struct unwind_state *ws = walk_state();
    struct unwind_stack *st = walk_stack();
    if (!ws || !st)
        return 0;
    #pragma clang loop unroll(disable)
    for (int k = 0; k < UNWIND_FRAMES_PER_CALL; k++) {
        if (ws->done)
            break;
        walk_step(ws, st);
    }
    if (!ws->done)
        unwind_programs.call(ctx, UNWIND_NATIVE_SLOT);   /* returns only at the tail-call limit: truncated */
    u32 n = ws->n;
    st->len = n > PROF_MAX_DEPTH ? PROF_MAX_DEPTH : n;
    if (st->truncated)
        count_unwind(n >= PROF_MAX_DEPTH ? UNWIND_STAT_DEPTH_LIMIT : UNWIND_STAT_TRUNCATED);
    count_unwind(UNWIND_STAT_WALKED);
#if RUNTIME_MAX_FRAMES
    if (ws->rt.runtime) {                   /* a runtime's process: its frames next */
        ws->rt_cursor = RUNTIME_CURSOR_START;
        runtime_continue(ctx, ws);          /* returns only when the runtime has no walker loaded */
    }
#endif
    finish_walk(ctx, ws, st);
    return 0;
}
