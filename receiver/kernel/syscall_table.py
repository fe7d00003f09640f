"""Syscall numbers and errno values to names, from one table that works everywhere: the agent's
container image has neither ``ausyscall`` nor ``asm/unistd_64.h``.

The table is BCC's own (``bcc.syscall``, x86_64, up to ``rseq``) plus the numbers Linux has
given every architecture alike since 5.1 (424 onwards), so it needs nothing else from the host.
Other architectures use ``ausyscall`` where BCC's import would demand it.
"""

from __future__ import annotations

import errno
import platform
import shutil
import subprocess

__all__ = ["syscall_names", "errno_name"]

# Since Linux 5.1 a new syscall has the same number on every architecture.
_UNIFIED = dict(enumerate((
    "pidfd_send_signal", "io_uring_setup", "io_uring_enter", "io_uring_register", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "pidfd_open", "clone3", "close_range",
    "openat2", "pidfd_getfd", "faccessat2", "process_madvise", "epoll_pwait2", "mount_setattr",
    "quotactl_fd", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    "memfd_secret", "process_mrelease", "futex_waitv", "set_mempolicy_home_node", "cachestat",
    "fchmodat2", "map_shadow_stack", "futex_wake", "futex_wait", "futex_requeue", "statmount",
    "listmount", "lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules", "mseal",
    "setxattrat", "getxattrat", "listxattrat", "removexattrat", "open_tree_attr", "file_getattr",
    "file_setattr"), start=424))

# Kernel-internal codes that can reach sys_exit but are not in userspace errno.h.
_KERNEL_ERRNOS = {512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND",
                  515: "ENOIOCTLCMD", 516: "ERESTART_RESTARTBLOCK", 517: "EPROBE_DEFER",
                  518: "EOPENSTALE", 519: "ENOPARAM"}


def errno_name(err: int) -> str:
    return errno.errorcode.get(err) or _KERNEL_ERRNOS.get(err) or f"E{err}"


def _from_ausyscall() -> dict[int, str]:
    aus = shutil.which("ausyscall")
    if not aus:
        return {}
    try:
        text = subprocess.run([aus, "--dump"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    return out


def _bcc_x86_64_table() -> dict[int, str]:
    # bcc.syscall consults ausyscall at import when present; its literal table is x86_64's.
    try:
        from bcc import syscall
    except Exception:   # BCC missing, or its import demanding ausyscall off x86_64
        return {}
    return {int(nr): (name.decode() if isinstance(name, bytes) else str(name))
            for nr, name in syscall.syscalls.items()}


def syscall_names(machine: str | None = None) -> dict[int, str]:
    """Syscall number → name for the running architecture; unknown numbers are named
    ``syscall_<nr>`` by the caller."""
    machine = machine or platform.machine()
    if machine == "x86_64":
        table = _bcc_x86_64_table()
        if table:
            return {**table, **_UNIFIED}
    return {**_from_ausyscall(), **_UNIFIED}
