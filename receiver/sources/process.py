"""Process lifecycle source (``bpf/process.bpf.c``): exec, exit, fork and OOM kills as logs.

Also keeps the process identity current for every other source: an exec or exit makes the
shared ``ProcessResources`` forget the pid, and fork events give the parent of processes too
short-lived for /proc to tell.
"""

from __future__ import annotations

import ctypes
import os
from collections import OrderedDict
from typing import Any

from ..config import EbpfConfig
from ..model import EbpfEvent, EbpfEventType, Signal
from .base import BccSource, Requirement, tracepoint_has_field

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
                ("args", (ctypes.c_char * PROC_ARG_LEN) * PROC_MAX_ARGS)]


class ExecEvent(ctypes.Structure):
    _fields_ = [("hdr", ProcEvent), ("filename", ctypes.c_char * PROC_PATH_LEN), ("argv", ExecArgs)]


_TYPES = {PROC_EVENT_EXEC: EbpfEventType.PROCESS_EXEC, PROC_EVENT_EXIT: EbpfEventType.PROCESS_EXIT,
          PROC_EVENT_FORK: EbpfEventType.PROCESS_FORK, PROC_EVENT_OOM_KILL: EbpfEventType.PROCESS_OOM_KILL}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class ProcessSource(BccSource):
    name = "process"
    bpf_file = "process.bpf.c"
    lost_reasons = ("ringbuf_full", "args_map_full", "exit_map_full")
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
        self._max_parents = 16384
        self._comms: OrderedDict[int, str] = OrderedDict()    # pid → comm, for OOM victims
        from ..convert.logs import redact_command_line

        self._redact = redact_command_line

    @classmethod
    def requirements(cls, config: EbpfConfig) -> list[Requirement]:
        return [Requirement("tracepoint", tp) for tp in cls.TRACEPOINTS]

    def cflags(self) -> list[str]:
        group_dead = tracepoint_has_field("sched:sched_process_exit", "group_dead")
        return [f"-DHAS_GROUP_DEAD={int(group_dead)}",
                "-DRINGBUF_PAGES=256",          # 1 MiB
                "-DMAX_INFLIGHT_EXECS=4096",
                "-DMAX_TRACKED_EXITS=16384"]

    def _remember(self, table: OrderedDict[int, Any], pid: int, value: Any) -> None:
        table[pid] = value
        table.move_to_end(pid)
        if len(table) > self._max_parents:
            table.popitem(last=False)

    def handle_event(self, data: int, size: int) -> None:
        hdr = ProcEvent.from_address(data)
        etype = _TYPES.get(hdr.type)
        if etype is None or (etype is EbpfEventType.PROCESS_EXEC and size < ctypes.sizeof(ExecEvent)):
            self.count_lost("decode_error")
            return
        self._received.inc()
        pid = hdr.pid
        comm = _text(hdr.comm.split(b"\0", 1)[0]) or self._comms.get(pid, "")
        attrs: dict[str, Any] = {}
        exe_path = None
        resources = self.ctx.resources
        if etype is EbpfEventType.PROCESS_EXEC:
            ev = ExecEvent.from_address(data)
            exe_path = _text(ev.filename.split(b"\0", 1)[0])
            resources.forget(pid)  # a new program: new identity
            attrs["process.executable.path"] = exe_path
            attrs["process.executable.name"] = os.path.basename(exe_path)
            if self.config.command_line != "off":
                argv = [_text(ev.argv.args[i].value) for i in range(min(ev.argv.argc, PROC_MAX_ARGS))]
                if self.config.command_line == "redacted":
                    argv = self._redact(argv)
                argv = argv[: self.config.max_args]
                attrs["process.command_args"] = argv
                attrs["process.command_line"] = " ".join(argv) + (" …" if ev.argv.truncated else "")
            self._remember(self._comms, pid, comm)
        elif etype is EbpfEventType.PROCESS_EXIT:
            if hdr.exit_signal:
                attrs["process.exit.code"] = 128 + hdr.exit_signal
                attrs["process.exit.signal"] = hdr.exit_signal
            elif hdr.exit_code >= 0:
                attrs["process.exit.code"] = hdr.exit_code & 0xFF
        elif etype is EbpfEventType.PROCESS_FORK:
            if not self.config.fork_events:
                self._remember(self._parents, pid, hdr.ppid)
                return
            self._remember(self._parents, pid, hdr.ppid)
            self._remember(self._comms, pid, comm)
        ppid = hdr.ppid or self._parents.get(pid)
        if ppid:
            attrs["process.parent_pid"] = ppid
        attrs["process.executable.name"] = attrs.get("process.executable.name") or comm
        event = EbpfEvent(etype, pid=pid, tid=hdr.tid,
                          timestamp_unix_nano=self.ctx.clock.to_unix_nano(hdr.ktime_ns),
                          comm=comm, attributes=attrs, cgroup_id=hdr.cgroup_id)
        resource = resources.get(pid, comm, exe_path, hdr.cgroup_id,
                                 {"process.parent_pid": ppid} if ppid else None)
        if etype is EbpfEventType.PROCESS_EXIT:
            resources.forget(pid)
            self._parents.pop(pid, None)
            self._comms.pop(pid, None)
        record = self.ctx.converter.convert_event_to_log(event)
        if record is not None:
            self.ctx.exporter.submit(Signal.LOGS, resource, record)
