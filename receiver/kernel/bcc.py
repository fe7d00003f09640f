"""BCC as the loader process uses it (``kernel.loader``; the agent never imports ``bcc``): compile
and load ``bpf/<name>.bpf.c``; and for the agent, tracepoint layouts of the running kernel and the
check of the Python mirrors of the programs' structs against BCC's view of them.

``#include "x.bpf.h"`` lines are inlined before compiling (with ``#line`` markers, so compiler
messages name the right file and line): BCC rewrites map calls such as ``lost.lookup()`` only in
its main file, and ``common.bpf.h`` holds such calls for every program.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import SourceUnavailableError
from . import host
from .capabilities import explain_load_failure

__all__ = ["bpf_source_dir", "load_bcc", "program_text", "compile_in_process", "tracepoint_has_field",
           "header_enum", "header_defines", "check_mirror", "KernelHeaders", "find_kernel_headers", "bcc_version"]

_INLINE = re.compile(r'^#include\s+"([\w.-]+(?:/[\w.-]+)*\.bpf\.h)"\s*$', re.M)
# The line of a program where the headers its caller names are inlined (the profiler's runtime walkers).
INCLUDES_MARK = "/* RUNTIME WALKERS */"


def bpf_source_dir() -> Path:
    """Where the BPF C files are: ``receiver/bpf`` in an installed wheel, ``bpf/`` in a checkout, or
    ``$EBPF_RECEIVER_BPF_DIR`` when set (tests that add a walker to a copy of the tree)."""
    override = os.environ.get("EBPF_RECEIVER_BPF_DIR")
    if override:
        return Path(override)
    try:
        import receiver.bpf as pkg

        for p in pkg.__path__:
            if (Path(p) / "process.bpf.c").is_file():
                return Path(p)
    except ImportError:
        pass
    return Path(__file__).resolve().parents[2] / "bpf"


def load_bcc() -> Any:
    """Imports BCC or says exactly what to install."""
    try:
        import bcc
    except ImportError:
        raise SourceUnavailableError("bcc", "the BCC Python module is not importable", host.FIX_BCC) from None
    return bcc


def program_text(bpf_file: str, includes: Sequence[str] = ()) -> str:
    """The program's C text with its ``*.bpf.h`` includes inlined (each once), and ``includes``
    (``bpf/``-relative ``*.bpf.h`` paths) inlined in place of its ``INCLUDES_MARK`` line."""
    src_dir = bpf_source_dir()
    path = src_dir / bpf_file
    text = path.read_text()
    seen: set[str] = set()
    if includes:
        if text.count(INCLUDES_MARK) != 1:
            raise ValueError(f"{bpf_file} has no single {INCLUDES_MARK} line for {', '.join(includes)}")
        for name in includes:
            if not _INLINE.fullmatch(f'#include "{name}"') or ".." in name.split("/"):
                raise ValueError(f"not a bpf/ header: {name!r}")
        text = text.replace(INCLUDES_MARK, "".join(f'#include "{name}"\n' for name in includes).rstrip("\n"))

    def inline(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in seen:
            return ""
        seen.add(name)
        line = text.count("\n", 0, m.start()) + 2
        return (f'#line 1 "{name}"\n{(src_dir / name).read_text()}\n'
                f'#line {line} "{bpf_file}"')

    return _INLINE.sub(inline, text)


# ------------------------------------------------------------------ kernel headers

FIX_OWN_HEADERS = ("install linux-headers-amd64 (the image ships it under /usr/src), or set "
                   "bpf.kernel_headers to a header tree; /lib/modules is never written")


class KernelHeaders(NamedTuple):
    """The header tree BCC compiles against: ``root`` (``BCC_KERNEL_SOURCE``; "" for BCC's own
    ``/lib/modules/$(uname -r)/build``), where it came from, and the ``-I`` flags that add the
    generated half of a Debian split tree (``linux-headers-*-amd64`` beside ``*-common``)."""

    root: str
    origin: str
    cflags: tuple[str, ...]

    def describe(self) -> str:
        path = Path(self.root) if self.root else host.kernel_headers_dir()
        real = path.resolve()
        return f"{path}{f' -> {real}' if real != path else ''} ({self.origin})"


def _arch_dir() -> str:
    m = os.uname().machine
    return {"x86_64": "x86", "aarch64": "arm64"}.get(m, m)


def _tree(path: Path, origin: str) -> KernelHeaders | None:
    """A header tree BCC can use from ``path``: a whole tree (``include/linux/kconfig.h``), or a
    Debian arch tree (generated headers only) whose ``Makefile`` names its common half."""
    path = path.resolve()
    if (path / "include/linux/kconfig.h").is_file() and (path / "include/generated").is_dir():
        return KernelHeaders(str(path), origin, ())
    if not (path / "include/generated").is_dir():
        return None
    try:
        m = re.search(r"^include\s+(\S+)/Makefile\s*$", (path / "Makefile").read_text(), re.M)
    except OSError:
        return None
    common = Path(m.group(1)) if m else None
    if common is None or not (common / "include/linux/kconfig.h").is_file():
        return None
    arch = _arch_dir()
    flags = tuple(f"-I{path}/{d}" for d in (f"arch/{arch}/include/generated", "include",
                                             f"arch/{arch}/include/generated/uapi", "include/generated/uapi"))
    return KernelHeaders(str(common.resolve()), origin, flags)


def find_kernel_headers(configured: str | None = None) -> KernelHeaders | None:
    """The headers BCC compiles against, never written anywhere: ``configured``
    (``bpf.kernel_headers``) when set; else the running kernel's own at
    ``/lib/modules/$(uname -r)/build``; else the newest generic tree under ``/usr/src`` (the
    image's, or ``make setup``'s linux-headers-amd64). ``None``: there are none."""
    if configured:
        return _tree(Path(configured), "bpf.kernel_headers")
    build = host.kernel_headers_dir()
    if (build / "include").is_dir():
        return KernelHeaders("", "the running kernel's", ())
    for d in sorted(Path("/usr/src").glob("linux-headers-*"), key=lambda p: _version_key(p.name), reverse=True):
        found = _tree(d, "bundled generic headers")
        if found is not None:
            return found
    return None


def _version_key(name: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", name)]


def bcc_version() -> str:
    """BCC's version and libbcc's file, found without importing ``bcc`` (its compiler)."""
    import importlib.util

    spec = importlib.util.find_spec("bcc")
    version = ""
    if spec is not None and spec.origin:
        try:
            version = (Path(spec.origin).parent / "version.py").read_text().strip()
        except OSError:
            pass
    lib = next((str(p.resolve()) for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")
                for p in [Path(d) / "libbcc.so.0"] if p.exists()), "")
    return f"{version} {lib}"


def compile_in_process(source_name: str, bpf_file: str, cflags: Sequence[str] = (),
                       includes: Sequence[str] = (), headers: Sequence[Any] | None = None) -> Any:
    """Compiles and loads ``bpf/<bpf_file>`` with BCC in this process (the loader's), or raises
    ``SourceUnavailableError`` saying what is missing: BCC, the program file, kernel headers for BCC's compiler, or the
    privilege to call bpf() (told apart from a compile error by a real bpf() probe). ``headers``
    (a ``KernelHeaders``) is the header tree; ``None`` finds one."""
    bcc = load_bcc()
    src_dir = bpf_source_dir()
    if not (src_dir / bpf_file).is_file():
        raise SourceUnavailableError(source_name, f"BPF program {src_dir / bpf_file} is missing from the installation")
    tree = KernelHeaders(headers[0], headers[1], tuple(headers[2])) if headers else find_kernel_headers()
    if tree is None:
        raise SourceUnavailableError(source_name, f"no kernel headers at {host.kernel_headers_dir()} nor under "
                                     "/usr/src", FIX_OWN_HEADERS)
    if tree.root:
        os.environ["BCC_KERNEL_SOURCE"] = tree.root
    else:
        os.environ.pop("BCC_KERNEL_SOURCE", None)
    try:
        return bcc.BPF(text=program_text(bpf_file, includes), cflags=[f"-I{src_dir}", *cflags, *tree.cflags])
    except Exception as e:
        # BCC reports a denied bpf() as "Failed to compile BPF module": tell the two apart.
        reason = explain_load_failure(e)
        if reason:
            raise SourceUnavailableError(source_name, reason, host.FIX_PRIVILEGES) from e
        ok, detail = host.probe_bpf_syscall()
        if not ok:
            raise SourceUnavailableError(source_name, f"the kernel refused bpf(): {detail}",
                                         host.FIX_BPF_SYSCALL) from e
        raise SourceUnavailableError(source_name, f"{bpf_file} failed to compile or load: {e}") from e


def tracepoint_has_field(tracepoint: str, field: str) -> bool:
    """Whether the running kernel's ``category:name`` tracepoint has ``field`` (fields come and
    go between kernel versions; a program compiled against a missing one fails to load)."""
    root = host.tracefs_root()
    if root is None:
        return False
    category, _, name = tracepoint.partition(":")
    try:
        text = (root / "events" / category / name / "format").read_text()
    except OSError:
        return False
    return any(line.strip().startswith("field:") and
               line.split(";", 1)[0].rsplit(None, 1)[-1].split("[", 1)[0] == field
               for line in text.splitlines())


def header_enum(header: str, prefix: str) -> tuple[str, ...]:
    """Names of ``#define <prefix>_<NAME> <n>`` constants of a ``bpf/`` header, lower-cased and
    ordered by value: e.g. the slots of a program's ``lost`` array, so user space reads the
    names from the same place the kernel side counts them."""
    text = (bpf_source_dir() / header).read_text()
    pattern = rf"^#define\s+{prefix}_(\w+)\s+(\d+)\s*(?:/\*.*\*/)?\s*$"
    found = {int(v): n.lower() for n, v in re.findall(pattern, text, re.M)}
    names = tuple(found[i] for i in sorted(found))
    if list(sorted(found)) != list(range(len(found))):
        raise ValueError(f"{header}: {prefix}_* values are not 0..{len(found) - 1}")
    return names


def header_defines(header: str) -> dict[str, int]:
    """Every ``#define NAME <integer>`` of a ``bpf/`` header (decimal or hex), by name: user space
    takes the constants it shares with a program from the program's own header."""
    text = (bpf_source_dir() / header).read_text()
    pattern = r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*(?:/\*.*\*/)?\s*$"
    return {name: int(value, 0) for name, value in re.findall(pattern, text, re.M)}


