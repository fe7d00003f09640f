/* Records process.bpf.c sends to receiver/sources/process.py (mirrored there with ctypes). */
#ifndef EBPF_RECEIVER_PROCESS_H
#define EBPF_RECEIVER_PROCESS_H

#define PROC_EVENT_EXEC 1
#define PROC_EVENT_EXIT 2
#define PROC_EVENT_FORK 3
#define PROC_EVENT_OOM_KILL 4

#define PROC_MAX_ARGS 20
#define PROC_ARG_LEN 128
#define PROC_PATH_LEN 256
#define PROC_COMM_LEN 16

/* lost[] slots: why an event never reached user space. */
#define PROC_LOST_RINGBUF_FULL 0
#define PROC_LOST_ARGS_MAP_FULL 1
#define PROC_LOST_EXIT_MAP_FULL 2
#define PROC_N_LOST 3

struct proc_event {           /* exit, fork, oom kill */
    __u32 type;
    __u32 pid;                /* the process (tgid); for fork: the child */
    __u32 tid;
    __u32 ppid;               /* for fork: the parent's tgid */
    __u64 ktime_ns;           /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 cgroup_id;
    __s32 exit_code;          /* from exit_group(2); -1 when unknown */
    __s32 exit_signal;        /* fatal signal delivered, 0 when none */
    char comm[PROC_COMM_LEN];
};

struct exec_args {            /* argv captured at sys_enter_execve(at), keyed by thread id */
    __u32 argc;               /* arguments captured (at most PROC_MAX_ARGS) */
    __u32 truncated;          /* 1 when argv had more than PROC_MAX_ARGS entries */
    char args[PROC_MAX_ARGS * PROC_ARG_LEN];   /* one dimension: BCC describes no 2-D arrays */
};

struct exec_event {
    struct proc_event hdr;
    char filename[PROC_PATH_LEN];
    struct exec_args argv;
};

struct exit_info {            /* per process (tgid), until it exits */
    __s32 code;
    __s32 signal;
};

#endif
