"""Least privilege after start: once the BPF programs are loaded and attached, the agent keeps
only the capabilities it still uses, in every thread, and can never regain the others.

What the running agent still needs (nothing else):

- ``CAP_SYS_PTRACE``: /proc/PID/exe, /proc/PID/root and /proc/PID/maps of other users'
  processes (process identity for every source; the profiler's symbolization).
- ``CAP_DAC_READ_SEARCH``: read binaries and debug files that are not world-readable, through
  /proc/PID/root (the profiler's symbolization), and /proc entries under restrictive modes.
- ``CAP_SYSLOG``, only with the profiler's kernel stacks: real addresses in /proc/kallsyms
  (read on first use and again after modules load).
- ``CAP_SYS_ADMIN``, only with the http source, only when ``sources.http.keep_sys_admin_for_tls``
  asks for it (default off) and only when the agent was given it: its TLS capture attaches
  uprobes to each libssl that a process first maps after start (a container's own), and the
  kernel lets only CAP_SYS_ADMIN create a uprobe through the ``uprobe`` PMU (CAP_PERFMON is not
  enough). Without it, libssl files mapped after start are not probed (the source logs it and
  ``check`` says so); those mapped at start stay probed for every process that maps them.

Not needed after load: ``CAP_BPF``, ``CAP_PERFMON``, ``CAP_SYS_ADMIN`` (loading, attaching,
opening perf events). Ring buffers are read through their already-mapped memory and maps through
their open file descriptors, which the kernel (6.5+) checks at creation, not per lookup; closing
the descriptors detaches. Older kernels (5.10, 6.1: found on the kernel matrix) check CAP_BPF on
every bpf() call, so there ``bpf_calls_need_capability()`` keeps it.

``CAP_SYS_RESOURCE``, ``CAP_NET_ADMIN``, ``CAP_DAC_OVERRIDE`` and the rest are dropped from the
effective, permitted and inheritable sets, from the bounding set (so an exec cannot get them
back, not even as root), and the ambient set is cleared; ``no_new_privs`` is set.

Capabilities belong to threads: capset() and PR_CAPBSET_DROP change only the calling thread, and
a new thread gets the sets of the thread that starts it. So the caller drops them in the thread it
runs in; threads the event-loop thread starts while the start-up set is still held (the
profiler's table and code workers, started when it attaches) are held by ``StartupThreads``
before they run anything and each drops its own set when the gate opens; threads started after
the drop inherit the reduced set; ``threads_with_capabilities`` tells which threads still hold
more than the caller (the service also restarts the telemetry server's thread)."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "CAP_NAMES",
    "StartupThreads",
    "capabilities_of",
    "drop_capabilities",
    "needed_capabilities",
    "threads_with_capabilities",
]

CAP_NAMES = ["chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
             "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
             "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
             "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
             "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
             "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
             "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore"]
CAP = {name: i for i, name in enumerate(CAP_NAMES)}

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 23, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _capget() -> tuple[int, int, int]:
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")

    def join(field: str) -> int:
        return getattr(data[0], field) | (getattr(data[1], field) << 32)

    return join("effective"), join("permitted"), join("inheritable")


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset failed: {os.strerror(err)}")


def mask(names: set[str]) -> int:
    return sum(1 << CAP[n] for n in names)


def names_of(mask: int) -> list[str]:
    return [n for i, n in enumerate(CAP_NAMES) if mask >> i & 1]


def needed_capabilities(running_sources: list[str], kernel_stacks: bool = True,
                        bpf_calls_checked: bool | None = None, tls_late_libraries: bool = False) -> set[str]:
    """What the agent still uses once its programs are loaded (see the module docstring). On a
    kernel that checks the capability on every bpf() call (``bpf_calls_checked``, probed when not
    given), CAP_BPF stays, and CAP_SYS_ADMIN where that is what grants BPF (Docker 20.10).
    ``tls_late_libraries``: ``sources.http.keep_sys_admin_for_tls``."""
    keep = {"sys_ptrace", "dac_read_search"}
    if "profiler" in running_sources and kernel_stacks:
        keep.add("syslog")
    if "http" in running_sources and tls_late_libraries and _capget()[0] >> CAP["sys_admin"] & 1:
        keep.add("sys_admin")   # uprobes on libssl files mapped after start (see above)
    if bpf_calls_checked is None:
        bpf_calls_checked = bpf_calls_need_capability()
    if bpf_calls_checked:
        effective = _capget()[0]
        keep.add("bpf" if effective >> CAP["bpf"] & 1 else "sys_admin")
    return keep


_BPF_MAP_CREATE, _BPF_MAP_LOOKUP_ELEM = 0, 1
_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280}


def bpf_calls_need_capability() -> bool:
    """Whether this kernel checks CAP_BPF on every bpf() call, not only when a map or program
    is created (kernels before 6.5 do, with unprivileged BPF disabled): found by trying it. A
    throwaway thread lowers its own effective set (capabilities belong to threads) and reads a
    one-entry map the process created; EPERM means the agent must keep CAP_BPF to read its maps."""
    import errno
    import platform
    import threading

    nr = _SYSCALL_BPF.get(platform.machine())
    if nr is None:
        return True   # unknown: keep what reads maps
    create = (ctypes.c_uint32 * 32)(2, 4, 4, 1)   # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    fd = _libc.syscall(nr, _BPF_MAP_CREATE, ctypes.byref(create), ctypes.sizeof(create))
    if fd < 0:
        return True   # cannot even create one here: keep the capabilities as they are
    result: list[int] = []

    def probe() -> None:
        try:
            effective, permitted, inheritable = _capget()
            _capset(effective & ~mask({"bpf", "sys_admin", "perfmon"}), permitted, inheritable)
            key, value = ctypes.c_uint32(0), ctypes.c_uint32(0)
            attr = (ctypes.c_uint64 * 8)()
            attr[0] = fd                                   # map_fd (u32, then padding)
            attr[1] = ctypes.addressof(key)
            attr[2] = ctypes.addressof(value)
            ret = _libc.syscall(nr, _BPF_MAP_LOOKUP_ELEM, ctypes.byref(attr), ctypes.sizeof(attr))
            result.append(0 if ret == 0 else ctypes.get_errno())
        except OSError as e:
            result.append(e.errno or errno.EPERM)

    t = threading.Thread(target=probe, name="bpf-cap-probe")
    t.start()
    t.join()
    os.close(fd)
    return not result or result[0] in (errno.EPERM, errno.EACCES)


def drop_capabilities(keep: set[str]) -> tuple[list[str], list[str]]:
    """Drops every capability not in ``keep`` for good (bounding set included) in the calling
    thread and sets no_new_privs; returns (kept, dropped) capability names."""
    effective, permitted, _inheritable = _capget()
    keep_mask = mask(keep)
    has_setpcap = bool(effective >> CAP["setpcap"] & 1)
    for i in range(len(CAP_NAMES)):
        if keep_mask >> i & 1 or not has_setpcap:
            continue
        if _libc.prctl(PR_CAPBSET_READ, i, 0, 0, 0) == 1:
            _libc.prctl(PR_CAPBSET_DROP, i, 0, 0, 0)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    new = permitted & keep_mask
    _capset(new, new, 0)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return names_of(new), names_of(permitted & ~keep_mask)


def capabilities_of(pid: int | str, tid: int | str | None = None) -> dict[str, int]:
    """CapEff, CapPrm, CapInh, CapBnd, CapAmb of a process (or one of its threads) from /proc."""
    path = Path(f"/proc/{pid}/task/{tid}/status" if tid is not None else f"/proc/{pid}/status")
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            out[key] = int(value.strip(), 16)
    return out


_SETS = ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd")


def _excess(caps: dict[str, int], reference: dict[str, int]) -> int:
    """The capabilities ``caps`` holds, in any of its sets, beyond the same set of ``reference``."""
    out = 0
    for k in _SETS:
        out |= caps.get(k, 0) & ~reference.get(k, 0)
    return out


def threads_with_capabilities(wait: float = 0.0) -> list[str]:
    """This process's threads that hold a capability, in any set (effective, permitted,
    inheritable, ambient, bounding), that the calling thread does not, as ``name(tid): caps``.
    A thread still so after ``wait`` seconds is listed (one that is ending, such as a server
    thread just replaced, gets that long to end)."""
    me = capabilities_of("self", threading.get_native_id())
    deadline = time.monotonic() + wait
    while True:
        out = []
        for task in Path("/proc/self/task").iterdir():
            try:
                caps = capabilities_of("self", task.name)
                name = (task / "comm").read_text().strip()
            except OSError:
                continue   # ended meanwhile
            extra = _excess(caps, me)
            if extra:
                out.append(f"{name}({task.name}): {', '.join(names_of(extra))}")
        if not out or time.monotonic() >= deadline:
            return out
        time.sleep(0.05)


class StartupThreads:
    """Holds the threads the event-loop thread starts while the agent still has its start-up
    capabilities: such a thread would otherwise keep the whole set for its life (and pass it to
    what it starts or execs, e.g. the unwinder's readelf). While ``hold()`` is in force, a thread
    started from the holding thread starts, but waits before running anything; ``release(keep)``
    makes each drop its own set to ``keep`` (as ``drop_capabilities``) and then run, and returns
    once every one has (or ``timeout`` passed: the ones that had not are named).

    Threads started inside ``privileged()`` are not held: the loader's compile threads and the
    CAP_BPF probe, which need the capabilities and are waited for (a held thread the holding
    thread waits for would never run). Threads started by other threads are not held either (the
    telemetry server's request threads: it is restarted after the drop)."""

    def __init__(self) -> None:
        self._owner: int | None = None
        self._original: Callable[[threading.Thread], None] | None = None
        self._open = threading.Event()
        self._keep: set[str] | None = None
        self._held: list[tuple[str, threading.Event, list[BaseException]]] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    def hold(self) -> None:
        if self._original is not None:
            return
        self._owner = threading.get_ident()
        original = threading.Thread.start
        self._original = original
        gate = self

        def start(thread: threading.Thread) -> None:
            if (threading.get_ident() == gate._owner and not getattr(gate._local, "privileged", False)
                    and not gate._open.is_set()):
                gate._wrap(thread)
            original(thread)

        threading.Thread.start = start  # type: ignore[method-assign]

    @contextmanager
    def privileged(self) -> Iterator[None]:
        """Threads the holding thread starts within run at once, with the start-up set."""
        before = getattr(self._local, "privileged", False)
        self._local.privileged = True
        try:
            yield
        finally:
            self._local.privileged = before

    def _wrap(self, thread: threading.Thread) -> None:
        run = thread.run
        done = threading.Event()
        errors: list[BaseException] = []

        def run_after_drop() -> None:
            self._open.wait()
            try:
                if self._keep is not None:
                    drop_capabilities(self._keep)
            except BaseException as e:   # noqa: BLE001 -- reported by release(); still run
                errors.append(e)
            finally:
                done.set()
            run()

        thread.run = run_after_drop  # type: ignore[method-assign]
        with self._lock:
            self._held.append((thread.name, done, errors))

    def release(self, keep: set[str] | None, timeout: float = 10.0) -> list[str]:
        """Stops holding new threads; the held ones drop to ``keep`` (None: keep what they
        have, e.g. when the drop itself failed) in their own thread, then run. Returns the held
        threads that did not drop, with why. Only the first call counts."""
        if self._open.is_set():
            return []
        if self._original is not None:
            threading.Thread.start = self._original  # type: ignore[method-assign]
            self._original = None
        self._keep = keep
        self._open.set()
        with self._lock:
            held, self._held = self._held, []
        deadline = time.monotonic() + timeout
        failed = []
        for name, done, errors in held:
            if not done.wait(max(0.0, deadline - time.monotonic())):
                failed.append(f"{name}: did not drop within {timeout:.0f}s")
            elif errors:
                failed.append(f"{name}: {errors[0]}")
        return failed

