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

# The kernel keeps this many bytes of each argument (``PROC_ARG_LEN`` - 1 in bpf/process.h; the
# last byte is the NUL). An argument this long may have been cut there, and what it ends with may
# be the start of a secret whose end (the ``@`` of a URL's userinfo, say) was never read.
ARG_CAPTURE_BYTES = 127

_SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|api[-_]?key|auth|credential|private[-_]?key|session"
                         r"|cookie", re.IGNORECASE)
# A key (a run of word characters, dots and dashes) then ``=`` or ``:``, anywhere in an argument:
# ``--password=x``, ``-Ddb.password=x``, ``user=bob,password=x`` (mount -o), ``?access_token=x``,
# ``Authorization: Bearer x``, ``{"password": "x"}``. When the key names a secret, the rest of the
# argument is masked.
_KEY_VALUE = re.compile(r"([\w.-]+)[\"']?\s*[=:]\s*")

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
_USER_PASS = re.compile(r"([^:\s]+):(.+)", re.DOTALL)   # -u user:pass (curl)
_UID_GID = re.compile(r"\d+:\d+")                        # -u 1000:1000 (docker) stays

REDACTED = "REDACTED"


Span = tuple[int, int]


def _userinfo_spans(arg: str, cut: bool) -> list[Span]:
    """The userinfo of every ``scheme://userinfo@host`` in ``arg``, whatever it holds: it ends at
    the argument's last ``@`` when a ``:`` follows the name (a password may hold ``/``, ``@``,
    ``:``), else at the last ``@`` before the first ``/``; a token given as the user
    (``https://TOKEN@host``) is userinfo too. In a cut argument the ``@`` may be what was lost: a
    ``name:`` or a name running to the cut is userinfo to the end."""
    spans: list[Span] = []
    pos = 0
    while (i := arg.find("://", pos)) >= 0:
        start = pos = i + 3
        rest = arg[start:]
        name = next((k for k, c in enumerate(rest) if c in "/:"), len(rest))   # up to the first / or :
        at = rest.rfind("@", 0, name)                                             # user@, no password
        if name < len(rest) and rest[name] == ":":
            last = rest.rfind("@", name)
            if last >= 0:
                at = last
            elif cut:
                at = len(rest)
        elif at < 0 and cut and name == len(rest):
            at = len(rest)
        if at > 0:
            spans.append((start, start + at))
            pos = start + at
    return spans


def _secret_value_span(arg: str) -> Span | None:
    """Everything after the first ``KEY=``/``KEY:`` whose key names a secret."""
    for m in _KEY_VALUE.finditer(arg):
        if _SECRET_KEY.search(m.group(1)):
            return (m.end(), len(arg))
    return None


def _password_span(arg: str, offset: int, cut: bool) -> Span | None:
    """The ``pass`` of ``user:pass`` at ``arg[offset:]``; a ``uid:gid`` is none, unless cut."""
    value = arg[offset:]
    m = _USER_PASS.fullmatch(value)
    if m is None or (not cut and _UID_GID.fullmatch(value)):
        return None
    return (offset + m.start(2), len(arg))


def _masked(arg: str, spans: list[Span]) -> str:
    """``arg`` with each run of the union of ``spans`` replaced by one ``REDACTED``."""
    out: list[str] = []
    pos = 0
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if start > pos or not out:
            out.append(arg[pos:start] + REDACTED)
        pos = max(pos, end)
    out.append(arg[pos:])
    return "".join(out)


