// HTTP/1.x over plaintext TCP: the first bytes of every buffer a process sends or receives on a
// TCP socket that carries HTTP/1, copied to a ring buffer for user space to parse and pair
// (receiver/protocols/http1.py). No kernel struct is read:
//
// - sys_enter of read/write/readv/writev/recvfrom/sendto/recvmsg/sendmsg keeps the call's user
//   buffer (or iovec array) by thread id; sys_exit forgets it;
// - inside such a call, sock:sock_send_length / sock_recv_length fire when the call moves data
//   on a socket, with the socket's address (a key, never dereferenced), family, protocol and the
//   byte count: so a call on a TCP socket is told from one on a file or pipe by the tracepoint
//   itself, also for sockets opened before the agent started, and the data is copied there;
// - sock:inet_sock_set_state gives a new connection's ports, addresses and side (connect or
//   accept), which the port filter needs, and its CLOSE, which tells user space to finish it.
//
// A socket is sent to user space once one of its buffers starts like HTTP/1 (a method or
// "HTTP") or HTTP/2 (the preface, or a whole HEADERS frame: a connection found mid-way), or from
// its first byte when its server port is in the port filter (so that non-HTTP
// bytes on an HTTP port are seen and counted). Filters (server ports, process) live in maps.
#include "http.h"
#define N_LOST HTTP_N_LOST
#include "common.bpf.h"

#ifndef CAPTURE_BYTES
#define CAPTURE_BYTES 1024
#endif
#ifndef CAPTURE_MAX            /* a power of two >= CAPTURE_BYTES: bounds for the verifier */
#define CAPTURE_MAX 1024
#endif
#ifndef MAX_SOCKETS
#define MAX_SOCKETS 65536
#endif
#ifndef MAX_CALLS
#define MAX_CALLS 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024
#endif
#ifndef FILTER_PORTS
#define FILTER_PORTS 0
#endif
#ifndef WAKE_EVERY              /* wake the reader once per this many records of a CPU */
#define WAKE_EVERY 32
#endif
#define MAX_IOV 32             /* gRPC C-core writes one unary call's frames as 26 iovecs */
#define HTTP_MSG_PEEK 2

#define HTTP_AF_INET 2
#define HTTP_AF_INET6 10
#define HTTP_IPPROTO_TCP 6
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7
#define TCP_LISTEN 10

struct http_record {
    struct http_event h;
    u8 data[CAPTURE_MAX * 2];
    u32 unwoken;               /* records this CPU sent since it last woke the reader (never sent) */
};

