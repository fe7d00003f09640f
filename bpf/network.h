/* Records and map keys network.bpf.c shares with receiver/sources/network.py (ctypes mirror). */
#ifndef EBPF_RECEIVER_NETWORK_H
#define EBPF_RECEIVER_NETWORK_H

#define NET_COMM_LEN 16

/* lost[] slots: why a connection never reached user space (or reached it incomplete). */
#define NET_LOST_RINGBUF_FULL 0
#define NET_LOST_CONNECTION_MAP_FULL 1
#define NET_N_LOST 2

#define NET_DIR_CLIENT 1
#define NET_DIR_SERVER 2

/* flags */
#define NET_F_ESTABLISHED 1     /* reached ESTABLISHED */
#define NET_F_CLOSED 2          /* reached CLOSE; waiting for a reset that may follow (swept by user space) */
#define NET_F_OWNER_KNOWN 4     /* pid/comm/cgroup come from a process-context event of this socket */

/* One TCP connection, kept in the conns map from its first state change to CLOSE. Addresses are
 * IPv6 or IPv4-mapped IPv6 (::ffff:a.b.c.d); ports in host order. */
struct net_conn {
    __u64 start_ns;            /* bpf_ktime_get_ns() at connect / SYN received */
    __u64 end_ns;              /* at CLOSE; 0 while open */
    __u64 bytes_sent;
    __u64 bytes_received;
    __u64 cgroup_id;
    __u32 retransmits;
    __u32 resets_sent;
    __u32 resets_received;
    __u32 pid;                 /* owning process (tgid); 0 until a process-context event */
    __u16 local_port;
    __u16 peer_port;
    __u16 family;              /* AF_INET or AF_INET6 */
    __u8 direction;            /* NET_DIR_* */
    __u8 flags;                /* NET_F_* */
    __u8 local_addr[16];
    __u8 peer_addr[16];
    char comm[NET_COMM_LEN];
};

/* Ring-buffer record: one finished connection. */
struct net_event {
    __u64 sk;                  /* socket address: only an identity, never dereferenced */
    struct net_conn c;
};

/* LPM trie key for the address filter: IPv6 or IPv4-mapped IPv6. */
struct net_addr_key {
    __u32 prefixlen;
    __u8 addr[16];
};

#endif
