/* V8 JavaScript frames (receiver/profiling/runtimes/v8.py): a runtime walker, inlined into
 * profiler.bpf.c after the native walker when JavaScript frames are on.
 *
 * V8 keeps a frame-pointer chain through its code: JIT code (anonymous mappings, no unwind table)
 * and the builtins embedded in the node binary (no .eh_frame rows), so the native walker stops at
 * the first builtin. This walker then:
 *   1. looks at each frame the native walk recorded in V8 code (unwind_fps: that frame's rbp): a
 *      JavaScript frame holds a tagged context at fp + fp_context and a tagged JSFunction at
 *      fp + fp_function (a typed frame, stub or exit, holds a Smi marker instead), whose
 *      SharedFunctionInfo is checked by its map's instance type;
 *   2. continues the frame-pointer chain from where the native walk stopped while the return
 *      addresses are in V8 code (a mapping without a table, or no row), appending those frames to
 *      the native stack, and hands the walk back to the native walker at the first return address
 *      with unwind rows (the embedder's C++ under the JS entry frame); the native walker then
 *      tail-calls this walker again, which carries on from where it was.
 * Each JavaScript frame is recorded as (SharedFunctionInfo address, the native frame's index <<
 * V8_AUX_INDEX_SHIFT | bytecode offset): interpreted frames hold their BytecodeArray and the
 * offset as a Smi at fp_bytecode_array / fp_bytecode_offset; other frames get V8_NO_OFFSET.
 * User space names the SharedFunctionInfo from the process's memory and puts the JS frame in
 * place of the native frame at that index. All offsets come from the binary's v8dbg_* symbols. */

#define V8_FRAMES_PER_CALL 4       /* frames one walk_v8 call looks at */
#define V8_AUX_INDEX_SHIFT 24      /* rt_aux: native frame index above, bytecode offset below */
#define V8_NO_OFFSET 0xffffff      /* rt_aux's offset part: not an interpreted frame */
#define V8_CURSOR_BASE 2           /* rt_cursor - V8_CURSOR_BASE: native frames looked at so far */

struct v8_process {
    __u64 builtins_start;      /* the embedded builtins' code in the process (v8_Default_embedded_blob_code_) */
    __u64 builtins_end;
    __u64 remapped_start;      /* ... and its copy next to the JIT code (V8 12+ remaps it there), or 0 */
    __u64 remapped_end;
    __s16 fp_context;          /* v8dbg_off_fp_context_or_frame_type */
    __s16 fp_function;         /* v8dbg_off_fp_function */
    __s16 fp_bytecode_array;   /* v8dbg_off_fp_bytecode_array */
    __s16 fp_bytecode_offset;  /* v8dbg_off_fp_bytecode_offset */
    __u16 function_shared;     /* JSFunction::shared */
    __u16 heap_object_map;     /* HeapObject::map */
    __u16 map_instance_type;   /* Map::instance_type */
    __u16 sfi_type;            /* SHARED_FUNCTION_INFO_TYPE */
    __u16 bytecode_array_type; /* BYTECODE_ARRAY_TYPE */
    __u8 smi_shift;            /* a Smi's value is (s64)word >> smi_shift */
    __u8 pad[5];
};
_Static_assert(sizeof(struct v8_process) <= RUNTIME_DATA_BYTES, "v8_process must fit runtime_process.data");
MIRROR(v8_process);

/* v8_stats[] slots */
#define V8_STAT_WALKED 0           /* samples of V8 processes walked */
#define V8_STAT_FRAMES 1           /* JavaScript frames recorded */
#define V8_STAT_FP_STEPS 2         /* frames walked by frame pointer past the native walk */
#define V8_STAT_HANDED_BACK 3      /* walks handed back to the native walker below V8 code */
#define V8_STAT_TRUNCATED 4        /* walks cut short (depth, tail calls, unreadable chain) */
#define V8_STATS 5

BPF_PERCPU_ARRAY(v8_stats, u64, V8_STATS);

/* Where a walk that was handed back to the native walker resumes (per CPU; a perf-event program
 * never nests on its CPU). Valid for the sample whose thread and resume frame match. */
struct v8_resume {
    u64 ip;                    /* the native frame the native walker resumed at */
    u32 tid;
    u32 index;                 /* its index: frames before it were looked at */
};
BPF_PERCPU_ARRAY(v8_resumes, struct v8_resume, 1);

static __always_inline void count_v8(int slot) {
    u64 *n = v8_stats.lookup(&slot);
    if (n)
        (*n)++;
}

/* A frame slot's offset from fp as an index into the 64 bytes below fp. */
static __always_inline u32 v8_slot(s16 off) {
    return ((u32)(64 + off) >> 3) & 7;
}

