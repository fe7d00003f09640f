/* HotSpot (JVM) Java frames (receiver/profiling/runtimes/hotspot.py): a runtime walker, inlined
 * into profiler.bpf.c after the native walker when Java frames are on.
 *
 * HotSpot's compiled code keeps no frame pointer, so the native walker stops at the first frame in
 * a mapping without a table when the process is a JVM (JIT_WALKER_SLOT) and hands the frame here
 * with its ip/sp/bp. This walker then steps through the code cache itself:
 *   - a pc in the interpreter: an interpreted frame keeps rbp; its Method* is at
 *     rbp - interp_method*8 and its bytecode pointer at rbp - interp_bcp*8 (the leaf's in r13
 *     when sampled in user mode: the interpreter saves it to the frame only at calls; bci = bcp - the
 *     ConstMethod's end); the caller's sp is the sender sp the frame saved (rbp - 8), its return
 *     address at rbp + 8, its rbp at rbp;
 *   - any other pc: its CodeBlob, found by the code heap's segment map (at most
 *     HOTSPOT_SEGMAP_STEPS back-steps); a blob with a frame size (compiled methods, runtime stubs)
 *     is left by sp += frame_size * 8, the return address at sp - 8 and the saved rbp at sp - 16;
 *     one without: a sampled frameless stub (vtable, adapter) by the return address at sp when
 *     that is in the code cache, else (the call stub) by its rbp. An nmethod (its tag word matches) records
 *     its Method*.
 * Each Java frame is recorded as (Method*, its native frame's index << HOTSPOT_AUX_INDEX_SHIFT |
 * bci for an interpreted frame, or HOTSPOT_COMPILED | the nmethod's compile id for a compiled
 * one: user space finds the nmethod again by the frame's pc and decodes its scopes there, the
 * methods inlined at that pc and their lines, only while its compile id and Method* match).
 * Recording the Method* at sample time keeps a recompiled, deoptimized or flushed nmethod from
 * naming another method later. When a return
 * address leaves the code cache the walk goes back to the native walker (JNI, the VM, the
 * launcher), which hands it here again at the next Java frame; libjvm itself (built with frame
 * pointers) is stepped here by rbp when its unwind table is not loaded (too large for the budget). All offsets come from the JVM's
 * own gHotSpotVM* tables. */

#define HOTSPOT_FRAMES_PER_CALL 8     /* frames one walk_hotspot call steps */
#define HOTSPOT_SEGMAP_STEPS 16       /* segment-map back-steps to a blob's start */
#define HOTSPOT_HEAPS 3               /* code heaps (segmented code cache: 3) */
#define HOTSPOT_AUX_INDEX_SHIFT 24    /* rt_aux: native frame index above, bci or compile id below */
#define HOTSPOT_NO_BCI 0x7fffff       /* rt_aux's bci part: an interpreted frame's bci unknown */
#define HOTSPOT_COMPILED 0x800000     /* rt_aux: a compiled frame, its nmethod's compile id in the bits below */
#define HOTSPOT_COMPILE_ID_MASK 0x7fffff
#define HOTSPOT_CURSOR_GOING 2        /* rt_cursor: a walk in progress */

struct hotspot_process {
    __u64 cache_low;           /* CodeCache::_low_bound .. _high_bound */
    __u64 cache_high;
    __u64 interp_low;          /* the interpreter's code: AbstractInterpreter::_code's buffer */
    __u64 interp_high;
    __u64 nmethod_tag;         /* an nmethod's word at tag_offset, masked (JDK 17: its _name; 23+: _kind) */
    __u64 tag_mask;
    __u16 tag_offset;
    __u16 frame_size;          /* CodeBlob::_frame_size (int, words) */
    __u16 nmethod_method;      /* nmethod::_method */
    __u16 const_method;        /* Method::_constMethod */
    __u16 const_method_size;   /* sizeof(ConstMethod): the bytecodes follow it */
    __u16 heap_block_size;     /* sizeof(HeapBlock): the blob follows it */
    __u8 interp_method;        /* interpreter frame slots, in words below rbp */
    __u8 interp_bcp;
    __u8 interp_sender_sp;
    __u8 compile_id;           /* nmethod::_compile_id (int) / 4; 0: not recorded */
};
_Static_assert(sizeof(struct hotspot_process) <= RUNTIME_DATA_BYTES, "hotspot_process must fit runtime_process.data");
MIRROR(hotspot_process);

