/* Records and map values http.bpf.c shares with receiver/sources/http.py (ctypes mirrors). */
#ifndef EBPF_RECEIVER_HTTP_H
#define EBPF_RECEIVER_HTTP_H

#define HTTP_COMM_LEN 16

/* lost[] slots: why bytes of a TCP stream never reached user space. A record lost this way marks
 * its socket, and the next record that arrives says so (HTTP_F_GAP): user space resynchronises
 * that connection instead of pairing across the hole. */
#define HTTP_LOST_RINGBUF_FULL 0
#define HTTP_LOST_CALL_MAP_FULL 1
#define HTTP_LOST_TLS_NO_SOCKET 2    /* TLS plaintext of an SSL whose socket no syscall inside the library showed */
#define HTTP_N_LOST 3

/* record kinds */
#define HTTP_EV_SEND 1          /* bytes the process sent */
#define HTTP_EV_RECV 2          /* bytes the process received */
#define HTTP_EV_CLOSE 3         /* the socket reached TCP CLOSE */

/* record flags */
#define HTTP_F_GAP 1            /* records of this socket were lost before this one */
#define HTTP_F_ENDPOINTS 2      /* ports and addresses are known (from a state change seen by the program) */
#define HTTP_F_TLS 4            /* the bytes are TLS plaintext, from uprobes on the TLS library */
#define HTTP_F_TLS_UNPARSED 8   /* HTTP_EV_CLOSE of a TLS connection whose plaintext no uprobe saw */

/* socket flags (http_sock.flags) */
#define HTTP_S_ENDPOINTS 1      /* endpoints from sock:inet_sock_set_state */
#define HTTP_S_SELECTED 2       /* its server port is in the port filter: send every buffer */
#define HTTP_S_IGNORED 4        /* not selected, or no longer HTTP/1 (set by the program or user space) */
#define HTTP_S_HTTP 8           /* a buffer started like HTTP/1: send every buffer from now on */
#define HTTP_S_GAP 16           /* a record was lost since the last one delivered */
#define HTTP_S_SELF 32          /* a connection this agent made (its local port is in self_ports) */
#define HTTP_S_TLS 64           /* TLS records on the wire: its syscall bytes are never sent */
#define HTTP_S_TLS_PLAIN 128    /* its plaintext was seen by the TLS library uprobes */

/* http_sock.seen */
#define HTTP_SEEN_FIRST 1       /* the first request-direction bytes of a connection seen from its start */

#define HTTP_DIR_CLIENT 1
#define HTTP_DIR_SERVER 2

/* What the program knows about one TCP socket, keyed by the socket's address (a key only, never
 * dereferenced). Addresses are IPv6 or IPv4-mapped IPv6; ports in host order. */
struct http_sock {
    __u64 conn_id;             /* bpf_ktime_get_ns() when the entry was made: with the key, one connection */
    __u16 local_port;
    __u16 peer_port;
    __u8 direction;            /* HTTP_DIR_*: from the state change; 0 unknown */
    __u8 flags;                /* HTTP_S_* */
    __u8 seen;                 /* HTTP_SEEN_*: what the program already decided from its bytes */
    __u8 pad;
    __u8 local_addr[16];
    __u8 peer_addr[16];
};

/* A read/write-family call in flight, from sys_enter to the socket tracepoint: one slot per
 * thread (thread id modulo the slots), owned by `id` while the call runs (0: free). */
struct http_call {
    __u64 id;                  /* bpf_get_current_pid_tgid() of the owner; 0: the slot is free */
    __u64 buf;                 /* the buffer, or the iovec array, in user memory */
    __u32 fd;
    __u32 count;               /* iovecs in the array (0: buf is one buffer) */
};

/* An SSL_read/SSL_write(_ex) call in flight, from its entry uprobe to its return uprobe, in
 * its thread's slot (as struct http_call). A syscall on a TCP socket made inside it (on the same
 * thread) names its socket. */
struct http_tls_call {
    __u64 id;                  /* the owner thread's pid_tgid; 0: the slot is free */
    __u64 ssl;                 /* the SSL * (a key only) */
    __u64 buf;                 /* the plaintext buffer in user memory */
    __u64 sizep;               /* _ex forms: where the library writes the byte count; 0 otherwise */
    __u64 sk;                  /* the socket ciphertext moved on inside this call; 0 none yet */
    __u32 fd;
    __u8 kind;                 /* HTTP_EV_SEND (SSL_write) or HTTP_EV_RECV (SSL_read) */
    __u8 depth;                /* nested calls of the same family inside the library */
    __u16 pad;
};

/* SSL * -> its socket, for calls that move no ciphertext (plaintext already buffered). */
struct http_tls_sock {
    __u64 sk;
    __u32 fd;
    __u32 pad;
};

/* Ring-buffer record: HTTP_EV_SEND/RECV are followed by `len` captured bytes (the first ones of
 * the `size` bytes the call moved); HTTP_EV_CLOSE by none. */
struct http_event {
    __u64 ts_ns;               /* bpf_ktime_get_ns() when the data moved */
    __u64 sk;
    __u64 conn_id;
    __u64 cgroup_id;
    __u32 pid;
    __u32 tid;
    __u32 fd;
    __u32 size;                /* bytes the call sent or received */
    __u16 len;                 /* bytes captured, at most the configured capture size */
    __u16 local_port;
    __u16 peer_port;
    __u8 kind;                 /* HTTP_EV_* */
    __u8 flags;                /* HTTP_F_* */
    __u8 direction;            /* HTTP_DIR_*, 0 unknown */
    __u8 pad[7];
    __u8 local_addr[16];
    __u8 peer_addr[16];
    char comm[HTTP_COMM_LEN];
    __u64 link_span;           /* req_links[tid] after this record (REQ_LINKS): the serving request's span id, 0 none */
};

#endif
