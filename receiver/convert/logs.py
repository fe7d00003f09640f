"""Process lifecycle events → OTLP log records (event name + semantic-convention attributes)."""

from __future__ import annotations

import os
import re
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, SeverityNumber

from ..model import EbpfEvent, EbpfEventType
from ..records import ProcessRecord
from .attributes import to_key_values

__all__ = ["process_event", "process_event_to_log", "redact_command_line", "EVENT_NAMES"]

EVENT_NAMES = {
    EbpfEventType.PROCESS_EXEC: "process.exec",
    EbpfEventType.PROCESS_EXIT: "process.exit",
    EbpfEventType.PROCESS_FORK: "process.fork",
    EbpfEventType.PROCESS_OOM_KILL: "process.oom_kill",
}

_SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|api[-_]?key|auth|credential|private[-_]?key|session",
                         re.IGNORECASE)


# Short options that take a password, by program (``-pSECRET`` attached, or ``-p SECRET``).
_SECRET_SHORT = {"mysql": "p", "mysqldump": "p", "mysqladmin": "p", "mysqlimport": "p",
                 "mysqlcheck": "p", "mysqlshow": "p", "mysqlpump": "p", "mariadb": "p",
                 "mariadb-dump": "p", "mariadb-admin": "p", "7z": "p", "7za": "p", "sshpass": "p",
                 "redis-cli": "a", "ldapsearch": "w", "ldapmodify": "w", "ldapadd": "w",
                 "ldapdelete": "w", "ldapwhoami": "w", "ldappasswd": "w", "zip": "P", "unzip": "P",
                 "sqlcmd": "P", "mongo": "p", "mongosh": "p"}
# What a ``-p`` value is when it is not a password: a port or port mapping (ssh -p 22,
# docker -p 127.0.0.1:8080:80/tcp, ps -p 1234) or a path (mkdir -p /a/b, patch -p ./x).
_NOT_SECRET_P = re.compile(r"[\d.:\[\]-]*\d(?:/(?:tcp|udp|sctp))?|.*/.*|[.~].*")
_USER_PASS = re.compile(r"([^:\s]+):(?!\d+$)(.+)")   # -u user:pass (curl); uid:gid stays


def redact_command_line(argv: list[str]) -> list[str]:
    """Masks values of secret-looking arguments: ``--password=x``, ``--token x``, ``API_KEY=x``,
    credentials in URLs (``scheme://user:pass@host``) and in ``-u user:pass``, and short
    password options: ``-p VALUE`` for any program unless VALUE is a port, port mapping or path
    (``-p`` is a password option in mysql, sshpass, mongo, 7z, ...), ``-pVALUE`` and the
    program's own option (``redis-cli -a``, ``ldapsearch -w``, ``unzip -P``) for the programs
    known to take a password that way (``_SECRET_SHORT``)."""
    out: list[str] = []
    mask_next = False
    prog_opt = _SECRET_SHORT.get(argv[0].rsplit("/", 1)[-1]) if argv else None
    check_p = check_user = False
    for i, arg in enumerate(argv):
        if i and (mask_next or check_p or check_user) and not arg.startswith("-"):
            if mask_next or (check_p and not _NOT_SECRET_P.fullmatch(arg)):
                out.append("REDACTED")
            elif check_user and _USER_PASS.fullmatch(arg):
                out.append(_USER_PASS.sub(r"\1:REDACTED", arg))
            else:
                out.append(arg)
            mask_next = check_p = check_user = False
            continue
        mask_next = check_p = check_user = False
        if i and prog_opt and arg.startswith("-" + prog_opt) and not arg.startswith("--"):
            if len(arg) > 2:
                out.append(arg[:2] + "REDACTED")      # -pSECRET
            else:
                out.append(arg)
                mask_next = True
            continue
        if i and arg == "-p":
            check_p = True
        elif i and arg in ("-u", "--user"):
            check_user = True
        if "=" in arg:
            key, _ = arg.split("=", 1)
            if _SECRET_KEY.search(key):
                out.append(f"{key}=REDACTED")
                continue
        elif arg.startswith("-") and _SECRET_KEY.search(arg):
            mask_next = True
        out.append(re.sub(r"(\w+://[^:/@\s]+):[^@/\s]+@", r"\1:REDACTED@", arg))
    return out


def process_event(rec: ProcessRecord, command_line: str = "redacted", max_args: int = 20) -> EbpfEvent:
    """A process record in semantic-convention terms. ``command_line``: ``redacted`` masks
    secret-looking values, ``full`` keeps argv as is, ``off`` leaves it out."""
    attrs: dict[str, Any] = {}
    if rec.executable_path is not None:
        attrs["process.executable.path"] = rec.executable_path
        attrs["process.executable.name"] = os.path.basename(rec.executable_path)
    if rec.argv is not None and command_line != "off":
        argv = redact_command_line(rec.argv) if command_line == "redacted" else rec.argv
        argv = argv[:max_args]
        attrs["process.command_args"] = argv
        attrs["process.command_line"] = " ".join(argv) + (" …" if rec.argv_truncated else "")
    if rec.exit_signal:
        attrs["process.exit.code"] = 128 + rec.exit_signal
        attrs["process.exit.signal"] = rec.exit_signal
    elif rec.exit_code is not None and rec.exit_code >= 0:
        attrs["process.exit.code"] = rec.exit_code & 0xFF
    if rec.parent_pid:
        attrs["process.parent_pid"] = rec.parent_pid
    attrs["process.executable.name"] = attrs.get("process.executable.name") or rec.comm
    return EbpfEvent(rec.kind, pid=rec.pid, tid=rec.tid, timestamp_unix_nano=rec.time_unix_nano,
                     comm=rec.comm, attributes=attrs, cgroup_id=rec.cgroup_id)


def _body(event: EbpfEvent) -> str:
    a = event.attributes
    if event.event_type is EbpfEventType.PROCESS_EXEC:
        return f"exec {a.get('process.executable.path', event.comm)} (pid {event.pid})"
    if event.event_type is EbpfEventType.PROCESS_EXIT:
        return f"exit {event.comm} (pid {event.pid}) code {a.get('process.exit.code')}"
    if event.event_type is EbpfEventType.PROCESS_FORK:
        return f"fork {event.comm} (pid {a.get('process.parent_pid')}) -> pid {event.pid}"
    return f"oom kill {event.comm} (pid {event.pid})"


def process_event_to_log(event: EbpfEvent) -> LogRecord:
    severity = (SeverityNumber.SEVERITY_NUMBER_WARN if event.event_type is EbpfEventType.PROCESS_OOM_KILL
                else SeverityNumber.SEVERITY_NUMBER_INFO)
    attrs: dict[str, Any] = {"process.pid": event.pid, **event.attributes}
    return LogRecord(
        time_unix_nano=event.timestamp_unix_nano,
        observed_time_unix_nano=event.timestamp_unix_nano,
        severity_number=severity,
        severity_text="WARN" if severity == SeverityNumber.SEVERITY_NUMBER_WARN else "INFO",
        event_name=EVENT_NAMES[event.event_type],
        body=AnyValue(string_value=_body(event)),
        attributes=to_key_values(attrs),
    )