/* A JVM's code heaps (fixed at its start): [low, high) each, its segment map and segment size. */
struct hotspot_heaps {
    __u64 low[HOTSPOT_HEAPS];
    __u64 high[HOTSPOT_HEAPS];
    __u64 segmap[HOTSPOT_HEAPS];
    __u64 jvm_low;             /* libjvm's code: walked by frame pointer where it has no table */
    __u64 jvm_high;
    __u8 log2_segment[HOTSPOT_HEAPS];
    __u8 count;
    __u8 pad[4];
};
BPF_HASH(hotspot_heaps, u32, struct hotspot_heaps, UNWIND_PROCESSES);
MIRROR(hotspot_heaps);

/* hotspot_stats[] slots */
#define HOTSPOT_STAT_WALKED 0         /* walks of JVM samples that reached Java code */
#define HOTSPOT_STAT_INTERPRETED 1    /* interpreted frames recorded */
#define HOTSPOT_STAT_COMPILED 2       /* compiled frames recorded */
#define HOTSPOT_STAT_STUBS 3          /* stub frames stepped (call stub, adapters, runtime stubs) */
#define HOTSPOT_STAT_NO_BLOB 4        /* a pc in the code cache without a blob (free, or a bad map) */
#define HOTSPOT_STAT_BAD_FRAME 5      /* a frame that could not be read or left */
#define HOTSPOT_STAT_HANDED_BACK 6    /* walks handed back to the native walker below Java code */
#define HOTSPOT_STAT_TRUNCATED 7      /* walks cut short (depth, tail calls) */
#define HOTSPOT_STAT_JVM_FP_STEPS 8   /* libjvm frames (no unwind table loaded) stepped by rbp */
#define HOTSPOT_STATS 9

BPF_PERCPU_ARRAY(hotspot_stats, u64, HOTSPOT_STATS);

static __always_inline void count_hotspot(int slot) {
    u64 *n = hotspot_stats.lookup(&slot);
    if (n)
        (*n)++;
}

/* The CodeBlob holding pc (a code heap's segment map walked back to the block's start), or 0. */
static __always_inline u64 hotspot_blob(struct hotspot_process *hs, struct hotspot_heaps *heaps, u64 pc) {
    #pragma clang loop unroll(disable)
    for (int h = 0; h < HOTSPOT_HEAPS; h++) {
        if (h >= heaps->count)
            break;
        if (pc < heaps->low[h] || pc >= heaps->high[h])
            continue;
        u8 shift = heaps->log2_segment[h] & 63;
        u64 idx = (pc - heaps->low[h]) >> shift;
        u64 segmap = heaps->segmap[h];
        #pragma clang loop unroll(disable)
        for (int s = 0; s < HOTSPOT_SEGMAP_STEPS; s++) {
            u8 tag = 0xff;
            if (bpf_probe_read_user(&tag, 1, (void *)(segmap + idx)) || tag == 0xff)
                return 0;
            if (tag == 0)
                return heaps->low[h] + (idx << shift) + hs->heap_block_size;
            if (tag > idx)
                return 0;
            idx -= tag;
        }
        return 0;
    }
    return 0;
}

/* The unwind rule kind at a return address - 1. */
static __always_inline u8 hotspot_kind(struct unwind_state *ws, u64 at) {
    s32 cfa_offset;
    s16 rbp_offset;
    return find_rule(&ws->proc, at, &cfa_offset, &rbp_offset);
}

/* One frame: the one at ws->ip/sp/bp (native index ws->n - 1, in the code cache). Records it if it
 * is Java's, then finds its caller. Returns 0 when the caller is in the code cache too (appended),
 * 1 when the walk ends here, 2 when the caller is native code (the native walker takes it). */
