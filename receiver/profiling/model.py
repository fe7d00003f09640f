"""What a CPU profile is between the kernel and the output formats.

The profiler source drains the kernel's per-stack counts, symbolizes them into ``Frame``s and
hands a ``CpuProfile`` on; the writers (pprof, OTLP Profiles, folded stacks, flame graph) only
read it. Frames and mappings are frozen and hashable so the writers can deduplicate them.
An unresolved frame keeps its address and mapping (file, build id, offset): a backend can
symbolize it later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Mapping", "Frame", "StackSample", "CpuProfile", "KERNEL_MAPPING_PATH", "CPU", "OFF_CPU"]

CPU = "cpu"            # samples counted at frequency_hz: StackSample.count is samples
OFF_CPU = "off_cpu"    # time off the CPU: StackSample.count is nanoseconds (scaled by sampling)

KERNEL_MAPPING_PATH = "[kernel.kallsyms]"


@dataclass(frozen=True, slots=True)
class Mapping:
    """One executable mapping of a process (or the kernel image)."""

    start: int
    end: int
    file_offset: int
    path: str              # file path, or "[kernel.kallsyms]", "[vdso]", "/tmp/perf-PID.map"
    build_id: str = ""     # GNU build id, lowercase hex; "" when the file has none or is gone
    go_build_id: str = ""  # a Go binary's build id (.note.go.buildid); "" for other files

    def file_address(self, address: int) -> int:
        """``address`` as an offset into the file (what a backend symbolizes with)."""
        return address - self.start + self.file_offset


@dataclass(frozen=True, slots=True)
class Frame:
    """One stack frame. ``function == ""`` means unresolved."""

    address: int                      # virtual address in the process (or the kernel)
    function: str = ""
    frame_type: str = "native"        # profile.frame.type: "kernel", "native", "cpython" or "go"
    mapping: Mapping | None = None
    file: str = ""                    # source file (Python frames: co_filename)
    line: int = 0                     # source line, 0 when unknown
    _hash: int = field(default=0, compare=False, repr=False)

    def __hash__(self) -> int:
        """Computed once: frames are cached and reused across drains, and every writer keys its
        tables by them."""
        h = self._hash
        if not h:
            h = hash((self.address, self.function, self.frame_type, self.mapping, self.file, self.line)) or 1
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def resolved(self) -> bool:
        return bool(self.function)

    def display_name(self) -> str:
        """A name for folded stacks and flame graphs: the function, or file+offset."""
        if self.function:
            return self.function
        if self.frame_type == "cpython":
            return f"<python code 0x{self.address:x}>"
        if self.mapping is not None:
            base = self.mapping.path.rsplit("/", 1)[-1] or self.mapping.path
            return f"{base}+0x{self.mapping.file_address(self.address):x}"
        return f"0x{self.address:x}"


@dataclass(slots=True)
class StackSample:
    """``count`` samples of one stack in one thread."""

    frames: tuple[Frame, ...]         # leaf first: kernel frames (if any) then user frames
    count: int
    pid: int
    tid: int
    thread_name: str = ""             # the thread's comm
    process_name: str = ""            # process.executable.name
    container_id: str | None = None
    cgroup_id: int = 0
    link_span: int = 0                # span id of the request the thread served (request links), 0 none
    labels: tuple[tuple[str, str], ...] = ()   # goroutine labels (key, value), runtimes/go.py


@dataclass(slots=True)
class CpuProfile:
    """Samples from ``start_unix_nano`` for ``duration_ns`` at ``frequency_hz`` per CPU.

    ``sample_type`` ``OFF_CPU``: each sample's ``count`` is the nanoseconds its thread spent off
    the CPU with that stack (an estimate: recorded blocks divided by the sampling probability),
    ``blocks`` how many blocks were recorded. A CPU profile may carry the off-CPU profile of the
    same interval in ``off_cpu``, so both travel to the writers together."""

    start_unix_nano: int
    duration_ns: int
    frequency_hz: int
    samples: list[StackSample] = field(default_factory=list)
    sample_type: str = CPU
    off_cpu: CpuProfile | None = None
    blocks: int = 0

    @property
    def period_ns(self) -> int:
        """The time one unit of ``count`` stands for: a sampling period, or 1 ns off the CPU."""
        if self.sample_type == OFF_CPU:
            return 1
        return 1_000_000_000 // self.frequency_hz

    @property
    def total_samples(self) -> int:
        return sum(s.count for s in self.samples)
