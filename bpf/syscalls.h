/* Records and map keys syscalls.bpf.c shares with receiver/sources/syscalls.py (ctypes mirror). */
#ifndef EBPF_RECEIVER_SYSCALLS_H
#define EBPF_RECEIVER_SYSCALLS_H

#define SC_COMM_LEN 16
#define SC_MAX_SLOTS 64

/* lost[] slots */
#define SC_LOST_RINGBUF_FULL 0
#define SC_LOST_START_MAP_FULL 1
#define SC_LOST_SERIES_MAP_FULL 2
#define SC_N_LOST 3

/* tgid 0 = all processes together; other tgids only for processes the filter selects. */
struct sc_key {
    __u32 tgid;
    __u32 nr;
};

struct sc_stat {
    __u64 count;
    __u64 sum_ns;
    __u64 min_ns;      /* 0 until the first call on this CPU */
    __u64 max_ns;
};

/* Host-wide series (tgid 0) for nr < SC_MAX_NR: one per-CPU array slot per syscall number,
 * stats and log2 histogram together (one lookup per call). */
#define SC_MAX_NR 512

struct sc_all {
    __u64 count;
    __u64 sum_ns;
    __u64 min_ns;      /* 0 until the first call on this CPU */
    __u64 max_ns;
    __u64 slots[SC_MAX_SLOTS];
};

struct sc_err_key {
    __u32 tgid;
    __u32 nr;
    __u32 err;         /* positive errno */
    __u32 pad;
};

struct sc_hist_key {
    __u32 tgid;
    __u32 nr;
    __u32 slot;        /* floor(log2(duration ns)): [2^slot, 2^(slot+1)) */
    __u32 pad;
};

struct sc_start {
    __u64 ts;          /* 0 once the matching exit was seen */
    __u32 nr;
    __u32 selected;    /* the process is selected by the filter */
};

/* The call in flight on a CPU: its start (ts 0: none), always the current thread's (a thread
 * switched out takes its call along). */
struct sc_inflight {
    __u64 ts;
    __u32 nr;
    __u32 selected;
    /* With a process filter: the filter's decision for the thread on this CPU is kept until
     * it is switched out, while sel_key equals the generation in sel_gen + 1 (0: none). */
    __u64 sel_key;
};

struct sc_slow_event {
    __u64 start_ns;    /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 end_ns;
    __s64 ret;
    __u32 pid;
    __u32 tid;
    __u32 nr;
    __u32 pad;
    char comm[SC_COMM_LEN];
};

#endif
