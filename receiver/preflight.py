"""``check``: what this host has and lacks for the configured sources, one row per requirement,
each with the fix. Probes are real (a bpf() map create, a perf_event_open), not guesses."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .config import EbpfConfig
from .kernel import host

__all__ = ["CheckRow", "run_checks", "format_rows"]


@dataclass(frozen=True)
class CheckRow:
    requirement: str
    ok: bool
    detail: str = ""
    fix: str = ""
    needed_by: tuple[str, ...] = ()



def run_checks(config: EbpfConfig) -> list[CheckRow]:
    from .sources import source_classes

    enabled = config.sources.enabled()
    rows: list[CheckRow] = []
    every = tuple(enabled)

    # By capability, not uid: a container or systemd unit is uid 0 with only what it was granted.
    from .kernel.capabilities import CAPABILITIES, bpf_denied, has, missing

    lacking = {c.name for c in missing()}
    for cap in CAPABILITIES:
        ok = cap.name not in lacking
        detail = ("present" if has(cap.name) else "covered by CAP_SYS_ADMIN") if ok else "not in the effective set"
        rows.append(CheckRow(cap.name, ok, detail, f"grant {cap.name}: {cap.why}",
                             every if cap.required else ()))
    ok, detail = host.probe_bpf_syscall()
    denied = None if ok else bpf_denied()
    rows.append(CheckRow("bpf() syscall", ok, denied or detail,
                         "grant the capabilities above" if denied else
                         host.FIX_BPF_SYSCALL,
                         every))
    btf = Path("/sys/kernel/btf/vmlinux").exists()
    rows.append(CheckRow("kernel BTF (/sys/kernel/btf/vmlinux)", btf, "present" if btf else "missing",
                         "kernel with CONFIG_DEBUG_INFO_BTF=y (optional: used for fentry/fexit)", ()))
    tfs = host.tracefs_root()
    rows.append(CheckRow("tracefs mounted", tfs is not None, str(tfs) if tfs else "not mounted",
                         host.FIX_TRACEFS, every))
    # Found, not imported: importing bcc maps its compiler (~100 MB) into this process.
    if importlib.util.find_spec("bcc") is not None:
        rows.append(CheckRow("BCC Python module", True, "importable", "", every))
    else:
        rows.append(CheckRow("BCC Python module", False, "not importable", host.FIX_BCC, every))
    rows.extend(_bpf_rows(config, every))
    from .kernel.features import check_rows as kernel_feature_rows

    rows.extend(CheckRow(*row) for row in kernel_feature_rows(enabled))
    classes = source_classes()
    needed: dict[tuple[str, str], list[str]] = {}
    for name in enabled:
        cls = classes.get(name)
        if cls is None:
            rows.append(CheckRow(f"source {name}", False, "not available in this build", "", (name,)))
            continue
        for req in cls.requirements(config):
            needed.setdefault((req.kind, req.name), []).append(name)
    perf_done = False
    for (kind, name), users in needed.items():
        if kind == "tracepoint":
            cat, _, ev = name.partition(":")
            present = tfs is not None and (tfs / "events" / cat / ev).is_dir()
            rows.append(CheckRow(f"tracepoint {name}", present, "present" if present else "missing",
                                 "a kernel built with this tracepoint", tuple(users)))
        elif kind == "pmu" and name == "uprobe":   # optional: without it, no TLS plaintext
            from .sources.http_tls import probe_uprobe

            ok, detail = probe_uprobe()
            rows.append(CheckRow(f"uprobes (TLS plaintext for {', '.join(users)})", ok, detail,
                                 "a kernel with CONFIG_UPROBE_EVENTS, and CAP_SYS_ADMIN for the agent", ()))
            if ok:
                late = bool(config.sources.http.keep_sys_admin_for_tls)
                rows.append(CheckRow(
                    "uprobes on a libssl first mapped after start (TLS for http)", late,
                    "CAP_SYS_ADMIN kept after start (sources.http.keep_sys_admin_for_tls)" if late else
                    "CAP_SYS_ADMIN is dropped after start: the libssl files mapped at start are probed (for "
                    "every process, also later ones); a libssl first mapped later (a new container's own) is not",
                    "sources.http.keep_sys_admin_for_tls: true (the agent then keeps CAP_SYS_ADMIN)", ()))
        elif kind == "perf_event" and not perf_done:
            perf_done = True
            ok, detail = host.probe_perf_event()
            rows.append(CheckRow("perf events (software cpu-clock)", ok, detail, host.FIX_PERF_EVENTS,
                                 tuple(users)))
    # The export endpoints: a Collector not up yet is not the host's fault (informational); a
    # protocol mismatch (gRPC to an OTLP/HTTP port or the reverse) would deliver nothing.
    from .export.probe import probe_endpoints

    for p in probe_endpoints(config.exporter):
        rows.append(CheckRow(p.requirement, p.ok, p.detail, p.fix, every if p.blocking else ()))
    return rows


def _bpf_rows(config: EbpfConfig, every: tuple[str, ...]) -> list[CheckRow]:
    """Which kernel headers BCC compiles against (never written to the host), and the compile
    cache that spares the compile: where, how many entries, writable."""
    import os

    from .kernel.bcc import FIX_OWN_HEADERS, find_kernel_headers

    cache_dir = config.bpf.cache_dir
    entries = sorted(Path(cache_dir, "bpf").glob("*.entry")) if cache_dir else []
    headers = find_kernel_headers(config.bpf.kernel_headers)
    if headers is not None:
        hdr = CheckRow("kernel headers for BCC", True, f"{headers.describe()}; BCC_KERNEL_SOURCE "
                       f"{headers.root or 'unset'}", FIX_OWN_HEADERS, every)
    else:
        hdr = CheckRow("kernel headers for BCC", False,
                       f"none at {host.kernel_headers_dir()} nor under /usr/src"
                       + (f" (programs load only from the {len(entries)} compile cache entries)" if entries else ""),
                       FIX_OWN_HEADERS, () if entries else every)
    if not cache_dir:
        cache = CheckRow("compile cache", False, "off (bpf.cache_dir is null): every start compiles",
                         "set bpf.cache_dir", ())
    else:
        d = Path(cache_dir)
        probe = d if d.exists() else next((p for p in d.parents if p.exists()), Path("/"))
        writable = os.access(probe, os.W_OK)
        cache = CheckRow("compile cache", writable, f"{d}: {len(entries)} entries"
                         + ("" if writable else ", not writable: compiles are not kept"),
                         f"make {d} writable (a volume in containers)", ())
    return [hdr, cache]


def format_rows(rows: list[CheckRow]) -> str:
    width = max(len(r.requirement) for r in rows)
    out = []
    for r in rows:
        status = "ok" if r.ok else ("missing" if r.needed_by else "missing (optional)")
        line = f"{r.requirement:<{width}}  {status:<18} {r.detail}"
        if not r.ok and r.fix:
            line += f"\n{'':<{width}}  fix: {r.fix}"
        out.append(line)
    return "\n".join(out)