static __always_inline int hotspot_step(struct unwind_state *ws, struct unwind_stack *st,
                                        struct hotspot_process *hs, struct hotspot_heaps *heaps, u64 leaf_bcp) {
    u32 i = ws->n - 1;
    u64 pc = ws->ip, sp = ws->sp, bp = ws->bp;
    u64 at = i ? pc - 1 : pc;
    u64 ra = 0, caller_sp = 0, caller_bp = 0;
    if (at < hs->cache_low || at >= hs->cache_high) {        /* libjvm without a table: by rbp */
        if (!bp || read_stack(ws, bp, &caller_bp) || read_stack(ws, bp + 8, &ra)) {
            count_hotspot(HOTSPOT_STAT_BAD_FRAME);
            return 1;
        }
        caller_sp = bp + 16;
        count_hotspot(HOTSPOT_STAT_JVM_FP_STEPS);
    } else if (at >= hs->interp_low && at < hs->interp_high) {      /* an interpreted frame */
        u64 method = 0, bcp = 0, cm = 0;
        if (!bp || bpf_probe_read_user(&method, 8, (void *)(bp - (u64)hs->interp_method * 8)) ||
            bpf_probe_read_user(&bcp, 8, (void *)(bp - (u64)hs->interp_bcp * 8)) ||
            bpf_probe_read_user(&caller_sp, 8, (void *)(bp - (u64)hs->interp_sender_sp * 8)) ||
            bpf_probe_read_user(&caller_bp, 8, (void *)bp) || bpf_probe_read_user(&ra, 8, (void *)(bp + 8))) {
            count_hotspot(HOTSPOT_STAT_BAD_FRAME);
            return 1;
        }
        if (i == 0 && leaf_bcp)             /* the running bytecode's: live in r13, saved at calls */
            bcp = leaf_bcp;
        u32 bci = HOTSPOT_NO_BCI;
        if (method && !bpf_probe_read_user(&cm, 8, (void *)(method + hs->const_method))) {
            u64 off = bcp - cm - hs->const_method_size;
            if (bcp > cm && off < 0x10000)
                bci = (u32)off;
        }
        if (method && runtime_record(ws, st, method, (i & PROF_DEPTH_MASK) << HOTSPOT_AUX_INDEX_SHIFT | bci) == 0)
            count_hotspot(HOTSPOT_STAT_INTERPRETED);
    } else {
        u64 blob = hotspot_blob(hs, heaps, at);
        s32 frame_size = 0;
        u64 tag = 0;
        if (!blob) {
            count_hotspot(HOTSPOT_STAT_NO_BLOB);
            return 1;
        }
        if (bpf_probe_read_user(&frame_size, 4, (void *)(blob + hs->frame_size)) ||
            bpf_probe_read_user(&tag, 8, (void *)(blob + hs->tag_offset))) {
            count_hotspot(HOTSPOT_STAT_BAD_FRAME);
            return 1;
        }
        if ((tag & hs->tag_mask) == hs->nmethod_tag) {       /* a compiled Java method */
            u64 method = 0;
            s32 compile_id = 0;      /* with the pc, user space finds this nmethod's scopes (inlining, lines) */
            if (hs->compile_id)
                bpf_probe_read_user(&compile_id, 4, (void *)(blob + (u64)hs->compile_id * 4));
            if (!bpf_probe_read_user(&method, 8, (void *)(blob + hs->nmethod_method)) && method &&
                runtime_record(ws, st, method, (i & PROF_DEPTH_MASK) << HOTSPOT_AUX_INDEX_SHIFT | HOTSPOT_COMPILED |
                               ((u32)compile_id & HOTSPOT_COMPILE_ID_MASK)) == 0)
                count_hotspot(HOTSPOT_STAT_COMPILED);
        } else {
            count_hotspot(HOTSPOT_STAT_STUBS);
        }
        if (frame_size > 0 && frame_size < 0x10000) {        /* no frame pointer: the blob's frame size */
            caller_sp = sp + (u64)frame_size * 8;
            if (read_stack(ws, caller_sp - 16, &caller_bp) || read_stack(ws, caller_sp - 8, &ra)) {
                count_hotspot(HOTSPOT_STAT_BAD_FRAME);
                return 1;
            }
            /* a leaf sampled in its prologue or epilogue (frame not built yet, or taken down
             * already): its return address at sp, or above the rbp it pushed, when that is Java's
             * (every Java method is called from the code cache) */
            if (i == 0 && (ra - 1 < hs->cache_low || ra - 1 >= hs->cache_high)) {
                u64 r0 = 0, r1 = 0, b1 = 0;
                if (!read_stack(ws, sp, &r0) && r0 - 1 >= hs->cache_low && r0 - 1 < hs->cache_high) {
                    ra = r0;
                    caller_sp = sp + 8;
                    caller_bp = bp;
                } else if (!read_stack(ws, sp, &b1) && !read_stack(ws, sp + 8, &r1) &&
                           r1 - 1 >= hs->cache_low && r1 - 1 < hs->cache_high) {
                    ra = r1;
                    caller_sp = sp + 16;
                    caller_bp = b1;
                }
            }
        } else if (i == 0 && !read_stack(ws, sp, &ra) && ra - 1 >= hs->cache_low && ra - 1 < hs->cache_high) {
            caller_sp = sp + 8;                              /* a frameless stub (vtable, adapter) */
            caller_bp = bp;                                  /* called from Java code */
        } else {                                             /* the call stub: by rbp */
            if (!bp || bpf_probe_read_user(&caller_bp, 8, (void *)bp) ||
                bpf_probe_read_user(&ra, 8, (void *)(bp + 8))) {
                count_hotspot(HOTSPOT_STAT_BAD_FRAME);
                return 1;
            }
            caller_sp = bp + 16;
        }
    }
    if (ra == 0) {
        st->truncated = 0;
        return 1;
    }
    ws->ip = ra;
    ws->sp = caller_sp;
    ws->bp = caller_bp;
    if (ra - 1 < hs->cache_low || ra - 1 >= hs->cache_high) {
        if (ra - 1 < heaps->jvm_low || ra - 1 >= heaps->jvm_high)
            return 2;
        u8 kind = hotspot_kind(ws, ra - 1);
        if (kind == UNWIND_RSP || kind == UNWIND_RBP || kind == UNWIND_OUTERMOST)
            return 2;                                        /* libjvm with its table */
    }
    u32 n = ws->n;
    if (n >= PROF_MAX_DEPTH)
        return 1;
    st->ips[n & PROF_DEPTH_MASK] = ra;
    ws->n = n + 1;
    return 0;
}

