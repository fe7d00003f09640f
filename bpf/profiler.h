/* Records and map keys profiler.bpf.c shares with receiver/profiling/sampler.py (ctypes mirror). */
#ifndef EBPF_RECEIVER_PROFILER_H
#define EBPF_RECEIVER_PROFILER_H

#define PROF_COMM_LEN 16

/* settings[] slots */
#define PROF_SET_GENERATION 0     /* which counts/stacks pair the program writes: 0 or 1 */
/* Versions of unwind_processes/py_processes, new after each change: user space's (one writer,
 * the unwinder's thread) and the kernel's (exec and fork, atomically). A per-CPU copy of the last
 * sampled process's entries is used while both are unchanged (see process_cache). */
#define PROF_SET_TABLES_USER 1
#define PROF_SET_TABLES_KERNEL 2
#define PROF_SETTINGS 3

/* stats[] slots: every sample lands in exactly one */
#define PROF_STAT_COUNTED 0       /* counted in the active counts map */
#define PROF_STAT_IDLE 1          /* the idle task (pid 0): not profiled */
#define PROF_STAT_FILTERED 2      /* a process the filter does not select */
#define PROF_STAT_DROPPED 3       /* lost (see lost[]) */
#define PROF_STAT_RECORDED 4      /* sent whole over the ring buffer: its stack did not fit the stack map */
#define PROF_STAT_UNWOKEN 5       /* not a sample count: ring-buffer records since the last wake-up */
#define PROF_STATS 6

/* lost[] slots */
/* The first three: samples the maps could not take that the full ring buffer could not take either */
#define PROF_LOST_COUNTS_MAP_FULL 0   /* a counts map (counts or walked) is full */
#define PROF_LOST_STACK_COLLISION 1   /* -EEXIST: another stack holds the hash bucket */
#define PROF_LOST_STACK_MAP_FULL 2    /* -ENOMEM: the stack map is full */
#define PROF_LOST_STACK_FAULT 3       /* -EFAULT with no kernel stack either: a sample without frames */
#define PROF_LOST_RINGBUF_FULL 4      /* a new-process notice; retried on the process's next sample */
#define PROF_N_LOST 5

/* Ring-buffer record kinds (the first field of each record) */
#define PROF_REC_NEW_PROCESS 1
#define PROF_REC_SAMPLE 2
#define PROF_REC_PY_CODE 3         /* a code object a process's stacks name for the first time */

#define PROF_MAX_DEPTH 127

/* A stack id of -1 means "not captured" (disabled, or kernel stack of a sample in user mode).
 * A sample whose user stack was walked with unwind tables is counted in walked<g>, its key's
 * user_stack_hash a hash of that stack (user_stack_id -1) and its value the stack; 0: none. */
struct prof_key {
    __u32 pid;                 /* tgid */
    __u32 tid;
    __s32 user_stack_id;
    __s32 kernel_stack_id;
    __u64 cgroup_id;
    char comm[PROF_COMM_LEN];  /* the thread's comm */
    __u64 user_stack_hash;
};

/* ---- In-kernel unwinding with tables made from .eh_frame (receiver/profiling/unwinder.py) ----
 *
 * unwind_rows holds every loaded file's rows, each file's sorted by pc in one contiguous range.
 * unwind_processes maps a tgid to its slot of UNWIND_MAX_MAPPINGS entries in unwind_mappings:
 * its executable mappings sorted by start, each naming its file's range (table_len 0: no
 * table, e.g. JIT code, stepped with frame pointers). Mappings sit in an array map rather than
 * in the process's value so the binary search looks them up by key: indexing a map value by a
 * searched index makes the verifier track every search path apart. */
#define UNWIND_END 0           /* no call-frame information covers this pc */
#define UNWIND_RSP 1           /* CFA = rsp + cfa_offset */
#define UNWIND_RBP 2           /* CFA = rbp + cfa_offset */
#define UNWIND_UNSUPPORTED 3   /* a rule the walker does not follow (DWARF expression) */
#define UNWIND_OUTERMOST 4     /* return address undefined: the first frame of the thread */

#define UNWIND_MAX_MAPPINGS 64
#define UNWIND_STOP 0xffffffff /* table_start of a mapping whose table did not fit: walks stop there */

struct unwind_row {
    __u64 pc;                  /* ELF virtual address where this rule starts */
    __s32 cfa_offset;
    __s16 rbp_offset;          /* rbp saved at CFA + rbp_offset; 0: rbp unchanged */
    __u8 kind;                 /* UNWIND_* */
    __u8 pad;
};

struct unwind_mapping {
    __u64 start;
    __u64 end;
    __u64 bias;                /* ELF virtual address = address - bias */
    __u32 table_start;         /* first row in unwind_rows */
    __u32 table_len;           /* rows; 0: no table */
};

struct unwind_process {
    __u32 slot;                /* mappings at unwind_mappings[slot * UNWIND_MAX_MAPPINGS ...] */
    __u32 count;
    __u32 epoch;               /* new (never 0) each time user space writes the process's mappings */
    __u32 pad;
};

/* A per-CPU cache of rules found by the two binary searches, by address and process epoch: a
 * hot loop's return addresses repeat from sample to sample, and a hit costs one lookup instead
 * of up to UNWIND_ROW_STEPS + 8. A new epoch (the process's mappings rewritten) misses. */