/* The SharedFunctionInfo of the JavaScript frame whose 64 bytes below fp are ``slots``, or 0 when
 * it is not one. */
static __always_inline u64 v8_sfi(struct v8_process *v8, u64 *slots) {
    u64 context = slots[v8_slot(v8->fp_context)];
    u64 function = slots[v8_slot(v8->fp_function)];
    if (!(context & 1) || !(function & 1))    /* a Smi frame-type marker: not a JS frame */
        return 0;
    u64 sfi = 0, map = 0;
    u16 type = 0;
    if (bpf_probe_read_user(&sfi, sizeof(sfi), (void *)(function - 1 + v8->function_shared)) || !(sfi & 1) ||
        bpf_probe_read_user(&map, sizeof(map), (void *)(sfi - 1 + v8->heap_object_map)) || !(map & 1) ||
        bpf_probe_read_user(&type, sizeof(type), (void *)(map - 1 + v8->map_instance_type)) ||
        type != v8->sfi_type)
        return 0;
    return sfi;
}

/* Whether the frame at fp is a JavaScript frame. */
static __always_inline int v8_js(struct v8_process *v8, u64 fp) {
    u64 slots[8];
    if (fp < 64 || bpf_probe_read_user(slots, sizeof(slots), (void *)(fp - 64)))
        return 0;
    return v8_sfi(v8, slots) != 0;
}

/* The frame at fp, native index i: recorded when it is a JavaScript frame. */
static __always_inline void v8_frame(struct unwind_state *ws, struct unwind_stack *st, struct v8_process *v8,
                                     u64 fp, u32 i) {
    u64 slots[8];
    if (fp < 64 || bpf_probe_read_user(slots, sizeof(slots), (void *)(fp - 64)))
        return;
    u64 sfi = v8_sfi(v8, slots), map = 0;
    u16 type = 0;
    if (!sfi)
        return;
    u32 offset = V8_NO_OFFSET;
    u64 bytecode = slots[v8_slot(v8->fp_bytecode_array)];
    s64 raw = (s64)slots[v8_slot(v8->fp_bytecode_offset)];
    if ((bytecode & 1) && !(raw & 1) &&
        !bpf_probe_read_user(&map, sizeof(map), (void *)(bytecode - 1 + v8->heap_object_map)) && (map & 1) &&
        !bpf_probe_read_user(&type, sizeof(type), (void *)(map - 1 + v8->map_instance_type)) &&
        type == v8->bytecode_array_type) {
        s64 value = raw >> (v8->smi_shift & 63);
        if (value >= 0 && value < V8_NO_OFFSET)
            offset = (u32)value;
    }
    if (runtime_record(ws, st, sfi, (i & PROF_DEPTH_MASK) << V8_AUX_INDEX_SHIFT | offset) == 0)
        count_v8(V8_STAT_FRAMES);
}

/* The unwind rule kind at a return address - 1 (or the sampled pc). */
static __always_inline u8 v8_kind(struct unwind_state *ws, u64 at) {
    s32 cfa_offset;
    s16 rbp_offset;
    return find_rule(&ws->proc, at, &cfa_offset, &rbp_offset);
}

/* Whether addr is in the builtins embedded in the binary (which have no call-frame information). */
static __always_inline int v8_builtin(struct v8_process *v8, u64 addr) {
    return (addr >= v8->builtins_start && addr < v8->builtins_end) ||
           (addr >= v8->remapped_start && addr < v8->remapped_end);
}

/* Whether the code at addr may be V8's: a builtin, a mapping without a table (JIT code), or no
 * mapping known (JIT code pages mapped after the process's mappings were read); frames there are
 * named only when they hold a SharedFunctionInfo. */
static __always_inline int v8_code(struct unwind_state *ws, struct v8_process *v8, u64 addr) {
    if (v8_builtin(v8, addr))
        return 1;
    u8 kind = v8_kind(ws, addr);
    return kind == UNWIND_RULE_FRAME_POINTER || kind == UNWIND_RULE_NO_MAPPING;
}

/* One step past the native walk, from the frame at ws->ip/ws->bp (native index ws->n - 1, already
 * looked at): its caller by frame pointer. Returns 0 to go on, 1 when the walk ends here, 2 when
 * the caller is native code with unwind rows (the native walker takes it). */
