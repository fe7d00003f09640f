"""Process lifecycle source (``bpf/process.bpf.c``): exec, exit, fork and OOM kills, handed on as
``ProcessRecord``s (logs, after the pipeline's conversion).

The pipeline renews a pid's identity at its exec and exit records, for every source; fork
events give the parent of processes too short-lived for /proc to tell.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from typing import Any

from ..config import EbpfConfig
from ..kernel.bcc import header_enum, tracepoint_has_field
from ..model import EbpfEventType
from ..records import ProcessRecord
from .base import BccSource, Requirement

__all__ = ["ProcessSource", "ProcEvent", "ExecEvent"]

PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK, PROC_EVENT_OOM_KILL = 1, 2, 3, 4
PROC_MAX_ARGS, PROC_ARG_LEN, PROC_PATH_LEN, PROC_COMM_LEN = 20, 128, 256, 16


class ProcEvent(ctypes.Structure):
    """Mirror of ``struct proc_event`` in ``bpf/process.h``."""

    _fields_ = [("type", ctypes.c_uint32), ("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32),
                ("ppid", ctypes.c_uint32), ("ktime_ns", ctypes.c_uint64),
                ("cgroup_id", ctypes.c_uint64), ("exit_code", ctypes.c_int32),
                ("exit_signal", ctypes.c_int32), ("comm", ctypes.c_char * PROC_COMM_LEN)]


class ExecArgs(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_uint32), ("truncated", ctypes.c_uint32),
                ("args", ctypes.c_char * (PROC_ARG_LEN * PROC_MAX_ARGS))]


class ExecEvent(ctypes.Structure):
    _fields_ = [("hdr", ProcEvent), ("filename", ctypes.c_char * PROC_PATH_LEN), ("argv", ExecArgs)]


_TYPES = {PROC_EVENT_EXEC: EbpfEventType.PROCESS_EXEC, PROC_EVENT_EXIT: EbpfEventType.PROCESS_EXIT,
          PROC_EVENT_FORK: EbpfEventType.PROCESS_FORK, PROC_EVENT_OOM_KILL: EbpfEventType.PROCESS_OOM_KILL}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class ProcessSource(BccSource):
    name = "process"
    bpf_file = "process.bpf.c"
    lost_reasons = header_enum("process.h", "PROC_LOST")
    mirrors = (("mirror_proc_event", "Leaf", ProcEvent), ("mirror_exec_event", "Leaf", ExecEvent))
    min_record_size = ctypes.sizeof(ProcEvent)

    TRACEPOINTS = ("sched:sched_process_exec", "sched:sched_process_exit", "task:task_newtask",
                   "syscalls:sys_enter_execve", "syscalls:sys_exit_execve",
                   "syscalls:sys_enter_execveat", "syscalls:sys_exit_execveat",
                   "syscalls:sys_enter_exit_group", "signal:signal_generate", "signal:signal_deliver",
                   "oom:mark_victim")

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.config = ctx.config.sources.process
        self.report_interval = 5.0
        self._parents: OrderedDict[int, int] = OrderedDict()  # pid → ppid from forks, bounded
        self._max_parents = ctx.config.caches.process_pids
        self._comms: OrderedDict[int, str] = OrderedDict()    # pid → comm, for OOM victims
        self._evictions = 0   # entries dropped at the bound (their exit was never seen)
        ctx.telemetry.watch_cache("process_pids", lambda: max(len(self._parents), len(self._comms)),
                                  self._max_parents, lambda: self._evictions)

    @classmethod
    def requirements(cls, config: EbpfConfig) -> list[Requirement]:
        return [Requirement("tracepoint", tp) for tp in cls.TRACEPOINTS]

    def cflags(self) -> list[str]:
        group_dead = tracepoint_has_field("sched:sched_process_exit", "group_dead")
        oom_comm = tracepoint_has_field("oom:mark_victim", "comm")
        return [f"-DHAS_GROUP_DEAD={int(group_dead)}", f"-DHAS_OOM_COMM={int(oom_comm)}",
                "-DRINGBUF_PAGES=256",          # 1 MiB
                f"-DMAX_INFLIGHT_EXECS={self.config.max_inflight_execs}",
                f"-DMAX_TRACKED_EXITS={self.config.max_tracked_exits}"]

    def _remember(self, table: OrderedDict[int, Any], pid: int, value: Any) -> None:
        table[pid] = value
        table.move_to_end(pid)
        if len(table) > self._max_parents:
            table.popitem(last=False)
            self._evictions += 1

    def handle_event(self, data: int, size: int) -> None:
        hdr = ProcEvent.from_address(data)
        etype = _TYPES.get(hdr.type)
        if etype is None or (etype is EbpfEventType.PROCESS_EXEC and size < ctypes.sizeof(ExecEvent)):
            self.count_lost("decode_error")
            return
        self._received.inc()
        pid = hdr.pid
        comm = _text(hdr.comm.split(b"\0", 1)[0]) or self._comms.get(pid, "")
        rec = ProcessRecord(etype, pid=pid, tid=hdr.tid, time_unix_nano=self.ctx.clock.to_unix_nano(hdr.ktime_ns),
                            comm=comm, cgroup_id=hdr.cgroup_id)
        if etype is EbpfEventType.PROCESS_EXEC:
            ev = ExecEvent.from_address(data)
            rec.executable_path = _text(ev.filename.split(b"\0", 1)[0])
            if self.config.command_line != "off":
                base = data + ExecEvent.argv.offset + ExecArgs.args.offset
                rec.argv = [_text(ctypes.string_at(base + i * PROC_ARG_LEN, PROC_ARG_LEN).split(b"\0", 1)[0])
                            for i in range(min(ev.argv.argc, PROC_MAX_ARGS))]
                rec.argv_truncated = bool(ev.argv.truncated)
            self._remember(self._comms, pid, comm)
        elif etype is EbpfEventType.PROCESS_EXIT:
            if hdr.exit_signal:
                rec.exit_signal = hdr.exit_signal
            elif hdr.exit_code >= 0:
                rec.exit_code = hdr.exit_code
        elif etype is EbpfEventType.PROCESS_FORK:
            self._remember(self._parents, pid, hdr.ppid)
            if not self.config.fork_events:
                return
            self._remember(self._comms, pid, comm)
        rec.parent_pid = hdr.ppid or self._parents.get(pid, 0)
        if etype is EbpfEventType.PROCESS_EXIT:
            self._parents.pop(pid, None)
            self._comms.pop(pid, None)
        self.ctx.consumer.consume_event(rec)
