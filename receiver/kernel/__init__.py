"""The layer beneath ``sources/`` and ``profiling/``: what the agent asks of the host kernel
and of /proc, and the fix to name when the host says no.

- ``host``: privileges, tracefs, kernel headers, real bpf()/perf_event_open probes, fix texts.
- ``bcc``: compiling and loading ``bpf/*.bpf.c`` with BCC; tracepoint fields of the running
  kernel; ctypes mirrors checked against BCC's view of the structs.
- ``identity``: host attributes, process identity from /proc, cgroup ids and container ids.
- ``filters``: process filters put into BPF maps (never into program text).
- ``syscall_table``: syscall numbers and errno values to names.
- ``clock``: ``bpf_ktime_get_ns()`` to Unix time.
- ``privileges``: dropping the capabilities the agent no longer needs once its programs are loaded.

Nothing here imports from the layers above (sources, profiling, convert, pipeline, export).
"""
