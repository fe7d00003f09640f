"""Who did it: the host resource, and per-process resources with container identity.

Host attributes are detected once. Process resources are built on first sight of a pid from what
the event carried (comm, executable path) plus what /proc still tells, cached in a bounded LRU and
dropped when the process execs or exits, so a recycled pid never inherits stale identity.
``container.id`` comes from /proc/PID/cgroup, or from the kernel cgroup id resolved against the
cgroup v2 tree (for processes already gone by the time we look).
"""

from __future__ import annotations

import os
import platform
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from ..config import ResourceConfig

__all__ = ["to_any_value", "to_key_values", "detect_host_attributes", "ProcessResources",
           "CgroupResolver", "container_id_from_cgroup_path"]

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm32", "ppc64le": "ppc64", "s390x": "s390x"}


def to_any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, (list, tuple)):
        return AnyValue(array_value=ArrayValue(values=[to_any_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def to_key_values(attributes: Mapping[str, Any]) -> list[KeyValue]:
    """Attributes as OTLP ``KeyValue``s, skipping ``None`` values."""
    return [KeyValue(key=k, value=to_any_value(v)) for k, v in attributes.items() if v is not None]


def _machine_id() -> str | None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def detect_host_attributes(config: ResourceConfig) -> dict[str, Any]:
    """host.*, os.*, service.name, then the configured attributes (which win).

    In Kubernetes the node name arrives by the downward API as ``K8S_NODE_NAME``; in a container
    with ``pid: host`` the host name is the container's, so it may be overridden the same way."""
    uname = platform.uname()
    attrs: dict[str, Any] = {
        "service.name": config.service_name,
        "host.name": os.environ.get("K8S_NODE_NAME") or socket.gethostname(),
        "host.id": _machine_id(),
        "host.arch": _ARCH.get(uname.machine, uname.machine),
        "os.type": "linux",
        "os.version": uname.release,
    }
    if os.environ.get("K8S_NODE_NAME"):
        attrs["k8s.node.name"] = os.environ["K8S_NODE_NAME"]
    attrs.update(config.attributes)
    return {k: v for k, v in attrs.items() if v is not None}


# docker-<id>.scope, /docker/<id>, cri-containerd-<id>.scope, crio-<id>.scope, /kubepods/…/<id>,
# libpod-<id>.scope: a 64-hex id as the last such component of the path.
_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?(?:/|$)")


def container_id_from_cgroup_path(path: str) -> str | None:
    found = _CONTAINER_ID.findall(path)
    return found[-1] if found else None


def _container_id_of_pid(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        cid = container_id_from_cgroup_path(line.split(":", 2)[-1])
        if cid:
            return cid
    return None


class CgroupResolver:
    """Kernel cgroup v2 id (``bpf_get_current_cgroup_id``) → container id, by the inode numbers
    of the cgroup v2 tree. Rescans at most every ``rescan_interval`` on a miss; bounded."""

    def __init__(self, root: str | None = None, max_entries: int = 8192, rescan_interval: float = 5.0):
        self.root = root or self.find_cgroup2_root()
        self.max_entries = max_entries
        self.rescan_interval = rescan_interval
        self._ids: dict[int, str] = {}
        self._last_scan = -rescan_interval

    @staticmethod
    def find_cgroup2_root() -> str | None:
        """Where cgroup v2 is mounted (/sys/fs/cgroup; /sys/fs/cgroup/unified on hybrid hosts)."""
        try:
            for line in Path("/proc/mounts").read_text().splitlines():
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
        except OSError:
            pass
        return None

    def _scan(self) -> None:
        self._last_scan = time.monotonic()
        if not self.root:
            return
        ids: dict[int, str] = {}
        for dirpath, _dirs, _files in os.walk(self.root):
            try:
                ids[os.stat(dirpath).st_ino] = dirpath[len(self.root):] or "/"
            except OSError:
                continue
            if len(ids) >= self.max_entries:
                break
        self._ids = ids

    def path(self, cgroup_id: int) -> str | None:
        if not cgroup_id:
            return None
        p = self._ids.get(cgroup_id)
        if p is None and time.monotonic() - self._last_scan >= self.rescan_interval:
            self._scan()
            p = self._ids.get(cgroup_id)
        return p

    def container_id(self, cgroup_id: int) -> str | None:
        p = self.path(cgroup_id)
        return container_id_from_cgroup_path(p) if p else None


class ProcessResources:
    """pid → OTLP ``Resource`` (host attributes + ``process.*`` + ``container.id``), bounded LRU.

    The same ``Resource`` object is returned for a pid until it is forgotten, so the exporter can
    group items by resource identity without comparing contents.

    An entry made between fork and exec (the child still runs the parent's program) must not
    outlive the exec, whatever order the sources' ring buffers are read in: each entry keeps the
    comm values known to belong to its executable, and an event whose comm is not among them
    has the executable checked again (/proc/PID/exe, or the path the event carries); a
    different one means a new program and a new entry. Threads that rename themselves cost one
    check per new name (up to ``_MAX_COMMS`` per entry)."""

    _MAX_COMMS = 16

    def __init__(self, host_attributes: Mapping[str, Any], max_entries: int = 4096,
                 cgroups: CgroupResolver | None = None):
        self.host_attributes = dict(host_attributes)
        self.host_resource = Resource(attributes=to_key_values(self.host_attributes))
        self.max_entries = max_entries
        self.cgroups = cgroups or CgroupResolver()
        # pid → (resource, executable path it was built with, comm values seen for it)
        self._cache: OrderedDict[int, tuple[Resource, str | None, set[str]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, pid: int, comm: str = "", executable_path: str | None = None,
            cgroup_id: int = 0, extra: Mapping[str, Any] | None = None) -> Resource:
        if pid <= 0:
            return self.host_resource
        entry = self._cache.get(pid)
        if entry is not None:
            res, exe, comms = entry
            if not comm or comm in comms or self._same_program(pid, exe, executable_path, comm, comms):
                self._cache.move_to_end(pid)
                return res
        attrs = self.process_attributes(pid, comm, executable_path, cgroup_id)
        res = Resource(attributes=to_key_values({**self.host_attributes, **attrs, **(extra or {})}))
        exe = attrs.get("process.executable.path")
        comms = {c for c in (comm, os.path.basename(exe)[:15] if exe else "") if c}
        self._cache[pid] = (res, exe, comms)
        self._cache.move_to_end(pid)
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return res

    def _same_program(self, pid: int, exe: str | None, executable_path: str | None, comm: str,
                      comms: set[str]) -> bool:
        """Whether ``pid`` still runs the executable its entry was built for (a new comm may be a
        renamed thread, or an exec)."""
        now = executable_path
        if now is None:
            try:
                now = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                now = None   # gone: the comm the event carries is the better name
        if now is None or now != exe:
            return False
        if len(comms) < self._MAX_COMMS:
            comms.add(comm)
        return True

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)

    def process_attributes(self, pid: int, comm: str = "", executable_path: str | None = None,
                           cgroup_id: int = 0) -> dict[str, Any]:
        attrs: dict[str, Any] = {"process.pid": pid}
        if executable_path is None:
            try:
                executable_path = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                pass
        if executable_path:
            attrs["process.executable.path"] = executable_path
        name = os.path.basename(executable_path) if executable_path else comm
        if name:
            attrs["process.executable.name"] = name
        ppid = _parent_pid(pid)
        if ppid is not None:
            attrs["process.parent_pid"] = ppid
        cid = _container_id_of_pid(pid) or self.cgroups.container_id(cgroup_id)
        if cid:
            attrs["container.id"] = cid
        return attrs


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None
