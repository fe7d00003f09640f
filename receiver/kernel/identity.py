"""Who did it, as the host tells: host attributes, process identity from /proc, and container ids
from cgroups (by path in /proc/PID/cgroup, or by the kernel's cgroup id for processes already
gone). Plain attribute dicts with semantic-convention keys; the pipeline turns them into
OTLP resources."""

from __future__ import annotations

import os
import platform
import re
import socket
import time
from pathlib import Path
from typing import Any

from ..config import ResourceConfig

__all__ = ["detect_host_attributes", "process_attributes", "container_id_from_cgroup_path",
           "container_id_of_pid", "parent_pid", "CgroupResolver", "find_cgroup2_root", "cgroup_id_of"]

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm32", "ppc64le": "ppc64", "s390x": "s390x"}


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


def container_id_of_pid(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        cid = container_id_from_cgroup_path(line.split(":", 2)[-1])
        if cid:
            return cid
    return None


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None


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


def cgroup_id_of(path: str) -> int | None:
    """The kernel's id of a cgroup v2 directory (its inode number, what
    ``bpf_get_current_cgroup_id()`` returns). ``path`` is as /proc/PID/cgroup shows it
    ("/system.slice/docker-….scope"), relative to the cgroup v2 mount, or a full path under it."""
    root = find_cgroup2_root() or "/sys/fs/cgroup"
    if path == root or path.startswith(root.rstrip("/") + "/"):
        candidate = path
    else:
        candidate = f"{root.rstrip('/')}/{path.lstrip('/')}"
    try:
        return os.stat(candidate).st_ino
    except OSError:
        return None


class CgroupResolver:
    """Kernel cgroup v2 id (``bpf_get_current_cgroup_id``) → container id, by the inode numbers
    of the cgroup v2 tree. Rescans at most every ``rescan_interval`` on a miss; bounded."""

    def __init__(self, root: str | None = None, max_entries: int = 8192, rescan_interval: float = 5.0):
        self.root = root or find_cgroup2_root()
        self.max_entries = max_entries
        self.rescan_interval = rescan_interval
        self._ids: dict[int, str] = {}
        self._last_scan = -rescan_interval
        self.evictions = 0   # directories left out of scans at the bound, summed over scans

    def __len__(self) -> int:
        return len(self._ids)

    def __bool__(self) -> bool:
        # Not its len(): an empty resolver (none scanned yet) is still one to ask ("cgroups or
        # CgroupResolver()" would drop it, "if cgroups" would never ask it, so never scan).
        return True

    def _scan(self) -> None:
        self._last_scan = time.monotonic()
        if not self.root:
            return
        ids: dict[int, str] = {}
        for dirpath, _dirs, _files in os.walk(self.root):
            if len(ids) >= self.max_entries:
                self.evictions += 1   # walked on only to count what the bound leaves out
                continue
            try:
                ids[os.stat(dirpath).st_ino] = dirpath[len(self.root):] or "/"
            except OSError:
                continue
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


def process_attributes(pid: int, comm: str = "", executable_path: str | None = None,
                       cgroup_id: int = 0, cgroups: CgroupResolver | None = None) -> dict[str, Any]:
    """``process.*`` and ``container.id`` of a live (or just gone) process: what the event
    carried, completed by what /proc still tells."""
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
    ppid = parent_pid(pid)
    if ppid is not None:
        attrs["process.parent_pid"] = ppid
    cid = container_id_of_pid(pid) or (cgroups.container_id(cgroup_id) if cgroups is not None else None)
    if cid:
        attrs["container.id"] = cid
    return attrs