def redact_command_line(argv: list[str], cut_at: int | None = ARG_CAPTURE_BYTES) -> list[str]:
    """Masks secrets in an argv, argument by argument; ``process.command_line`` is these arguments
    joined, so the two attributes follow the same rules. Masked:

    - URL userinfo, whole: ``scheme://REDACTED@host`` (``_userinfo_spans``);
    - after a key naming a secret (``_SECRET_KEY``) and ``=`` or ``:``, anywhere in an argument,
      the rest of it: ``--password=x``, ``API_KEY=x``, ``-o user=u,password=x``, ``?token=x``,
      ``Authorization: Bearer x``, ``{"password": "x"}``;
    - the argument after an option naming a secret (``--token x``), whatever it is;
    - ``-u``/``--user`` (and curl's ``-U``/``--proxy-user``) values ``user:pass`` (a ``uid:gid``
      stays), attached too (``-uuser:pass``, ``--user=user:pass``);
    - short password options: ``-p VALUE`` for any program unless VALUE is a port, port mapping,
      path or option (``-p`` is a password option in mysql, sshpass, mongo, 7z, ...), and
      ``-pVALUE``/``-p VALUE`` and the program's own option (``redis-cli -a``, ``ldapsearch -w``,
      ``unzip -P``) for the programs known to take a password that way (``_SECRET_SHORT``).

    Each rule finds spans of the argument as read; their union is masked, so one rule's mask
    cannot hide from another the secret it would have found. An argument of ``cut_at`` bytes or
    more may have been cut by the kernel before the end of a secret: a URL name or ``name:``
    running to the cut is masked to the end (the ``@`` may be what was lost), and a
    ``user:pass`` is masked even when it looks like a ``uid:gid``. When in doubt, mask: an option
    taken as another's value (``7z -p -p x``) still masks what follows it."""
    out: list[str] = []
    prog_opt = _SECRET_SHORT.get(argv[0].rsplit("/", 1)[-1]) if argv else None
    expect: str | None = None     # what the option before says this argument is
    for i, arg in enumerate(argv):
        cut = cut_at is not None and len(arg.encode("utf-8", "surrogatepass")) >= cut_at
        took, expect = expect, None
        option = i > 0 and arg.startswith("-")
        spans = _userinfo_spans(arg, cut)
        value = _secret_value_span(arg)
        if value:
            spans.append(value)
        if took == "secret" or (took == "p" and not option and not _NOT_SECRET_P.fullmatch(arg)):
            spans.append((0, len(arg)))
        elif took == "user" and not option:
            spans.append(_password_span(arg, 0, cut) or (0, 0))
        if option and prog_opt and arg.startswith("-" + prog_opt) and not arg.startswith("--"):
            if len(arg) > 2:                         # -pSECRET; -password: a value, or --password?
                spans.append((2, len(arg)))
                expect = "secret" if _SECRET_KEY.search(arg) else None
            else:
                expect = "secret"
        elif option and arg == "-p":
            expect = "p"
        elif option and arg in ("-u", "--user", "-U", "--proxy-user"):
            expect = "user"
        elif option and arg.startswith(("--user=", "--proxy-user=")):
            spans.append(_password_span(arg, arg.index("=") + 1, cut) or (0, 0))
        elif option and arg.startswith("-u") and not arg.startswith("--"):
            spans.append(_password_span(arg, 2, cut) or (0, 0))
        elif option and not value and _SECRET_KEY.search(arg):
            expect = "secret"                       # --token VALUE
        out.append(_masked(arg, spans))
    return out


def process_event(rec: ProcessRecord, command_line: str = "redacted", max_args: int = 20) -> EbpfEvent:
    """A process record in semantic-convention terms. ``command_line``: ``redacted`` masks
    secret-looking values, ``full`` keeps argv as is, ``off`` leaves it out."""
    attrs: dict[str, Any] = {}
    if rec.executable_path is not None:
        attrs["process.executable.path"] = rec.executable_path
        attrs["process.executable.name"] = os.path.basename(rec.executable_path)
    if rec.argv is not None and command_line != "off":
        argv = redact_command_line(rec.argv) if command_line == "redacted" else list(rec.argv)
        truncated = rec.argv_truncated or len(argv) > max_args
        argv = argv[:max_args]
        attrs["process.command_args"] = argv
        attrs["process.command_line"] = " ".join(argv) + (" …" if truncated else "")
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
