"""Sources: one per BPF program. ``source_classes()`` maps config section names to classes;
modules are imported lazily so a source with a missing dependency cannot break the others."""

from __future__ import annotations

import importlib
import logging

from .base import BccSource, Source, SourceContext

__all__ = ["Source", "BccSource", "SourceContext", "source_classes", "SOURCE_MODULES"]

log = logging.getLogger(__name__)

# section name → "module:Class"
SOURCE_MODULES = {
    "process": "receiver.sources.process:ProcessSource",
    "syscalls": "receiver.sources.syscalls:SyscallsSource",
    "profiler": "receiver.sources.profiler:ProfilerSource",
    "network": "receiver.sources.network:NetworkSource",
    "http": "receiver.sources.http:HttpSource",
}


def source_classes() -> dict[str, type[Source]]:
    out = {}
    for name, spec in SOURCE_MODULES.items():
        module, _, cls = spec.partition(":")
        try:
            out[name] = getattr(importlib.import_module(module), cls)
        except ImportError as e:
            log.warning("source %s cannot be imported: %s", name, e)
    return out
