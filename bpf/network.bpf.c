// TCP connections: one conns entry per socket from connect / SYN received to CLOSE, keyed by the
// socket address taken from the tracepoint fields (used only as a map key, never dereferenced).
// Bytes, retransmits and resets are added to the entry; at CLOSE the entry goes to the ring
// buffer as one record and is deleted. The owning process comes from a process-context event of
// the socket (connect, send, receive, close), since state changes of accepted sockets run in
// softirq on behalf of whichever task happens to be on the CPU.
//
// Filters (server port, peer address, process) live in maps filled by user space; which of them
// are active is fixed at load by -D flags, so an inactive filter costs no lookup.
#include "network.h"
#define N_LOST NET_N_LOST
#include "common.bpf.h"

/* BCC builds tcp:tcp_send_reset's argument struct from the running kernel's format, which names
 * an enum the (older) kernel headers may not define; its values are not used here. */
enum sk_rst_reason { NET_SK_RST_REASON_UNUSED = 0 };

#ifndef MAX_CONNECTIONS
#define MAX_CONNECTIONS 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024
#endif
#ifndef FILTER_PORTS
#define FILTER_PORTS 0
#endif
#ifndef FILTER_ADDRESSES
#define FILTER_ADDRESSES 0
#endif

#define NET_AF_INET 2
#define NET_AF_INET6 10
#define NET_IPPROTO_TCP 6

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_FIN_WAIT1 4
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(conns, u64, struct net_conn, MAX_CONNECTIONS);
BPF_HASH(filter_ports, u16, u8, 1024);
BPF_LPM_TRIE(filter_addrs, struct net_addr_key, u8, 1024);
MIRROR(net_event);
/* The agent's own tgid, written by user space at start: a map, not a -D, so the compiled program
 * is the same for every agent process and the compile cache can hold it. */
BPF_ARRAY(self_tgid, u32, 1);

/* The current task may own the connection: not this agent, and selected by the process filter. */
static __always_inline int process_selected(u32 tgid) {
    int zero = 0;
    u32 *self = self_tgid.lookup(&zero);
    if (self && tgid == *self)
        return 0;
#if FILTER_PROCESS
    return selected_current(tgid);
#else
    return 1;
#endif
}

static __always_inline int endpoint_selected(u16 server_port, const u8 *peer_addr) {
#if FILTER_PORTS
    if (!filter_ports.lookup(&server_port))
        return 0;
#endif
#if FILTER_ADDRESSES
    struct net_addr_key k = {.prefixlen = 128};
    __builtin_memcpy(k.addr, peer_addr, 16);
    if (!filter_addrs.lookup(&k))
        return 0;
#endif
    return 1;
}

/* Addresses and ports as the tracepoint has them now (a client's local port is only known once
 * the SYN is sent), IPv4 as IPv4-mapped IPv6. */
#define READ_ENDPOINTS(args, c) do {                                  \
        (c)->family = (args)->family;                                 \
        READ_TCP_ENDPOINTS(args, c);                                  \
    } while (0)

static __always_inline void set_owner(struct net_conn *c, u32 tgid) {
    c->pid = tgid;
    c->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&c->comm, sizeof(c->comm));
    c->flags |= NET_F_OWNER_KNOWN;
}

/* First process-context event of a socket whose owner is not known yet (an accepted one):
 * take the owner, or stop tracking when the process filter (or self-exclusion) rejects it.
 * Returns 0 when the entry was dropped. */
static __always_inline int claim_owner(u64 sk, struct net_conn *c) {
    if (c->flags & NET_F_OWNER_KNOWN)
        return 1;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!process_selected(tgid)) {
        conns.delete(&sk);
        return 0;
    }
    set_owner(c, tgid);
    return 1;
}

static __always_inline void emit(u64 sk, struct net_conn *c) {
    struct net_event *e = events.ringbuf_reserve(sizeof(struct net_event));
    if (!e) {
        count_lost(NET_LOST_RINGBUF_FULL);
        return;
    }
    e->sk = sk;
    __builtin_memcpy(&e->c, c, sizeof(struct net_conn));
    events.ringbuf_submit(e, 0);
}

