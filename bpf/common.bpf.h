/* What every program of the agent shares: loss counting, the process filter, log2, and the
 * mirror maps that let user space check its ctypes structs against the compiler's layout.
 *
 * BCC rewrites map calls (lost.lookup()) only in the file it compiles, so the agent inlines this
 * header into each program before compiling (receiver/kernel/bcc.py, with #line markers).
 *
 * Before including it, a program defines N_LOST: the number of slots of its lost[] array, whose
 * names (<PREFIX>_LOST_<NAME> 0..N_LOST-1 in its .h) user space reads from the same header.
 * FILTER_PROCESS (-D at load, 0 or 1) says whether a process filter is configured: without one
 * no filter map is looked up. */
#ifndef EBPF_RECEIVER_COMMON_BPF_H
#define EBPF_RECEIVER_COMMON_BPF_H

#ifndef FILTER_PROCESS
#define FILTER_PROCESS 0
#endif

/* bpf_probe_read_user(_str) under other names: for every call it sees by those names, BCC's
 * rewriter reads and indexes all of /proc/kallsyms (to fall back to bpf_probe_read on kernels
 * before 5.5, which the agent does not support). That was half of the profiler's compile time,
 * and the kernel matrix's emulated guests pay it about fifty times over. */
static long (*probe_read_user)(void *dst, __u32 size, const void *unsafe_ptr) =
    (void *)BPF_FUNC_probe_read_user;
static long (*probe_read_user_str)(void *dst, __u32 size, const void *unsafe_ptr) =
    (void *)BPF_FUNC_probe_read_user_str;
#define bpf_probe_read_user probe_read_user
#define bpf_probe_read_user_str probe_read_user_str

/* A sock:inet_sock_set_state record's ports and addresses into (s)->local_port/peer_port and
 * (s)->local_addr/peer_addr[16], IPv4 as IPv4-mapped IPv6 (the network and http programs). A
 * macro: BCC defines the argument struct only at the probe. */
#define TCP_AF_INET 2
#define READ_TCP_ENDPOINTS(args, s) do {                              \
        (s)->local_port = (args)->sport;                              \
        (s)->peer_port = (args)->dport;                               \
        if ((args)->family == TCP_AF_INET) {                          \
            __builtin_memset((s)->local_addr, 0, 16);                 \
            __builtin_memset((s)->peer_addr, 0, 16);                  \
            (s)->local_addr[10] = (s)->local_addr[11] = 0xff;         \
            (s)->peer_addr[10] = (s)->peer_addr[11] = 0xff;           \
            __builtin_memcpy(&(s)->local_addr[12], (args)->saddr, 4); \
            __builtin_memcpy(&(s)->peer_addr[12], (args)->daddr, 4);  \
        } else {                                                      \
            __builtin_memcpy((s)->local_addr, (args)->saddr_v6, 16);  \
            __builtin_memcpy((s)->peer_addr, (args)->daddr_v6, 16);   \
        }                                                             \
    } while (0)
#define FILTER_COMM_LEN 16

BPF_PERCPU_ARRAY(lost, u64, N_LOST);

static __always_inline void count_lost(int reason) {
    u64 *n = lost.lookup(&reason);
    if (n)
        (*n)++;
}

/* Process filter: filled from user space (receiver/kernel/filters.py); a process is selected by
 * its tgid, its comm, or its cgroup v2 id. */
struct filter_comm_key {
    char comm[FILTER_COMM_LEN];
};

BPF_HASH(filter_pids, u32, u8, 1024);
BPF_HASH(filter_comms, struct filter_comm_key, u8, 1024);
BPF_HASH(filter_cgroups, u64, u8, 1024);

static __always_inline int selected_by(u32 tgid, const char *comm, u64 cgroup) {
    if (filter_pids.lookup(&tgid))
        return 1;
    struct filter_comm_key c;
    __builtin_memcpy(c.comm, comm, FILTER_COMM_LEN);
    if (filter_comms.lookup(&c))
        return 1;
    if (filter_cgroups.lookup(&cgroup))
        return 1;
    return 0;
}

/* The current task's process, by the filter. */
static __always_inline int selected_current(u32 tgid) {
    struct filter_comm_key c = {};
    bpf_get_current_comm(&c.comm, sizeof(c.comm));
    return selected_by(tgid, c.comm, bpf_get_current_cgroup_id());
}

/* floor(log2(v)) for v > 0, in five steps. */
static __always_inline u32 log2_u64(u64 v) {
    u32 r = 0;
    #pragma unroll
    for (int s = 32; s > 0; s >>= 1) {
        if (v >> s) {
            v >>= s;
            r += s;
        }
    }
    return r;
}

/* A one-entry map whose value is `type`: only so user space can read the compiler's layout of
 * a ring-buffer record (BCC describes map keys and values, not ring-buffer records). */
#define MIRROR(type) BPF_ARRAY(mirror_##type, struct type, 1)

#endif
