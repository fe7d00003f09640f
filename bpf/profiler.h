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

/* A stack id of -1 means "not captured" (disabled, or kernel stack of a sample in user mode). */
struct prof_key {
    __u32 pid;                 /* tgid */
    __u32 tid;
    __s32 user_stack_id;
    __s32 kernel_stack_id;
    __u64 cgroup_id;
    char comm[PROF_COMM_LEN];  /* the thread's comm */
};

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