struct http_iovec {            /* struct iovec: user ABI */
    u64 base;
    u64 len;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_TABLE("lru_hash", u64, struct http_sock, socks, MAX_SOCKETS);
/* Calls in flight, one slot per thread (thread id modulo MAX_CALLS): an array lookup on every
 * read/write of the host instead of a hash update and delete. A slot another thread's call
 * holds is not taken (call_map_full). */
BPF_ARRAY(calls, struct http_call, MAX_CALLS);
BPF_PERCPU_ARRAY(scratch, struct http_record, 1);
BPF_HASH(filter_ports, u16, u8, 1024);
BPF_HASH(self_ports, u16, u8, 1024);   /* local ports of this agent's own connections */
BPF_ARRAY(tls_calls, struct http_tls_call, MAX_CALLS);
BPF_TABLE("lru_hash", u64, struct http_tls_sock, tls_ssls, MAX_SOCKETS);
#if REQ_LINKS
/* Thread id -> the span id of the request it serves (receiver/profiling/links.py): set when a
 * server thread reads a request's first bytes, deleted when it writes the response's; the
 * profiler reads it through the same pin. */
BPF_TABLE_PINNED("hash", u32, u64, req_links, REQ_LINKS_MAX, REQ_LINKS_PIN);
#endif
#if TRACES_CTX
/* OBI's trace context (sources.http.traces_ctx_write): pid_tgid -> trace and span ids. User space
 * writes the serving thread's entry when it parses the request head; deleted here with the
 * response, when it still holds this request's span id (an entry of OBI's is left alone). */
struct traces_ctx_v1 { u8 trace_id[16]; u8 span_id[8]; };
BPF_TABLE_PINNED("lru_hash", u64, struct traces_ctx_v1, traces_ctx_v1, TRACES_CTX_MAX, TRACES_CTX_PIN);
#endif
MIRROR(http_event);
MIRROR(http_sock);
/* The agent's own tgid, written by user space at start: a map, not a -D, so the compiled program
 * is the same for every agent process and the compile cache can hold it. */
BPF_ARRAY(self_tgid, u32, 1);

static __always_inline u32 agent_tgid(void) {
    int zero = 0;
    u32 *self = self_tgid.lookup(&zero);
    return self ? *self : 0;
}

/* ------------------------------------------------------------------ calls in flight */

/* Whether the process's sockets are watched: never the agent's own, and only those the process
 * filter selects. */
static __always_inline int watched(u32 tgid) {
    if (tgid == agent_tgid())
        return 0;
#if FILTER_PROCESS
    if (!selected_current(tgid))
        return 0;
#endif
    return 1;
}

/* The slot of the calling thread in `calls` or `tls_calls`. */
static __always_inline u32 call_slot(u64 id) {
    return (u32)id % MAX_CALLS;
}

static __always_inline void enter(u32 fd, u64 buf, u32 iovs) {
    u64 id = bpf_get_current_pid_tgid();
    if (!watched(id >> 32))
        return;
    u32 slot = call_slot(id);
    struct http_call *c = calls.lookup(&slot);
    if (!c)
        return;
    if (c->id && c->id != id) {   /* another thread's call in flight holds the slot */
        count_lost(HTTP_LOST_CALL_MAP_FULL);
        return;
    }
    c->buf = buf;
    c->fd = fd;
    c->count = iovs;
    c->id = id;
}

static __always_inline void enter_msg(u32 fd, u64 msg) {
    u64 iov[2];                /* struct user_msghdr: msg_iov at 16, msg_iovlen at 24 (user ABI) */
    if (bpf_probe_read_user(iov, sizeof(iov), (void *)(msg + 16)) != 0 || iov[1] == 0)
        return;
    enter(fd, iov[0], iov[1] > MAX_IOV ? MAX_IOV : (u32)iov[1]);
}

static __always_inline void leave(void) {
    u64 id = bpf_get_current_pid_tgid();
    u32 slot = call_slot(id);
    struct http_call *c = calls.lookup(&slot);
    if (c && c->id == id)
        c->id = 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { enter(args->fd, (u64)args->buf, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { enter(args->fd, (u64)args->buf, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { enter(args->fd, (u64)args->ubuf, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { enter(args->fd, (u64)args->buff, 0); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) {
    if (args->vlen)
        enter(args->fd, (u64)args->vec, args->vlen > MAX_IOV ? MAX_IOV : (u32)args->vlen);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_enter_writev) {
    if (args->vlen)
        enter(args->fd, (u64)args->vec, args->vlen > MAX_IOV ? MAX_IOV : (u32)args->vlen);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { enter_msg(args->fd, (u64)args->msg); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { enter_msg(args->fd, (u64)args->msg); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { leave(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { leave(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { leave(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { leave(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { leave(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { leave(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { leave(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { leave(); return 0; }

/* ------------------------------------------------------------------ data on a TCP socket */

#define WORD(a, b, c, d) ((u32)(a) | (u32)(b) << 8 | (u32)(c) << 16 | (u32)(d) << 24)

/* The first four bytes of an HTTP/1 request ("GET ", "POST", ...) or response ("HTTP"). */
static __always_inline int looks_http(u32 w) {
    return w == WORD('G', 'E', 'T', ' ') || w == WORD('P', 'O', 'S', 'T') || w == WORD('P', 'U', 'T', ' ') ||
           w == WORD('H', 'E', 'A', 'D') || w == WORD('D', 'E', 'L', 'E') || w == WORD('P', 'A', 'T', 'C') ||
           w == WORD('O', 'P', 'T', 'I') || w == WORD('C', 'O', 'N', 'N') || w == WORD('T', 'R', 'A', 'C') ||
           w == WORD('H', 'T', 'T', 'P') || w == WORD('P', 'R', 'I', ' ');   /* the HTTP/2 preface */
}

/* A buffer that starts with a whole HTTP/2 HEADERS frame (END_HEADERS, HEADERS flags only, a
 * client-initiated stream): how an HTTP/2 connection opened before the program was attached is
 * found mid-way, at its next request or response (receiver/protocols/http2.py checks the rest). */
static __always_inline int looks_h2_headers(u32 w, u64 p, int ret) {
    u32 len = (w & 0xff) << 16 | (w & 0xff00) | (w >> 16 & 0xff);   /* w: the first four bytes */
    if ((w >> 24) != 1 || !len || len > 16384 || len + 9 > (u32)ret || !p)
        return 0;              /* not a HEADERS frame: most buffers end here, with no second read */
    u8 h[9] = {};
    if (bpf_probe_read_user(h, sizeof(h), (void *)p) != 0)
        return 0;
    return (h[4] & 0x4) && !(h[4] & 0xd2) && !(h[5] & 0x80) && (h[8] & 1);
}

static __always_inline u32 copy_buffer(struct http_record *r, u64 buf, u32 want) {
    u64 n = want;
    asm volatile("" : "+r"(n));   /* keep the bound check on this register (the verifier needs it) */
    if (n > CAPTURE_MAX)
        n = CAPTURE_MAX;
    if (n == 0 || bpf_probe_read_user(r->data, n, (void *)buf) != 0)
        return 0;
    return n;
}

static __always_inline u32 copy_iovecs(struct http_record *r, u64 vec, u32 count, u32 want) {
    u32 off = 0;
#pragma unroll
    for (int i = 0; i < MAX_IOV; i++) {
        if (i >= count || off >= want)
            break;
        struct http_iovec v;
        if (bpf_probe_read_user(&v, sizeof(v), (void *)(vec + i * sizeof(v))) != 0)
            break;
        u64 n = v.len;
        if (n > want - off)
            n = want - off;
        if (n > CAPTURE_MAX)
            n = CAPTURE_MAX;
        if (n == 0)
            continue;
        if (bpf_probe_read_user(&r->data[off & (CAPTURE_MAX - 1)], n, (void *)v.base) != 0)
            break;
        off += n;
    }
    return off;
}

/* The first bytes of a TLS handshake record (type 22, version 3.x): a TLS connection. */
static __always_inline int looks_tls(u32 w) {
    return (w & 0xffff) == 0x0316 && ((w >> 16) & 0xff) <= 4;
}

/* The entry of socket `sk`, made with `flags` when the program has none yet (a socket opened
 * before it was attached), else with `flags` added. */
static __always_inline struct http_sock *mark_sock(u64 sk, struct http_sock *s, u8 flags) {
    if (s) {
        s->flags |= flags;
        return s;
    }
    struct http_sock fresh = {.conn_id = bpf_ktime_get_ns(), .flags = flags};
    socks.update(&sk, &fresh);
    return socks.lookup(&sk);
}

/* One record of `ret` bytes moved on socket `sk`; the first of them read from `buf` (an iovec
 * array of `iovs` entries when iovs > 0; nothing when buf is 0). */
static __always_inline void emit(struct http_sock *s, u64 sk, u64 id, u32 fd, u64 buf, u32 iovs, u32 ret,
                                 u8 kind, u8 flags) {
    u32 zero = 0;
    struct http_record *r = scratch.lookup(&zero);
    if (!r)
        return;
    u32 want = ret < CAPTURE_BYTES ? ret : CAPTURE_BYTES;
    u32 len = !buf ? 0 : iovs ? copy_iovecs(r, buf, iovs, want) : copy_buffer(r, buf, want);
    struct http_event *h = &r->h;
    h->ts_ns = bpf_ktime_get_ns();
    h->sk = sk;
    h->conn_id = s->conn_id;
    h->cgroup_id = bpf_get_current_cgroup_id();
    h->pid = id >> 32;
    h->tid = (u32)id;
    h->fd = fd;
    h->size = ret;
    h->len = len;
    h->local_port = s->local_port;
    h->peer_port = s->peer_port;
    h->kind = kind;
    h->flags = flags | ((s->flags & HTTP_S_GAP) ? HTTP_F_GAP : 0) |
               ((s->flags & HTTP_S_ENDPOINTS) ? HTTP_F_ENDPOINTS : 0);
    h->direction = s->direction;
    __builtin_memcpy(h->local_addr, s->local_addr, 16);
    __builtin_memcpy(h->peer_addr, s->peer_addr, 16);
    bpf_get_current_comm(&h->comm, sizeof(h->comm));
    h->link_span = 0;
#if REQ_LINKS
    {
        u32 tid = (u32)id;
        u32 w = 0;
        if (len >= 4)
            __builtin_memcpy(&w, r->data, 4);
        int request = looks_http(w) && w != WORD('H', 'T', 'T', 'P') && w != WORD('P', 'R', 'I', ' ');
        if (kind == HTTP_EV_RECV && request && s->direction != HTTP_DIR_CLIENT) {
            /* REQ_LINKS_THRESHOLD: the share of requests linked (sources.profiler.
             * request_links_probability) times 2^32 - 1; an unlinked request's samples stay
             * unlinked (user space counts it as not_linked). */
            if (REQ_LINKS_THRESHOLD == 0xffffffffu || bpf_get_prandom_u32() <= REQ_LINKS_THRESHOLD) {
                u64 span = ((u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
                span |= 1;         /* never 0: 0 means no link */
                if (req_links.update(&tid, &span) == 0)   /* fails when REQ_LINKS_MAX threads hold one */
                    h->link_span = span;
            } else {
                req_links.delete(&tid);
            }
        } else if (kind == HTTP_EV_SEND && (s->direction == HTTP_DIR_SERVER ||
                                            (!s->direction && w == WORD('H', 'T', 'T', 'P')))) {
#if TRACES_CTX
            u64 *served = req_links.lookup(&tid);
            struct traces_ctx_v1 *ctx = served ? traces_ctx_v1.lookup(&id) : 0;
            u64 held = 0;
            if (ctx)
                __builtin_memcpy(&held, ctx->span_id, 8);
            if (ctx && held == *served)
                traces_ctx_v1.delete(&id);
#endif
            req_links.delete(&tid);
        } else {
            u64 *cur = req_links.lookup(&tid);
            if (cur)
                h->link_span = *cur;
        }
    }
#endif
    u32 size = sizeof(struct http_event) + (len & (CAPTURE_MAX * 2 - 1));
    /* A wake-up per record costs the kernel an irq_work and the reader a poll round per record:
     * wake it once per WAKE_EVERY records of this CPU; the reader also drains every 100 ms. */
    u64 wake = BPF_RB_NO_WAKEUP;
    if (++r->unwoken >= WAKE_EVERY) {
        r->unwoken = 0;
        wake = BPF_RB_FORCE_WAKEUP;
    }
    if (events.ringbuf_output(r, size, wake) != 0) {
        count_lost(HTTP_LOST_RINGBUF_FULL);
        s->flags |= HTTP_S_GAP;
    } else if (s->flags & HTTP_S_GAP) {
        s->flags &= ~HTTP_S_GAP;
    }
}

static __always_inline void on_data(u64 sk, int ret, int flags, u8 kind) {
    u64 id = bpf_get_current_pid_tgid();
    u32 slot = call_slot(id);
    struct http_call c = {};
    struct http_call *call = calls.lookup(&slot);
    if (call && call->id == id) {
        c = *call;
        call->id = 0;
    } else {
        call = 0;
    }
    struct http_sock *s = socks.lookup(&sk);
    struct http_tls_call *t = tls_calls.lookup(&slot);
    if (t && t->id == id) {
        /* Ciphertext moved inside SSL_read/SSL_write on this thread: this is the SSL's socket.
         * Its plaintext comes from the library's return uprobe; these bytes are never sent. */
        if (!t->sk) {
            t->sk = sk;
            t->fd = c.fd;
        }
        mark_sock(sk, s, HTTP_S_TLS);
        return;
    }
    if (ret <= 0 || (kind == HTTP_EV_RECV && (flags & HTTP_MSG_PEEK)))
        return;                /* nothing moved, or it will be read again */
    if (s && (s->flags & (HTTP_S_IGNORED | HTTP_S_TLS)))
        return;
    if (!call) {
        /* Data moved by a call whose buffer is not known here (sendfile, splice, io_uring,
         * sendmmsg, or a process the filter does not select): on a socket that is sent to user
         * space, its byte count keeps the framing. */
        if (!s || !(s->flags & (HTTP_S_SELECTED | HTTP_S_HTTP)))
            return;
        if (!watched(id >> 32))
            return;
    } else if (!s || !(s->flags & HTTP_S_HTTP)) {
        /* The socket's first bytes decide: HTTP/1 is sent from now on, a TLS handshake never
         * (its plaintext may come from the TLS uprobes); anything else only when the socket's
         * server port is selected, so that user space sees and counts it. */
        int selected = s && (s->flags & HTTP_S_SELECTED);
        /* The first bytes a connection seen from its start carries towards its server (what
         * the client sends; TLS and HTTP/2 servers may speak first) decide for good: a socket
         * that is not HTTP then is ignored, its later calls cost a lookup. */
        int first_request = s && (s->flags & HTTP_S_ENDPOINTS) && !(s->seen & HTTP_SEEN_FIRST) && ret >= 4 &&
                            (kind == HTTP_EV_SEND) == (s->direction == HTTP_DIR_CLIENT);
        u64 first = c.buf;
        u32 w = 0;
        if (c.count && bpf_probe_read_user(&first, sizeof(first), (void *)c.buf) != 0)
            first = 0;
        if (ret < 4 || !first || bpf_probe_read_user(&w, sizeof(w), (void *)first) != 0)
            w = 0;
        if (looks_http(w) || looks_h2_headers(w, first, ret)) {
            s = mark_sock(sk, s, HTTP_S_HTTP);
        } else if (looks_tls(w)) {
            mark_sock(sk, s, HTTP_S_TLS);
            return;
        } else if (!selected) {
            if (first_request && w)
                s->flags |= HTTP_S_IGNORED;
            return;
        }
        if (first_request)
            s->seen |= HTTP_SEEN_FIRST;
        if (!s)
            return;
    }
    emit(s, sk, id, c.fd, c.buf, c.count, ret, kind, 0);
}

TRACEPOINT_PROBE(sock, sock_send_length) {
    if (args->protocol == HTTP_IPPROTO_TCP)
        on_data((u64)args->sk, args->ret, args->flags, HTTP_EV_SEND);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length) {
    if (args->protocol == HTTP_IPPROTO_TCP)
        on_data((u64)args->sk, args->ret, args->flags, HTTP_EV_RECV);
    return 0;
}

/* ------------------------------------------------------------------ connections */


TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != HTTP_IPPROTO_TCP)
        return 0;
    if (args->family != HTTP_AF_INET && args->family != HTTP_AF_INET6)
        return 0;
    u64 sk = (u64)args->skaddr;
    int oldstate = args->oldstate, newstate = args->newstate;
    if (newstate == TCP_SYN_SENT || (newstate == TCP_SYN_RECV && oldstate == TCP_LISTEN)) {
        struct http_sock fresh = {.conn_id = bpf_ktime_get_ns(), .flags = HTTP_S_ENDPOINTS};
        READ_TCP_ENDPOINTS(args, &fresh);
        fresh.direction = newstate == TCP_SYN_SENT ? HTTP_DIR_CLIENT : HTTP_DIR_SERVER;
        if (newstate == TCP_SYN_SENT && (bpf_get_current_pid_tgid() >> 32) == agent_tgid())
            fresh.flags |= HTTP_S_SELF | HTTP_S_IGNORED;   /* connect() runs in the agent's context */
        /* The accepting side of the agent's own connection (e.g. a Collector receiving its
         * OTLP/HTTP export on this host): never reported, so that exporting cannot feed itself. */
        if (newstate == TCP_SYN_RECV && self_ports.lookup(&fresh.peer_port))
            fresh.flags |= HTTP_S_IGNORED;
#if FILTER_PORTS
        u16 server_port = fresh.direction == HTTP_DIR_CLIENT ? fresh.peer_port : fresh.local_port;
        fresh.flags |= filter_ports.lookup(&server_port) ? HTTP_S_SELECTED : HTTP_S_IGNORED;
#endif
        socks.update(&sk, &fresh);   /* also replaces the entry of an earlier socket at this address */
        return 0;
    }
    struct http_sock *s = socks.lookup(&sk);
    if (!s)
        return 0;
    if (newstate == TCP_ESTABLISHED && (s->flags & HTTP_S_ENDPOINTS)) {
        READ_TCP_ENDPOINTS(args, s);   /* a client's local port is chosen after SYN_SENT */
        if (s->flags & HTTP_S_SELF) {
            u8 one = 1;
            u16 port = s->local_port;
            self_ports.update(&port, &one);
        }
        return 0;
    }
    if (newstate != TCP_CLOSE)
        return 0;
    if (s->flags & HTTP_S_SELF) {
        u16 port = s->local_port;
        self_ports.delete(&port);
    }
    if ((s->flags & (HTTP_S_HTTP | HTTP_S_SELECTED | HTTP_S_TLS)) && !(s->flags & HTTP_S_IGNORED)) {
        struct http_event *e = events.ringbuf_reserve(sizeof(struct http_event));
        if (e) {
            __builtin_memset(e, 0, sizeof(*e));
            e->ts_ns = bpf_ktime_get_ns();
            e->sk = sk;
            e->conn_id = s->conn_id;
            e->kind = HTTP_EV_CLOSE;
            if ((s->flags & (HTTP_S_TLS | HTTP_S_TLS_PLAIN)) == HTTP_S_TLS)
                e->flags = HTTP_F_TLS_UNPARSED;
            events.ringbuf_submit(e, 0);
        } else {
            count_lost(HTTP_LOST_RINGBUF_FULL);   /* user space ends the connection when idle */
        }
    }
    socks.delete(&sk);
    return 0;
}

/* ------------------------------------------------------------------ TLS library uprobes */

/* SSL_read(ssl, buf, num) / SSL_write(ssl, buf, num) return the bytes moved; the _ex forms
 * (ssl, buf, num, size_t *moved) return 1 and write the count. The user space attaches these
 * to every OpenSSL 3 libssl a process maps (receiver/sources/http_tls.py). */
/* The registers a uprobe program gets (the kernel's pt_regs, whose layout is the user ABI of
 * ptrace): spelled out here, as the program reads no kernel headers' structs. */
#if defined(bpf_target_arm64)
struct http_regs { u64 regs[31]; u64 sp; u64 pc; u64 pstate; };
#define ARG1(r) ((r)->regs[0])
#define ARG2(r) ((r)->regs[1])
#define ARG4(r) ((r)->regs[3])
#define RET(r) ((r)->regs[0])
#else
struct http_regs {
    u64 r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};
#define ARG1(r) ((r)->di)
#define ARG2(r) ((r)->si)
#define ARG4(r) ((r)->cx)
#define RET(r) ((r)->ax)
#endif

static __always_inline void tls_enter(struct http_regs *ctx, u8 kind, int ex) {
    u64 id = bpf_get_current_pid_tgid();
    if (!watched(id >> 32))
        return;
    u32 slot = call_slot(id);
    struct http_tls_call *t = tls_calls.lookup(&slot);
    if (!t)
        return;
    if (t->id == id) {         /* e.g. SSL_read calling SSL_read_ex inside the library */
        if (t->depth < 255)
            t->depth++;
        return;
    }
    if (t->id) {               /* another thread's call in flight holds the slot */
        count_lost(HTTP_LOST_CALL_MAP_FULL);
        return;
    }
    t->ssl = ARG1(ctx);
    t->buf = ARG2(ctx);
    t->sizep = ex ? ARG4(ctx) : 0;
    t->sk = 0;
    t->fd = 0;
    t->kind = kind;
    t->depth = 0;
    t->id = id;
}

static __always_inline void tls_exit(struct http_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 slot = call_slot(id);
    struct http_tls_call *t = tls_calls.lookup(&slot);
    if (!t || t->id != id)
        return;
    if (t->depth) {
        t->depth--;
        return;
    }
    struct http_tls_call c = *t;
    t->id = 0;
    /* SSL_read/SSL_write and the _ex forms return an int: -1 (an error, or WANT_READ on a
     * non-blocking socket) is 0xffffffff in a zero-extended rax, not a byte count. */
    long rc = (int)RET(ctx);
    u64 moved = 0;
    if (c.sizep) {
        if (rc != 1 || bpf_probe_read_user(&moved, sizeof(moved), (void *)c.sizep) != 0)
            return;
    } else if (rc > 0) {
        moved = rc;
    }
    if (moved == 0)
        return;
    struct http_tls_sock ts = {.sk = c.sk, .fd = c.fd};
    if (c.sk) {
        tls_ssls.update(&c.ssl, &ts);
    } else {
        struct http_tls_sock *known = tls_ssls.lookup(&c.ssl);
        if (!known) {
            count_lost(HTTP_LOST_TLS_NO_SOCKET);
            return;
        }
        ts = *known;
    }
    u64 sk = ts.sk;
    struct http_sock *s = mark_sock(sk, socks.lookup(&sk), HTTP_S_TLS);
    if (!s || (s->flags & HTTP_S_IGNORED))
        return;
    if (!(s->flags & (HTTP_S_HTTP | HTTP_S_SELECTED))) {
        u32 w = 0;
        if (moved < 4 || bpf_probe_read_user(&w, sizeof(w), (void *)c.buf) != 0 || !looks_http(w)) {
            s->flags |= HTTP_S_TLS_PLAIN;   /* seen, but not HTTP/1 */
            return;
        }
    }
    s->flags |= HTTP_S_TLS_PLAIN | HTTP_S_HTTP;
    emit(s, sk, id, ts.fd, c.buf, 0, moved > 0xffffffff ? 0xffffffff : (u32)moved, c.kind, HTTP_F_TLS);
}

int tls_read_enter(struct http_regs *ctx) { tls_enter(ctx, HTTP_EV_RECV, 0); return 0; }
int tls_read_ex_enter(struct http_regs *ctx) { tls_enter(ctx, HTTP_EV_RECV, 1); return 0; }
int tls_write_enter(struct http_regs *ctx) { tls_enter(ctx, HTTP_EV_SEND, 0); return 0; }
int tls_write_ex_enter(struct http_regs *ctx) { tls_enter(ctx, HTTP_EV_SEND, 1); return 0; }
int tls_return(struct http_regs *ctx) { tls_exit(ctx); return 0; }
