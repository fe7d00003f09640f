// Process lifecycle: exec (with argv), exit (with exit code or fatal signal), fork, OOM kill.
// Reads only tracepoint fields and helpers, never kernel struct layouts, so mismatched headers
// cannot change what it reads. Every record that cannot be delivered is counted in lost[].
#include "process.h"
#define N_LOST PROC_N_LOST
#include "common.bpf.h"

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(exec_argv, u32, struct exec_args, MAX_INFLIGHT_EXECS);   /* tid → argv, exec in flight */
BPF_HASH(exit_info, u32, struct exit_info, MAX_TRACKED_EXITS);    /* tgid → exit code/signal */
BPF_PERCPU_ARRAY(heap, struct exec_args, 1);                      /* scratch: too big for the stack */
MIRROR(proc_event);
MIRROR(exec_event);
/* target thread id → the fatal signal generated for it (signal:signal_generate), until the
 * thread takes it or exits. LRU: a signal never taken cannot fill it. */
BPF_TABLE("lru_hash", u32, s32, fatal_sent, MAX_TRACKED_EXITS);

static __always_inline void fill_header(struct proc_event *e, u32 type) {
    u64 id = bpf_get_current_pid_tgid();
    e->type = type;
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->ppid = 0;
    e->ktime_ns = bpf_ktime_get_ns();
    e->cgroup_id = bpf_get_current_cgroup_id();
    e->exit_code = -1;
    e->exit_signal = 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
}

static __always_inline int capture_argv(const char *const *argv) {
    u32 zero = 0;
    u32 tid = bpf_get_current_pid_tgid();
    struct exec_args *a = heap.lookup(&zero);
    if (!a)
        return 0;
    a->argc = 0;
    a->truncated = 0;
    const char *p = NULL;
#pragma unroll
    for (int i = 0; i < PROC_MAX_ARGS; i++) {
        p = NULL;
        bpf_probe_read_user(&p, sizeof(p), &argv[i]);
        if (!p)
            break;
        bpf_probe_read_user_str(&a->args[i * PROC_ARG_LEN], PROC_ARG_LEN, p);
        a->argc = i + 1;
    }
    if (p) {
        const char *more = NULL;
        bpf_probe_read_user(&more, sizeof(more), &argv[PROC_MAX_ARGS]);
        a->truncated = more != NULL;
    }
    if (exec_argv.update(&tid, a))
        count_lost(PROC_LOST_ARGS_MAP_FULL);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve) {
    return capture_argv(args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat) {
    return capture_argv(args->argv);
}

/* A failed exec leaves its argv behind: drop it when the syscall returns. */
TRACEPOINT_PROBE(syscalls, sys_exit_execve) {
    u32 tid = bpf_get_current_pid_tgid();
    exec_argv.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_execveat) {
    u32 tid = bpf_get_current_pid_tgid();
    exec_argv.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    struct exec_event *e = events.ringbuf_reserve(sizeof(struct exec_event));
    if (!e) {
        count_lost(PROC_LOST_RINGBUF_FULL);
        return 0;
    }
    fill_header(&e->hdr, PROC_EVENT_EXEC);
    unsigned short off = args->data_loc_filename & 0xFFFF;
    bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), (void *)args + off);
    u32 old_tid = args->old_pid;
    struct exec_args *a = exec_argv.lookup(&old_tid);
    if (a) {
        bpf_probe_read_kernel(&e->argv, sizeof(e->argv), a);
        exec_argv.delete(&old_tid);
    } else {
        e->argv.argc = 0;
        e->argv.truncated = 0;
    }
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct exit_info info = {.code = (s32)args->error_code, .signal = 0};
    if (exit_info.update(&tgid, &info))
        count_lost(PROC_LOST_EXIT_MAP_FULL);
    return 0;
}

/* Signals whose default action ends the process (SIGCHLD, SIGCONT, SIGSTOP, SIGTSTP, SIGTTIN,
 * SIGTTOU, SIGURG and SIGWINCH do not). */
