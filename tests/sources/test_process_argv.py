"""argv of exec records without root or BPF: ``command_line: off`` exports nothing of it, and
``max_args`` (config) agrees with what bpf/process.bpf.c captures (``PROC_MAX_ARGS``)."""

from __future__ import annotations

import ctypes
import typing

import pytest

from receiver.config import EbpfConfig
from receiver.config.forms import Range
from receiver.config.schema import ProcessSourceConfig
from receiver.convert.logs import ARG_CAPTURE_BYTES, process_event, process_event_to_log
from receiver.errors import ConfigError
from receiver.kernel.bcc import header_defines
from receiver.model import EbpfEventType
from receiver.pipeline import Pipeline, ProcessResources
from receiver.records import ProcessRecord
from receiver.sources import process as process_source
from receiver.sources.process import PROC_ARG_LEN, PROC_EVENT_EXEC, PROC_MAX_ARGS, ExecEvent, ProcessSource

from .test_sources_without_bpf import RecordingSink, _ctx

MARKER = "plain-Zr8Zr8"      # not a secret: exported unless argv is left out
ARGV = ["/usr/bin/curl", "--password=hunter2", MARKER, "-u", "bob:Ux2Ux2"]


def _exec_event(args: list[bytes], argc: int | None = None, truncated: bool = False) -> ExecEvent:
    ev = ExecEvent()
    ev.hdr.type, ev.hdr.pid, ev.hdr.tid, ev.hdr.ppid = PROC_EVENT_EXEC, 77, 77, 1
    ev.hdr.comm = b"curl"
    ev.filename = b"/usr/bin/curl"
    base = ctypes.addressof(ev) + ExecEvent.argv.offset + type(ev.argv).args.offset
    for i, a in enumerate(args):
        ctypes.memmove(base + i * PROC_ARG_LEN, a[:PROC_ARG_LEN - 1], min(len(a), PROC_ARG_LEN - 1))
    ev.argv.argc = len(args) if argc is None else argc
    ev.argv.truncated = int(truncated)
    return ev


def _exported_bytes(sink: RecordingSink) -> bytes:
    return b"".join(res.SerializeToString() + item.SerializeToString() for _s, res, item in sink.items)


# ---------------------------------------------------------------------------- command_line: off

def test_command_line_off_leaves_argv_out_of_the_record() -> None:
    """The source does not even read argv: nothing of it is in the record it hands on."""
    ctx, consumer = _ctx({"sources": {"process": {"command_line": "off"}}})
    ev = _exec_event([a.encode() for a in ARGV])
    ProcessSource(ctx).handle_event(ctypes.addressof(ev), ctypes.sizeof(ev))
    (rec,) = consumer.events
    assert rec.kind is EbpfEventType.PROCESS_EXEC and rec.executable_path == "/usr/bin/curl"
    assert rec.argv is None and not rec.argv_truncated


@pytest.mark.parametrize("mode", ["off", "redacted", "full"])
def test_command_line_off_exports_nothing_of_argv(mode: str) -> None:
    """Through the pipeline, a record whose argv was read (a source that reads it anyway): with
    ``off`` no byte of argv is in what goes to the exporter, resource included; the other modes
    export it, so the check is not vacuous."""
    sink = RecordingSink()
    config = EbpfConfig.from_dict({"sources": {"process": {"command_line": mode}}}, environ={})
    pipeline = Pipeline(config, sink, ProcessResources({"host.name": "h"}))
    pid = 2**22 - 5
    pipeline.consume_event(ProcessRecord(EbpfEventType.PROCESS_EXEC, pid, pid, 1, "curl",
                                         executable_path="/usr/bin/curl", argv=list(ARGV), argv_truncated=True))
    (_signal, _res, log), = sink.items
    keys = {kv.key for kv in log.attributes}
    exported = _exported_bytes(sink)
    if mode == "off":
        assert not keys & {"process.command_args", "process.command_line"}
        for arg in ARGV[1:]:
            assert arg.encode() not in exported, arg
        assert b"hunter2" not in exported and b"Ux2Ux2" not in exported and b"\xe2\x80\xa6" not in exported
    else:
        assert {"process.command_args", "process.command_line"} <= keys
        assert MARKER.encode() in exported
        assert (b"hunter2" in exported) == (mode == "full")


# ---------------------------------------------------------------------------------- max_args

def test_max_args_bound_is_what_the_kernel_captures() -> None:
    """The config allows at most what bpf/process.h captures. (The kernel side is not grown to the
    config's old 64: 64 x 128-byte slots per exec would make the preallocated 4096-entry in-flight
    hash 32 MiB instead of 10, triple each exec record in the ring buffer, and unroll a 64-step
    read loop per exec.)"""
    header = header_defines("process.h")
    (bound,) = [m for m in typing.get_type_hints(ProcessSourceConfig, include_extras=True)["max_args"].__metadata__
                if isinstance(m, Range)]
    assert bound.high == header["PROC_MAX_ARGS"] == PROC_MAX_ARGS == process_source.PROC_MAX_ARGS
    assert ProcessSourceConfig().max_args == PROC_MAX_ARGS
    # and the cut the redaction rules assume is the kernel's
    assert ARG_CAPTURE_BYTES == header["PROC_ARG_LEN"] - 1 == PROC_ARG_LEN - 1


def test_max_args_above_what_the_kernel_captures_is_rejected() -> None:
    EbpfConfig.from_dict({"sources": {"process": {"max_args": PROC_MAX_ARGS}}}, environ={})
    with pytest.raises(ConfigError, match="max_args"):
        EbpfConfig.from_dict({"sources": {"process": {"max_args": PROC_MAX_ARGS + 1}}}, environ={})


@pytest.mark.parametrize("max_args", [1, 3, PROC_MAX_ARGS])
def test_max_args_keeps_that_many_and_marks_the_line_cut(max_args: int) -> None:
    """All the kernel hands over (``PROC_MAX_ARGS``, more left out: ``truncated``) goes through
    the source; ``max_args`` of them are exported, and a line with fewer than argv had ends in …"""
    ctx, consumer = _ctx({"sources": {"process": {"max_args": max_args}}})
    args = [b"/usr/bin/curl"] + [f"a{i}".encode() for i in range(1, PROC_MAX_ARGS)]
    ev = _exec_event(args, truncated=True)
    ProcessSource(ctx).handle_event(ctypes.addressof(ev), ctypes.sizeof(ev))
    (rec,) = consumer.events
    assert rec.argv == [a.decode() for a in args] and rec.argv_truncated
    attrs = process_event(rec, "redacted", ctx.config.sources.process.max_args).attributes
    assert attrs["process.command_args"] == rec.argv[:max_args]
    assert attrs["process.command_line"] == " ".join(rec.argv[:max_args]) + " …"
    # fewer than max_args and not cut by the kernel: no ellipsis
    short = ProcessRecord(EbpfEventType.PROCESS_EXEC, 1, 1, 1, "x", argv=["x"] * max_args)
    assert process_event(short, "redacted", max_args).attributes["process.command_line"] == " ".join(["x"] * max_args)
    log = process_event_to_log(process_event(rec, "redacted", max_args))
    assert f"a{max_args}".encode() not in log.SerializeToString()
