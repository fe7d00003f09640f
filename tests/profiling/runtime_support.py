"""Helpers the language-runtime end-to-end tests share (test_jvm_e2e, test_v8_e2e, test_python_e2e)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..harness import Collector, wait_until

if TYPE_CHECKING:
    from .test_unwind_e2e import Profiled


def of_type(frames: Any, frame_type: str) -> list[Any]:
    """The frames whose profile.frame.type is ``frame_type``."""
    return [f for f in frames if f.frame_type == frame_type]


def warm_runtime(prof: Profiled, runtime: str, frame_type: str, language: str, entry: str) -> None:
    """Until the process's stacks carry ``frame_type`` frames (``runtime``'s); then forget what
    was counted. ``language`` and ``entry`` name the frames and the runtime in failures."""
    prof.warm()
    rt = prof.sampler.runtime(runtime)
    assert rt is not None, f"{language} frames are off"
    wait_until(lambda: rt.stats["processes_loaded"] >= 1, 30, 0.2, f"the {entry} entry")

    def everywhere() -> bool:
        p = prof.measure(1)
        total = sum(s.count for s in p.samples)
        return total >= 20 and sum(s.count for s in p.samples if of_type(s.frames, frame_type)) >= 0.9 * total

    wait_until(everywhere, 60, 0, f"{language} frames in the process's samples")
    prof.sampler.drain()


def samples_until(prof: Profiled, count: int, seconds: float) -> list[Any]:
    """Samples measured 2 s at a time until ``count`` of them or ``seconds`` have passed (a busy
    machine gives the process less CPU, so fewer samples per second)."""
    samples: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sum(s.count for s in samples) < count:
        samples += prof.measure(2).samples
    return samples


def otlp_frames(collector: Collector, kind: str) -> list[tuple[str, str, int]]:
    """(function, file, line) of every location the Collector wrote with profile.frame.type
    ``kind``, decoded through each request's dictionary."""
    out = []
    for req in collector.requests("profiles"):
        d = req.get("dictionary", {})
        strings, funcs = d.get("stringTable", []), d.get("functionTable", [])
        attrs = d.get("attributeTable", [])
        for loc in d.get("locationTable", []):
            kinds = set()
            for i in loc.get("attributeIndices", []):
                kv = attrs[i]
                key = kv["key"] if "key" in kv else strings[kv.get("keyStrindex", 0)]
                value = kv.get("value", {})
                value = strings[value["stringValueStrindex"]] if "stringValueStrindex" in value \
                    else value.get("stringValue")
                if key == "profile.frame.type":
                    kinds.add(value)
            if kinds != {kind}:
                continue
            for line in loc.get("lines", []):
                f = funcs[line.get("functionIndex", 0)]
                out.append((strings[f.get("nameStrindex", 0)], strings[f.get("filenameStrindex", 0)],
                            int(line.get("line", 0))))
    return out