def _layout(cls: Any) -> dict[str, tuple[int, int]]:
    return {name: (getattr(cls, name).offset, getattr(cls, name).size) for name, *_ in cls._fields_}


def check_mirror(bpf: Any, map_name: str, part: str, mirror: Any, source_name: str) -> None:
    """Compares a ctypes mirror with BCC's view of the struct that ``map_name``'s key or leaf
    (``part``) has, as the loader described it: same size, and each mirrored field at the same
    offset with the same size. A mismatch means the ``.h`` and the Python side disagree: fail loudly instead of decoding
    garbage."""
    theirs = getattr(bpf[map_name], part)
    problems = []
    if ctypes.sizeof(theirs) != ctypes.sizeof(mirror):
        problems.append(f"size {ctypes.sizeof(mirror)} here, {ctypes.sizeof(theirs)} in the program")
    their_layout = _layout(theirs) if hasattr(theirs, "_fields_") else {}
    for name, (offset, size) in _layout(mirror).items():
        if name.startswith("_pad") or name == "pad":
            continue
        got = their_layout.get(name)
        if got is None:
            problems.append(f"no field {name} in the program's struct")
        elif got != (offset, size):
            problems.append(f"{name} at offset {offset} size {size} here, offset {got[0]} size {got[1]} there")
    if problems:
        raise SourceUnavailableError(
            source_name, f"{mirror.__name__} does not match the program's struct ({map_name}.{part}): "
            + "; ".join(problems), "the installation is inconsistent: reinstall the agent")
