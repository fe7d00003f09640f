"""Process filters as BPF map contents (never program text): ``filter_pids`` (u32),
``filter_comms`` (comm bytes, NUL-padded) and ``filter_cgroups`` (u64 cgroup id), the maps
``bpf/common.bpf.h`` declares for every program."""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from ..config import ProcessFilter
from .identity import cgroup_id_of

__all__ = ["fill_process_filter"]

log = logging.getLogger(__name__)


def fill_process_filter(bpf: Any, process_filter: ProcessFilter, source_name: str) -> None:
    """A cgroup that does not exist is logged and skipped."""
    one = ctypes.c_uint8(1)
    pids = bpf["filter_pids"]
    for pid in process_filter.pids:
        pids[ctypes.c_uint32(pid)] = one
    comms = bpf["filter_comms"]
    for name in process_filter.process_names:
        key = comms.Key()
        raw = name.encode()[: ctypes.sizeof(key) - 1]
        ctypes.memmove(ctypes.addressof(key), raw, len(raw))
        comms[key] = one
    cgroups = bpf["filter_cgroups"]
    for cg in process_filter.cgroups:
        cid = cgroup_id_of(cg)
        if cid is None:
            log.warning("%s: cgroup %s not found; not filtered on", source_name, cg)
        else:
            cgroups[ctypes.c_uint64(cid)] = one
