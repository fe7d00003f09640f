/* Records, map keys and constants that bpf/profiler.bpf.c (with profiler_native.bpf.h and
 * runtimes/<name>.bpf.h) shares with user space: receiver/profiling/abi.py is their one mirror. */
#ifndef EBPF_RECEIVER_PROFILER_H
#define EBPF_RECEIVER_PROFILER_H

#define PROF_COMM_LEN 16

/* settings[] slots */
#define PROF_SET_GENERATION 0     /* which counts/stacks pair the program writes: 0 or 1 */
/* Versions of unwind_processes/runtime_processes, new after each change: user space's (one writer,
 * the unwinder's thread) and the kernel's (exec and fork, atomically). A per-CPU copy of the last
 * sampled process's entries is used while both are unchanged (see process_cache). */
#define PROF_SET_TABLES_USER 1
#define PROF_SET_TABLES_KERNEL 2
/* Off-CPU (OFF_CPU=1): a switch-out is recorded when bpf_get_prandom_u32() <= this (0xffffffff:
 * every one; sampling probability p is (this + 1) / 2^32), and a block is counted when it lasted
 * at least PROF_SET_OFFCPU_MIN_US microseconds. Set by user space before the events attach. */
#define PROF_SET_OFFCPU_THRESHOLD 3
#define PROF_SET_OFFCPU_MIN_US 4
#define PROF_SETTINGS 5

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
#define PROF_LOST_OFFCPU_MAP_FULL 5   /* an off-CPU block the full offcpu<g> map could not take, nor the full ring buffer */
#define PROF_N_LOST 6

/* Ring-buffer record kinds (the first field of each record) */
#define PROF_REC_NEW_PROCESS 1
#define PROF_REC_SAMPLE 2
#define PROF_REC_RUNTIME_FRAME 3   /* a runtime frame id a process's stacks name for the first time */
#define PROF_REC_OFFCPU 4          /* an off-CPU block the full offcpu<g> map could not take */

#define PROF_MAX_DEPTH 127
#define PROF_DEPTH_MASK 127        /* PROF_MAX_DEPTH + 1 is a power of two: i & mask bounds an index */

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
    __u64 link_span;           /* REQ_LINKS: span id of the request the thread serves (req_links), 0 none */
    __u64 go_labels;           /* a Go process's running goroutine's label set (g.labels), 0 none */
};

/* ---- In-kernel unwinding with tables made from .eh_frame (receiver/profiling/unwind/) ----
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
#define UNWIND_MAPPING_STEPS 7 /* binary-search steps over UNWIND_MAX_MAPPINGS: log2(64) + 1 */
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

/* ---- Runtimes: interpreted or JIT-compiled code the native walk cannot name ----
 * (receiver/profiling/runtimes/; each runtime's walker is bpf/runtimes/<name>.bpf.h.)
 *
 * runtime_processes[tgid] says which runtime a process runs, as the slot of that runtime's walker
 * in unwind_programs (1 .. RUNTIME_SLOTS - 1; slot 0 is the native walker), and holds the
 * runtime's per-process data (where its state is, the version's offsets) in a layout the runtime's
 * header defines. After the native walk, a sample of such a process tail-calls that walker, which
 * records the runtime's frames as (id, aux) pairs: for CPython (code object, instruction offset).
 * User space names them and places them among the native frames. */
#ifndef RUNTIME_MAX_FRAMES
#define RUNTIME_MAX_FRAMES 0       /* 0: no runtime walker compiled in; sampler.py passes 64 */
#endif
#define UNWIND_NATIVE_SLOT 0       /* unwind_programs slot of walk_user_stack */
#define RUNTIME_SLOTS 8            /* unwind_programs slots: the native walker and up to 7 runtimes */
#define RUNTIME_DATA_BYTES 64      /* per-process data a runtime may keep in runtime_processes */
#define RUNTIME_AUX_LAST 0x80000000   /* rt_aux[i]: frame i ends its group (e.g. one eval call's frames) */
#define RUNTIME_CURSOR_START 1     /* unwind_state.rt_cursor before the walker's first call */