#define FATAL_BY_DEFAULT(s) ((s) >= 1 && (s) <= 31 && !((1u << (s)) & ((1u << 17) | (1u << 18) | \
    (1u << 19) | (1u << 20) | (1u << 21) | (1u << 22) | (1u << 23) | (1u << 28))))

/* A fatal signal with its default action (TERM, HUP, PIPE, ALRM, ...) does not reach
 * signal_deliver as itself: the kernel turns it into a group exit when it is sent, and every
 * thread then takes a SIGKILL. So the signal is remembered when it is generated (for the thread
 * it was sent to), and a SIGKILL taken later is attributed to it. A SIGKILL nobody generated for
 * the process is another thread's exit_group() or exec reaping it: the exit code stands. */
TRACEPOINT_PROBE(signal, signal_generate) {
    int sig = args->sig;
    if (args->result != 0 /* TRACE_SIGNAL_DELIVERED */ || !FATAL_BY_DEFAULT(sig))
        return 0;
    u32 target = args->pid;
    s32 s = sig;
    fatal_sent.update(&target, &s);
    return 0;
}

TRACEPOINT_PROBE(signal, signal_deliver) {
    int sig = args->sig;
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id, tgid = id >> 32;
    s32 *sent = fatal_sent.lookup(&tid);
    if (!sent)
        sent = fatal_sent.lookup(&tgid);
    s32 generated = sent ? *sent : 0;
    if (sent) {
        fatal_sent.delete(&tid);
        fatal_sent.delete(&tgid);
    }
    if (args->sa_handler != 0 /* SIG_DFL */ || !FATAL_BY_DEFAULT(sig))
        return 0;
    if (sig == 9 /* SIGKILL */) {
        if (!generated)
            return 0;   /* reaped by a group exit: not a signal of its own */
        sig = generated;
    }
    struct exit_info info = {.code = -1, .signal = sig};
    if (exit_info.update(&tgid, &info))
        count_lost(PROC_LOST_EXIT_MAP_FULL);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 tid = (u32)id;
    fatal_sent.delete(&tid);
#if HAS_GROUP_DEAD
    if (!args->group_dead)  /* other threads still run: not the end of the process yet */
        return 0;
#else
    /* Older kernels: the leader's exit stands for the process's (early if it exits first). */
    if ((u32)id != tgid)
        return 0;
#endif
    struct proc_event *e = events.ringbuf_reserve(sizeof(struct proc_event));
    struct exit_info *info = exit_info.lookup(&tgid);
    if (!e) {
        count_lost(PROC_LOST_RINGBUF_FULL);
        exit_info.delete(&tgid);
        return 0;
    }
    fill_header(e, PROC_EVENT_EXIT);
    if (info) {
        e->exit_code = info->code;
        e->exit_signal = info->signal;
    }
    exit_info.delete(&tgid);
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(task, task_newtask) {
    if (args->clone_flags & 0x00010000 /* CLONE_THREAD */)
        return 0;
    struct proc_event *e = events.ringbuf_reserve(sizeof(struct proc_event));
    if (!e) {
        count_lost(PROC_LOST_RINGBUF_FULL);
        return 0;
    }
    fill_header(e, PROC_EVENT_FORK);
    e->ppid = e->pid;          /* runs in the parent */
    e->pid = args->pid;        /* the child */
    e->tid = args->pid;
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(oom, mark_victim) {
    struct proc_event *e = events.ringbuf_reserve(sizeof(struct proc_event));
    if (!e) {
        count_lost(PROC_LOST_RINGBUF_FULL);
        return 0;
    }
    fill_header(e, PROC_EVENT_OOM_KILL);
    e->pid = args->pid;        /* the victim, not the task that triggered the OOM killer */
    e->tid = args->pid;
    __builtin_memset(e->comm, 0, sizeof(e->comm));
#if HAS_OOM_COMM
    /* The victim's own comm, where the tracepoint has it (newer kernels): the victim may have
     * started before the agent, whose exec records are the only other place to learn it. */
    unsigned short off = args->data_loc_comm & 0xFFFF;
    bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), (void *)args + off);
#endif
    events.ringbuf_submit(e, 0);
    return 0;
}