static __always_inline int v8_step(struct unwind_state *ws, struct unwind_stack *st, struct v8_process *v8,
                                   struct unwind_fps *fps) {
    u64 fp = ws->bp, saved = 0, ra = 0;
    u32 n = ws->n;
    if (n >= PROF_MAX_DEPTH || !fp || read_stack(ws, fp, &saved) || read_stack(ws, fp + 8, &ra))
        return 1;
    if (ra == 0) {                          /* the chain's end */
        st->truncated = 0;
        return 1;
    }
    ws->ip = ra;
    ws->sp = fp + 16;
    ws->bp = saved;
    if (!v8_builtin(v8, ra - 1)) {
        u8 kind = v8_kind(ws, ra - 1);
        /* outside every known mapping: followed only into a JavaScript frame (never a guessed one) */
        if (kind == UNWIND_RULE_NO_MAPPING && !v8_js(v8, saved))
            return 1;
        if (kind != UNWIND_RULE_FRAME_POINTER && kind != UNWIND_RULE_NO_MAPPING)
            return kind == UNWIND_RSP || kind == UNWIND_RBP || kind == UNWIND_OUTERMOST ? 2 : 1;
    }
    st->ips[n & PROF_DEPTH_MASK] = ra;
    fps->fp[n & PROF_DEPTH_MASK] = saved;
    ws->n = n + 1;
    count_v8(V8_STAT_FP_STEPS);
    return 0;
}

/* Looks at V8_FRAMES_PER_CALL frames per call (recorded ones first, then by frame pointer past the
 * native walk), tail-calling itself; then ends the walk or hands it back to the native walker. */
int walk_v8(struct bpf_perf_event_data *ctx) {
    struct unwind_state *ws = walk_state();
    struct unwind_stack *st = walk_stack();
    u32 zero = 0;
    struct v8_resume *resume = v8_resumes.lookup(&zero);
    struct unwind_fps *fps = unwind_fps.lookup(&zero);
    if (!ws || !st || !resume || !fps)
        return 0;
    struct v8_process *v8 = (struct v8_process *)ws->rt.data;
    u32 i = 0;
    if (ws->rt_cursor == RUNTIME_CURSOR_START) {   /* after the native walk (first, or resumed) */
        u32 at = resume->index;
        if (resume->tid == ws->key.tid && at < ws->n && st->ips[at & PROF_DEPTH_MASK] == resume->ip) {
            i = at;
        } else {
            count_v8(V8_STAT_WALKED);
            /* the native walk stopped at a caller outside every known mapping without recording it
             * (JIT code mapped since): that caller, when it is a JavaScript frame */
            u32 n = ws->n;
            if (ws->done && n && n < PROF_MAX_DEPTH && st->ips[(n - 1) & PROF_DEPTH_MASK] != ws->ip &&
                v8_kind(ws, ws->ip - 1) == UNWIND_RULE_NO_MAPPING && v8_js(v8, ws->bp)) {
                st->ips[n & PROF_DEPTH_MASK] = ws->ip;
                fps->fp[n & PROF_DEPTH_MASK] = ws->bp;
                ws->n = n + 1;
            }
        }
        resume->tid = 0;
    } else {
        i = (u32)(ws->rt_cursor - V8_CURSOR_BASE);
    }
    /* the native walk stopped in V8 code (not at the chain's end, nor at the depth limit) */
    u32 last = ws->n ? ws->n - 1 : 0;
    u64 at = last ? ws->ip - 1 : ws->ip;
    int more = st->truncated && ws->n && ws->n < PROF_MAX_DEPTH && ws->done && v8_code(ws, v8, at);
    int handed = 0;
    #pragma clang loop unroll(disable)
    for (int k = 0; k < V8_FRAMES_PER_CALL; k++) {
        if (i < ws->n) {
            u64 ip = st->ips[i & PROF_DEPTH_MASK];
            ip = i ? ip - 1 : ip;
            if (v8_code(ws, v8, ip))
                v8_frame(ws, st, v8, fps->fp[i & PROF_DEPTH_MASK], i);
            i++;
            continue;
        }
        if (!more)
            break;
        int r = v8_step(ws, st, v8, fps);
        if (r == 1) {
            more = 0;
            break;
        }
        if (r == 2) {
            more = 0;
            handed = 1;
            break;
        }
    }
    if (i < ws->n || more) {                /* frames left: go on in the next call */
        ws->rt_cursor = V8_CURSOR_BASE + i;
        runtime_continue(ctx, ws);          /* returns only at the tail-call limit */
        st->rt_truncated = 1;
        count_v8(V8_STAT_TRUNCATED);
    } else if (handed) {
        resume->tid = ws->key.tid;
        resume->index = ws->n;
        resume->ip = ws->ip;
        ws->done = 0;
        st->truncated = 1;
        count_v8(V8_STAT_HANDED_BACK);
        unwind_programs.call(ctx, UNWIND_NATIVE_SLOT);   /* returns only at the tail-call limit */
        resume->tid = 0;
        st->rt_truncated = 1;
        count_v8(V8_STAT_TRUNCATED);
    }
    st->len = ws->n > PROF_MAX_DEPTH ? PROF_MAX_DEPTH : ws->n;
    finish_walk(ctx, ws, st);
    return 0;
}
