/* CPython frames (receiver/profiling/runtimes/cpython.py): a runtime walker, inlined into
 * profiler.bpf.c after the native walker when Python frames are on.
 *
 * For a process running CPython, runtime_processes[tgid].data holds a struct py_process: where its
 * interpreter list is and the version's offsets (a table in user space: 3.11, 3.12, 3.13 differ
 * only in numbers). The walk finds the sampled thread's PyThreadState in the first interpreter's
 * thread list by its native thread id, then follows current frame -> previous, recording each
 * frame's code object (rt_id) and instruction offset (rt_aux). User space names code objects and
 * places each run of frames that one C-level _PyEval_EvalFrameDefault call evaluates at that
 * native frame: the last frame of each run carries RUNTIME_AUX_LAST. */

#define PY_FRAMES_PER_CALL 16      /* Python frames one walk_cpython call walks */
#define PY_MAX_THREADS 64          /* thread states searched for the sampled thread */
#define PY_ENTRY_FLAG 1            /* entry_kind: a nonzero byte marks an eval call's first frame (3.11) */
#define PY_ENTRY_SHIM 2            /* entry_kind: a frame with byte == entry_value is a C-stack shim (3.12+) */
#define PY_NO_OFFSET 0xffff        /* frame_in_cframe when the thread state points at the frame itself */
#define PY_LASTI_UNKNOWN 0x7fffffff

struct py_process {
    __u64 interpreters_head;   /* address of _PyRuntime.interpreters.head */
    __u64 pidns_dev;           /* the process's pid namespace (thread ids as it sees them) */
    __u64 pidns_ino;
    __u16 threads_head;        /* PyInterpreterState.threads.head */
    __u16 ts_next;             /* PyThreadState.next */
    __u16 ts_native_thread_id; /* PyThreadState.native_thread_id */
    __u16 ts_frame;            /* PyThreadState.cframe (3.11, 3.12) or .current_frame (3.13) */
    __u16 frame_in_cframe;     /* _PyCFrame.current_frame, or PY_NO_OFFSET */
    __u16 fr_code;             /* _PyInterpreterFrame.f_code / f_executable */
    __u16 fr_instr;            /* .prev_instr / .instr_ptr */
    __u16 fr_previous;         /* .previous */
    __u16 fr_entry;            /* .is_entry (3.11) or .owner (3.12+) */
    __u16 code_adaptive;       /* PyCodeObject.co_code_adaptive: instruction 0 */
    __u8 entry_kind;           /* PY_ENTRY_* */
    __u8 entry_value;          /* the shim's owner value (FRAME_OWNED_BY_CSTACK) */
    __u8 pad[6];
};
_Static_assert(sizeof(struct py_process) <= RUNTIME_DATA_BYTES, "py_process must fit runtime_process.data");
MIRROR(py_process);

/* py_stats[] slots */
#define PY_STAT_WALKED 0           /* samples of CPython processes whose thread state was found */
#define PY_STAT_NO_THREAD 1        /* ... whose sampled thread has no thread state (not a Python thread) */
#define PY_STAT_TRUNCATED 2        /* ... whose frame chain was longer than RUNTIME_MAX_FRAMES or unreadable */
#define PY_STAT_FRAMES 3           /* Python frames recorded */
#define PY_STATS 4

BPF_PERCPU_ARRAY(py_stats, u64, PY_STATS);

static __always_inline void count_py(int slot) {
    u64 *n = py_stats.lookup(&slot);
    if (n)
        (*n)++;
}

/* The current _PyInterpreterFrame of the sampled thread (0: not a Python thread, or idle):
 * its thread state is found in the first interpreter's list by native thread id. */
static __always_inline u64 py_thread_frame(struct unwind_state *ws, struct py_process *py) {
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

/* Records one frame (code object, instruction offset) and moves to the previous one; a shim
 * frame (3.12+) is not recorded but marks the frame before it as its eval call's last. */
static __always_inline void py_step(struct unwind_state *ws, struct unwind_stack *st, struct py_process *py) {
    u64 f = ws->rt_cursor;
    u64 code = 0, instr = 0, previous = 0;
    u8 entry = 0;
    ws->rt_cursor = 0;
    if (bpf_probe_read_user(&code, sizeof(code), (void *)(f + py->fr_code)) ||
        bpf_probe_read_user(&instr, sizeof(instr), (void *)(f + py->fr_instr)) ||
        bpf_probe_read_user(&previous, sizeof(previous), (void *)(f + py->fr_previous)) ||
        bpf_probe_read_user(&entry, sizeof(entry), (void *)(f + py->fr_entry))) {
        st->rt_truncated = 1;
        return;
    }
    if (py->entry_kind == PY_ENTRY_SHIM && entry == py->entry_value) {
        runtime_end_group(st);
        ws->rt_cursor = previous;
        return;
    }
    u64 first = code + py->code_adaptive;
    u32 lasti = instr >= first && instr - first < PY_LASTI_UNKNOWN ? (u32)(instr - first) : PY_LASTI_UNKNOWN;
    if (py->entry_kind == PY_ENTRY_FLAG && entry)
        lasti |= RUNTIME_AUX_LAST;
    if (runtime_record(ws, st, code, lasti))
        return;                             /* full: truncated */
    count_py(PY_STAT_FRAMES);
    ws->rt_cursor = previous;
}

/* Walks PY_FRAMES_PER_CALL Python frames per call, tail-calling itself, then ends the walk. */
int walk_cpython(struct bpf_perf_event_data *ctx) {
    struct unwind_state *ws = walk_state();
    struct unwind_stack *st = walk_stack();
    if (!ws || !st)
        return 0;
    struct py_process *py = (struct py_process *)ws->rt.data;
    if (ws->rt_cursor == RUNTIME_CURSOR_START) {   /* first call: find the thread's current frame */
        ws->rt_cursor = py_thread_frame(ws, py);
        count_py(ws->rt_cursor ? PY_STAT_WALKED : PY_STAT_NO_THREAD);
    }
    #pragma clang loop unroll(disable)
    for (int k = 0; k < PY_FRAMES_PER_CALL; k++) {
        if (!ws->rt_cursor)
            break;
        py_step(ws, st, py);
    }
    if (ws->rt_cursor)
        runtime_continue(ctx, ws);          /* returns only at the tail-call limit */
    if (ws->rt_cursor)
        st->rt_truncated = 1;
    if (st->rt_truncated)
        count_py(PY_STAT_TRUNCATED);
    finish_walk(ctx, ws, st);
    return 0;
}
