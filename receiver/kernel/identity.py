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
           "k8s_pod_uid_from_cgroup_path", "container_attributes", "container_id_of_pid", "parent_pid",
           "CgroupResolver", "find_cgroup2_root", "cgroup_id_of"]

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


# The pod's cgroup as the kubelet makes it, under a path naming kubepods: pod<uid> (cgroupfs
# driver: /kubepods/besteffort/pod<uid>/<id>) or kubepods-<qos>-pod<uid, "-" as "_">.slice
# (systemd driver). The uid is a UUID, or 32 hex digits for a static pod (a hash).
_POD_UID = re.compile(r"(?:^|/)(?:[\w.-]*-)?pod([0-9a-f]{8}([-_])[0-9a-f]{4}\2[0-9a-f]{4}\2[0-9a-f]{4}\2"
                      r"[0-9a-f]{12}|[0-9a-f]{32})(?:\.slice)?(?=/|$)")


def container_id_from_cgroup_path(path: str) -> str | None:
    found = _CONTAINER_ID.findall(path)
    return found[-1] if found else None


def k8s_pod_uid_from_cgroup_path(path: str) -> str | None:
    """``k8s.pod.uid`` of a path the kubelet made (either cgroup driver), with its dashes."""
    if "kubepods" not in path:
        return None
    found = _POD_UID.findall(path)
    return found[-1][0].replace("_", "-") if found else None


def container_attributes(path: str) -> dict[str, str]:
    """``container.id`` and ``k8s.pod.uid``, those a cgroup path tells."""
    attrs = {"container.id": container_id_from_cgroup_path(path), "k8s.pod.uid": k8s_pod_uid_from_cgroup_path(path)}
    return {k: v for k, v in attrs.items() if v}


def _container_attributes_of_pid(pid: int) -> dict[str, str]:
    """From the first line of /proc/PID/cgroup (one per hierarchy) that tells any."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        attrs = container_attributes(line.split(":", 2)[-1])
        if attrs:
            return attrs
    return {}


def container_id_of_pid(pid: int) -> str | None:
    return _container_attributes_of_pid(pid).get("container.id")


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

    def container_attributes(self, cgroup_id: int) -> dict[str, str]:
        p = self.path(cgroup_id)
        return container_attributes(p) if p else {}


def process_attributes(pid: int, comm: str = "", executable_path: str | None = None,
                       cgroup_id: int = 0, cgroups: CgroupResolver | None = None) -> dict[str, Any]:
    """``process.*``, ``container.id`` and ``k8s.pod.uid`` of a live (or just gone) process: what
    the event carried, completed by what /proc still tells."""
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
    attrs.update(_container_attributes_of_pid(pid)
                 or (cgroups.container_attributes(cgroup_id) if cgroups is not None else {}))
    return attrs
