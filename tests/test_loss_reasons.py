"""Loss reasons come from one place, each program's header (``<PREFIX>_LOST_<NAME>``): the
sources read them from there, the self-metrics table of docs/operations.md names exactly those, and the metric's
help text invents none."""

from __future__ import annotations

import re

from receiver.kernel.bcc import header_enum
from receiver.sources import source_classes
from receiver.telemetry import SelfTelemetry

from .harness import REPO

HEADERS = {"process": ("process.h", "PROC_LOST"), "syscalls": ("syscalls.h", "SC_LOST"),
           "network": ("network.h", "NET_LOST"), "profiler": ("profiler.h", "PROF_LOST"),
           "http": ("http.h", "HTTP_LOST")}


def _readme_reasons() -> dict[str, list[str]]:
    row = next(line for line in (REPO / "docs" / "operations.md").read_text().splitlines()
               if line.startswith("| `ebpf_receiver_source_events_lost_total`"))
    text = re.sub(r"\([^)]*\)", "", row.split("by reason:", 1)[1])   # drop the explanations
    out = {}
    for part in text.split(";"):
        words = part.strip().split(None, 1)
        if len(words) == 2:
            out[words[0]] = re.findall(r"`(\w+)`", words[1])
    return out


def test_sources_read_their_reasons_from_the_program_headers() -> None:
    classes = source_classes()
    for name, (header, prefix) in HEADERS.items():
        assert tuple(classes[name].lost_reasons) == header_enum(header, prefix), name
        assert classes[name].lost_reasons, name


def test_readme_names_exactly_the_reasons_of_each_source() -> None:
    readme = _readme_reasons()
    classes = source_classes()
    for name in HEADERS:
        assert readme[name] == list(classes[name].lost_reasons), (name, readme.get(name))
    assert readme["any"] == ["decode_error"]


def test_help_text_names_no_reason_that_is_never_counted() -> None:
    help_text = SelfTelemetry().events_lost._documentation
    known = {r for cls in source_classes().values() for r in cls.lost_reasons} | {"decode_error"}
    named = set(re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", help_text))
    assert named <= known, named - known