/* A new connection (c has its endpoints): start tracking it when the filters select it. */
static __always_inline void track(u64 sk, struct net_conn *c, u8 direction) {
    u16 server_port = direction == NET_DIR_CLIENT ? c->peer_port : c->local_port;
    if (!endpoint_selected(server_port, c->peer_addr))
        return;
    if (direction == NET_DIR_CLIENT) {   /* connect(): process context */
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        if (!process_selected(tgid))
            return;
        set_owner(c, tgid);
    }
    c->direction = direction;
    c->start_ns = bpf_ktime_get_ns();
    struct net_conn *old = conns.lookup(&sk);
    if (old)   /* a closed entry still waiting for a late reset; its socket was reused */
        emit(sk, old);
    if (conns.update(&sk, c) != 0)
        count_lost(NET_LOST_CONNECTION_MAP_FULL);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != NET_IPPROTO_TCP)
        return 0;
    if (args->family != NET_AF_INET && args->family != NET_AF_INET6)
        return 0;
    u64 sk = (u64)args->skaddr;
    int oldstate = args->oldstate, newstate = args->newstate;
    if (newstate == TCP_SYN_SENT || (newstate == TCP_SYN_RECV && oldstate == TCP_LISTEN)) {
        struct net_conn fresh = {};
        READ_ENDPOINTS(args, &fresh);
        track(sk, &fresh, newstate == TCP_SYN_SENT ? NET_DIR_CLIENT : NET_DIR_SERVER);
        return 0;
    }
    struct net_conn *c = conns.lookup(&sk);
    if (!c || (c->flags & NET_F_CLOSED))
        return 0;
    READ_ENDPOINTS(args, c);
    if (newstate == TCP_ESTABLISHED) {
        c->flags |= NET_F_ESTABLISHED;
        return 0;
    }
    /* close() / shutdown() of an established connection: process context */
    if ((oldstate == TCP_ESTABLISHED && newstate == TCP_FIN_WAIT1) ||
        (oldstate == TCP_CLOSE_WAIT && newstate == TCP_LAST_ACK)) {
        claim_owner(sk, c);
        return 0;
    }
    if (newstate != TCP_CLOSE)
        return 0;
    c->end_ns = bpf_ktime_get_ns();
    /* Keep the entry a little longer (user space finishes it after a grace period) when
     * - an abort (SO_LINGER 0, unread data) set CLOSE: its reset is sent right after, and
     *   tcp_send_reset finishes the entry;
     * - an accepted socket was closed (e.g. reset by the peer) before its process used it: the
     *   process's next receive or send on it names the owner and finishes the entry. */
    int abrupt = oldstate == TCP_ESTABLISHED || oldstate == TCP_CLOSE_WAIT ||
                 oldstate == TCP_SYN_RECV || oldstate == TCP_FIN_WAIT1;
    if ((abrupt && !c->resets_received && !c->resets_sent) || !(c->flags & NET_F_OWNER_KNOWN)) {
        c->flags |= NET_F_CLOSED;
        return 0;
    }
    emit(sk, c);
    conns.delete(&sk);
    return 0;
}

/* send/receive system calls: process context, so they name the owner even when they fail. */
static __always_inline void add_bytes(u64 sk, int ret, int is_send, int flags) {
    struct net_conn *c = conns.lookup(&sk);
    if (!c || !claim_owner(sk, c))
        return;
    if (c->flags & NET_F_CLOSED) {   /* closed before its owner was known: complete now */
        emit(sk, c);
        conns.delete(&sk);
        return;
    }
    if (ret <= 0)
        return;
    if (is_send)
        __sync_fetch_and_add(&c->bytes_sent, (u64)ret);
    else if (!(flags & 2))   /* MSG_PEEK: read again later */
        __sync_fetch_and_add(&c->bytes_received, (u64)ret);
}

TRACEPOINT_PROBE(sock, sock_send_length) {
    if (args->protocol != NET_IPPROTO_TCP)
        return 0;
    add_bytes((u64)args->sk, args->ret, 1, args->flags);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length) {
    if (args->protocol != NET_IPPROTO_TCP)
        return 0;
    add_bytes((u64)args->sk, args->ret, 0, args->flags);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    u64 sk = (u64)args->skaddr;
    struct net_conn *c = conns.lookup(&sk);
    if (c)
        __sync_fetch_and_add(&c->retransmits, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    u64 sk = (u64)args->skaddr;
    struct net_conn *c = conns.lookup(&sk);
    if (c)
        __sync_fetch_and_add(&c->resets_received, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_send_reset) {
    u64 sk = (u64)args->skaddr;
    if (!sk)
        return 0;   /* a reset for a segment without a socket (e.g. to a closed port) */
    struct net_conn *c = conns.lookup(&sk);
    if (!c)
        return 0;
    __sync_fetch_and_add(&c->resets_sent, 1);
    if (c->flags & NET_F_CLOSED) {   /* the abort's reset: the connection is complete now */
        emit(sk, c);
        conns.delete(&sk);
    }
    return 0;
}