/* Steps HOTSPOT_FRAMES_PER_CALL frames per call, tail-calling itself; then ends the walk or hands
 * it back to the native walker. */
int walk_hotspot(struct bpf_perf_event_data *ctx) {
    struct unwind_state *ws = walk_state();
    struct unwind_stack *st = walk_stack();
    if (!ws || !st)
        return 0;
    struct hotspot_process *hs = (struct hotspot_process *)ws->rt.data;
    struct hotspot_heaps *heaps = hotspot_heaps.lookup(&ws->key.pid);
    u32 n = ws->n;
    u64 at = n > 1 ? ws->ip - 1 : ws->ip;
    int more = heaps && st->truncated && ws->done && n && ((at >= hs->cache_low && at < hs->cache_high) ||
        (at >= heaps->jvm_low && at < heaps->jvm_high && st->ips[(n - 1) & PROF_DEPTH_MASK] == ws->ip));
    /* a return address into code the native walker had no mapping for (code cache committed after
     * the mappings were read): not recorded by it, so it is this walker's first frame */
    if (more && ws->rt_cursor == RUNTIME_CURSOR_START && st->ips[(n - 1) & PROF_DEPTH_MASK] != ws->ip) {
        if (n >= PROF_MAX_DEPTH)
            more = 0;
        else {
            st->ips[n & PROF_DEPTH_MASK] = ws->ip;
            ws->n = n + 1;
        }
    }
    if (more && ws->rt_cursor == RUNTIME_CURSOR_START)
        count_hotspot(HOTSPOT_STAT_WALKED);
    /* sampled in user mode: the interpreter's bcp register (r13 on x86-64) of the leaf */
    u64 leaf_bcp = (s64)ctx->regs.ip >= 0 ? ctx->regs.r13 : 0;
    int r = 1;
    if (more) {
        #pragma clang loop unroll(disable)
        for (int k = 0; k < HOTSPOT_FRAMES_PER_CALL; k++) {
            r = hotspot_step(ws, st, hs, heaps, leaf_bcp);
            if (r)
                break;
        }
    }
    if (more && r == 0) {                   /* frames left: go on in the next call */
        ws->rt_cursor = HOTSPOT_CURSOR_GOING;
        runtime_continue(ctx, ws);          /* returns only at the tail-call limit */
        st->rt_truncated = 1;
        count_hotspot(HOTSPOT_STAT_TRUNCATED);
    } else if (more && r == 2) {
        ws->done = 0;
        st->truncated = 1;
        count_hotspot(HOTSPOT_STAT_HANDED_BACK);
        unwind_programs.call(ctx, UNWIND_NATIVE_SLOT);   /* returns only at the tail-call limit */
        st->rt_truncated = 1;
        count_hotspot(HOTSPOT_STAT_TRUNCATED);
    }
    st->len = ws->n > PROF_MAX_DEPTH ? PROF_MAX_DEPTH : ws->n;
    finish_walk(ctx, ws, st);
    return 0;
}
