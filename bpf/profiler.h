/* Records and map keys profiler.bpf.c shares with receiver/profiling/sampler.py (ctypes mirror). */
#ifndef EBPF_RECEIVER_PROFILER_H
#define EBPF_RECEIVER_PROFILER_H

#define PROF_COMM_LEN 16

/* settings[] slots */
#define PROF_SET_GENERATION 0     /* which counts/stacks pair the program writes: 0 or 1 */
#define PROF_SETTINGS 1

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
#define PROF_LOST_COUNTS_MAP_FULL 0   /* the counts map is full */
#define PROF_LOST_STACK_COLLISION 1   /* -EEXIST: another stack holds the hash bucket */
#define PROF_LOST_STACK_MAP_FULL 2    /* -ENOMEM: the stack map is full */
#define PROF_LOST_STACK_FAULT 3       /* -EFAULT with no kernel stack either: a sample without frames */
#define PROF_LOST_RINGBUF_FULL 4      /* a new-process notice; retried on the process's next sample */
#define PROF_N_LOST 5

/* Ring-buffer record kinds (the first field of each record) */
#define PROF_REC_NEW_PROCESS 1
#define PROF_REC_SAMPLE 2

#define PROF_MAX_DEPTH 127

/* A stack id of -1 means "not captured" (disabled, or kernel stack of a sample in user mode).
 * A user stack walked with unwind tables is in ustacks<g> under user_stack_hash (then
 * user_stack_id is -1); 0 means none. */
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
};

/* A user stack walked with tables: the key of ustacks<g> is a hash of it. */
struct unwind_stack {
    __u32 len;                 /* addresses in ips[] */
    __u32 truncated;           /* 1: the walk stopped before the thread's first frame */
    __u64 ips[PROF_MAX_DEPTH];
};

/* unwind_stats[] slots (samples of processes with a table, and why walks stopped) */
#define UNWIND_STAT_WALKED 0          /* user stacks walked with tables */
#define UNWIND_STAT_TRUNCATED 1       /* ... that stopped early: left the mappings, no or an unsupported rule, unreadable stack */
#define UNWIND_STAT_DEPTH_LIMIT 2     /* ... that reached PROF_MAX_DEPTH frames */
#define UNWIND_STAT_FP_STEPS 3        /* frames stepped with frame pointers (mapping without table) */
#define UNWIND_STAT_NO_TABLE 4        /* samples with a user stack in processes with no table loaded (frame-pointer stack) */
#define UNWIND_STATS 5

/* The first sample of a process not seen before (or since its exec). */
struct prof_new_process {
    __u32 kind;                /* PROF_REC_NEW_PROCESS */
    __u32 pid;
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