#define UNWIND_CACHE_SIZE 4096         /* entries per CPU (power of two), 24 bytes each */
#define UNWIND_RULE_NO_MAPPING 0x80    /* kinds only the cache holds: the address is in no mapping */
#define UNWIND_RULE_STOP 0x81          /* ... in a mapping whose table could not be loaded */
#define UNWIND_RULE_FRAME_POINTER 0x82 /* ... in a mapping without a table (JIT, no CFI) */
#define UNWIND_RULE_NO_ROW 0x83        /* ... before its table's first row */

struct unwind_cache_entry {
    __u64 pc;
    __u32 epoch;
    __s32 cfa_offset;
    __s16 rbp_offset;
    __u8 kind;                 /* UNWIND_* or UNWIND_RULE_* */
    __u8 pad[5];
};

/* ---- CPython frames (receiver/profiling/cpython.py) ----
 *
 * For a process running CPython, py_processes[tgid] says where its interpreter list is and the
 * version's offsets (a table in user space: 3.11, 3.12, 3.13 differ only in numbers). The walk
 * finds the sampled thread's PyThreadState in the first interpreter's thread list by its
 * native thread id, then follows current frame -> previous, recording each frame's code object
 * and instruction offset. User space names code objects and places each run of frames that one
 * C-level _PyEval_EvalFrameDefault call evaluates at that native frame. */
#ifndef PY_MAX_FRAMES
#define PY_MAX_FRAMES 0            /* 0: Python frames off; sampler.py passes 64 */
#endif
#define PY_FRAMES_PER_CALL 16      /* Python frames one walk_python_stack call walks */
#define PY_MAX_THREADS 64          /* thread states searched for the sampled thread */
#define PY_ENTRY_FLAG 1            /* entry_kind: a nonzero byte marks an eval call's first frame (3.11) */
#define PY_ENTRY_SHIM 2            /* entry_kind: a frame with byte == entry_value is a C-stack shim (3.12+) */
#define PY_NO_OFFSET 0xffff        /* frame_in_cframe when the thread state points at the frame itself */
#define PY_LASTI_ENTRY 0x80000000  /* py_lasti[i]: frame i is the first of its eval call */
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

/* py_stats[] slots */
#define PY_STAT_WALKED 0           /* samples of CPython processes whose thread state was found */
#define PY_STAT_NO_THREAD 1        /* ... whose sampled thread has no thread state (not a Python thread) */
#define PY_STAT_TRUNCATED 2        /* ... whose frame chain was longer than PY_MAX_FRAMES or unreadable */
#define PY_STAT_FRAMES 3           /* Python frames recorded */
#define PY_STATS 4

/* A user stack walked with tables, and (as a walked<g> value) its key's count. */
struct unwind_stack {
    __u64 count;               /* samples of its key (in walked<g>; set at insert) */
    __u32 len;                 /* addresses in ips[] */
    __u32 truncated;           /* 1: the walk stopped before the thread's first frame */
    __u64 ips[PROF_MAX_DEPTH];
#if PY_MAX_FRAMES
    __u32 py_len;              /* Python frames, innermost first */
    __u32 py_truncated;
    __u64 py_code[PY_MAX_FRAMES];     /* PyCodeObject addresses */
    __u32 py_lasti[PY_MAX_FRAMES];    /* byte offset of the instruction | PY_LASTI_ENTRY */
#endif
};

/* unwind_stats[] slots (samples of processes with a table, and why walks stopped) */
#define UNWIND_STAT_WALKED 0          /* user stacks walked with tables */
#define UNWIND_STAT_TRUNCATED 1       /* ... that stopped early: left the mappings, no or an unsupported rule, unreadable stack */
#define UNWIND_STAT_DEPTH_LIMIT 2     /* ... that reached PROF_MAX_DEPTH frames */
#define UNWIND_STAT_FP_STEPS 3        /* frames stepped with frame pointers (mapping without table) */
#define UNWIND_STAT_NO_TABLE 4        /* samples with a user stack in processes with no table loaded (frame-pointer stack) */
#define UNWIND_STAT_RULE_SEARCHES 5   /* frames whose rule was not in the per-CPU cache (binary searches) */
#define UNWIND_STATS 6

/* The first sample of a process not seen before (or since its exec). */
struct prof_new_process {
    __u32 kind;                /* PROF_REC_NEW_PROCESS */
    __u32 pid;
};

/* A code object first seen in a process's Python frames: user space reads its names at once,
 * while the process lives (a short-lived process is gone by the next drain). */
struct prof_py_code {
    __u32 kind;                /* PROF_REC_PY_CODE */
    __u32 pid;
    __u64 code;
};

/* One sample the maps could not hold (hash-bucket collision, full stack or counts map), with
 * both stacks copied whole; user space counts it like a drained key. */
struct prof_sample {
    __u32 kind;                /* PROF_REC_SAMPLE */
    __u32 pid;
    __u32 tid;
    __u32 user_bytes;          /* bytes of user[] filled */
    __u32 kernel_bytes;        /* bytes of kernel[] filled */
    __u32 pad;
    __u64 cgroup_id;
    char comm[PROF_COMM_LEN];
    __u64 user[PROF_MAX_DEPTH];
    __u64 kernel[PROF_MAX_DEPTH];
};

#endif