struct runtime_process {
    __u32 runtime;             /* the walker's unwind_programs slot; 0: none */
    __u32 pad;
    __u64 data[RUNTIME_DATA_BYTES / 8];
};

/* A user stack walked with tables, and (as a walked<g> value) its key's count. */
struct unwind_stack {
    __u64 count;               /* samples of its key (in walked<g>; set at insert) */
    __u32 len;                 /* addresses in ips[] */
    __u32 truncated;           /* 1: the walk stopped before the thread's first frame */
    __u64 ips[PROF_MAX_DEPTH];
#if RUNTIME_MAX_FRAMES
    __u32 rt_len;              /* runtime frames, innermost first */
    __u32 rt_truncated;        /* 1: the runtime's frame chain was cut short */
    __u32 rt_runtime;          /* whose frames: the runtime's unwind_programs slot */
    __u32 rt_pad;
    __u64 rt_id[RUNTIME_MAX_FRAMES];  /* what names the frame (CPython: its code object's address) */
    __u32 rt_aux[RUNTIME_MAX_FRAMES]; /* where in it (CPython: instruction offset) | RUNTIME_AUX_LAST */
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

/* ---- Off-CPU time (OFF_CPU=1) ----
 *
 * A thread going off the CPU (the context-switch software event, in its own context) has its
 * stacks taken as an on-CPU sample's are and kept in offcpu_start[tid] with the time; when it is
 * switched in again (sched:sched_switch, next_pid) the nanoseconds in between are added to
 * offcpu<g>[key], the key's user_stack_hash a hash of both stacks (stack ids -1), the value the
 * stacks themselves: no stack id has to outlive a generation. */
#define OFFCPU_STAT_RECORDED 0        /* switch-outs whose stacks were taken */
#define OFFCPU_STAT_UNSAMPLED 1       /* switch-outs sampling passed over */
#define OFFCPU_STAT_FILTERED 2        /* switch-outs of processes the filter does not select */
#define OFFCPU_STAT_NO_USER_STACK 3   /* switch-outs without a user stack (kernel threads): not profiled */
#define OFFCPU_STAT_COUNTED 4         /* blocks counted in offcpu<g> */
#define OFFCPU_STAT_SHORT 5           /* blocks shorter than the minimum: not counted */
#define OFFCPU_STATS 6

struct offcpu_value {
    __u64 ns;                  /* offcpu_start: when the thread went off; offcpu<g>: blocked ns summed */
    __u64 count;               /* offcpu<g>: blocks summed */
    __u32 kernel_len;          /* addresses in kernel[] */
    __u32 pad;
    __u64 kernel[PROF_MAX_DEPTH];
    struct unwind_stack user;  /* count unused; walked (or frame-pointer) user stack, runtime frames */
};

struct offcpu_start {
    struct prof_key key;
    struct offcpu_value v;
};

/* One off-CPU block (v.ns its nanoseconds, v.count 1) whose key the full offcpu<g> map could not
 * take, sent whole: user space counts it like a drained key. */
struct prof_offcpu_sample {
    __u32 kind;                /* PROF_REC_OFFCPU */
    __u32 pad;
    struct offcpu_start rec;
};

/* The first sample of a process not seen before (or since its exec). */
struct prof_new_process {
    __u32 kind;                /* PROF_REC_NEW_PROCESS */
    __u32 pid;
};

/* A runtime frame id first seen in a process's stacks: user space names it at once, while the
 * process lives (a short-lived process is gone by the next drain). */
struct prof_runtime_frame {
    __u32 kind;                /* PROF_REC_RUNTIME_FRAME */
    __u32 pid;
    __u64 id;
    __u32 runtime;             /* the runtime's unwind_programs slot */
    __u32 pad;
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
