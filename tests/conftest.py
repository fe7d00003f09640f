from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import REPO, Collector, fail_or_skip, in_ci

# ------------------------------------------------------------------------------ test tiers
#
# ``make test-unit`` runs ``pytest -m unit``: no root, no BPF, no servers (Collector, Prometheus,
# docker, qemu), no Go. ``unit`` is never written in a test file: every collected test gets it
# here unless one of the rules below says the test needs the host. A test that needs the host
# and matches no rule fails in ``make test-unit``, which runs with every capability dropped.

# Fixtures that start or build something, or need root.
HOST_FIXTURES = frozenset({"bpf_ok", "collector", "otelcol_bin", "prometheus_bin", "vm_tools",
                           "tls_collector", "mtls_collector",
                           "_needs_root"})   # tests/profiling/test_symbolize.py's autouse fixture
# Markers that say the same (pyproject.toml's [tool.pytest.ini_options] registers them).
HOST_MARKERS = frozenset({"bpf", "collector", "docker", "kernels", "host"})
# Tests that need the host but say so neither with a fixture nor a marker, in files this
# conftest's owners do not edit: node-id prefixes, a last resort (each with its reason).
HOST_NODEIDS: dict[str, str] = {
    # `go tool pprof` reads our pprof: the Go toolchain (its first call builds pprof, ~25 s).
    "tests/convert/test_pprof_proto.py::test_go_tool_pprof_reads_it": "Go",
    "tests/profiling/test_profile_writers.py::test_go_tool_pprof_names_the_functions_with_their_counts": "Go",
    # Hides /usr/include in a new mount namespace: CAP_SYS_ADMIN.
    "tests/test_capabilities.py::test_syscall_names_need_no_audit_tools_nor_headers": "unshare --mount",
}


def _needs_host(item: pytest.Item) -> str | None:
    fixtures = HOST_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if fixtures:
        return f"fixture {sorted(fixtures)[0]}"
    for m in item.iter_markers():
        if m.name in HOST_MARKERS:
            return f"marker {m.name}"
    for prefix, why in HOST_NODEIDS.items():
        if item.nodeid == prefix or item.nodeid.startswith(prefix + "::") or item.nodeid.startswith(prefix + "["):
            return why
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_host(item) is None:
            item.add_marker(pytest.mark.unit)
    # The kernel matrix last: its guest image builds in the background meanwhile (below).
    items.sort(key=lambda item: item.get_closest_marker("kernels") is not None)


# ------------------------------------------------------------- the kernel matrix's guests
#
# A session that will run the kernel matrix starts its first guest lane in the background at
# once (tests/kernels/vm.py): it builds the guest image (minutes on a fresh machine: debootstrap,
# three kernels, a venv), then boots the kernels one after another, niced, in whatever CPU the
# rest of the suite leaves idle. The matrix test, last, gives that lane its priority back, adds
# lanes of its own for the kernels not yet started and collects every guest's results. Without
# OTELCOL_BIN (the guests' Collector; `make test` sets it) the background process only builds
# the image. Its output goes to out/kernel-image-build.log.

_image_builder: subprocess.Popen[bytes] | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _image_builder
    if (os.environ.get("KERNEL_MATRIX_PREBUILD", "1") == "0" or os.geteuid() != 0
            or session.config.option.collectonly):
        return
    if not any(item.get_closest_marker("kernels") for item in session.items):
        return
    if not all(shutil.which(t) for t in ("qemu-system-x86_64", "debootstrap", "cpio")):
        return   # the matrix test says what is missing
    from .kernels import vm

    out_root = REPO / "out" / "kernel-matrix"
    shutil.rmtree(out_root, ignore_errors=True)
    otelcol = os.environ.get("OTELCOL_BIN", "")
    cmd = (["lane", str(out_root), str(Path(otelcol).parent), str(vm.VM_TIMEOUT)]
           if otelcol and Path(otelcol).is_file() else ["build"])
    log = REPO / "out" / "kernel-image-build.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "wb") as f:
        _image_builder = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "tests.kernels.vm", *cmd],
                                          cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
    if cmd[0] == "lane":   # known from now on (nice execs the lane in place: same pid)
        out_root.mkdir(parents=True, exist_ok=True)
        (out_root / vm.LANE_PID).write_text(str(_image_builder.pid))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A session that ends first (interrupted, -x) stops the build and any guest of the lane; the
    # next build resumes it.
    if _image_builder is not None and _image_builder.poll() is None:
        os.killpg(_image_builder.pid, signal.SIGTERM)   # debootstrap and dpkg too
        try:
            _image_builder.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(_image_builder.pid, signal.SIGKILL)
            _image_builder.wait()


# ------------------------------------------------------------------------- skips under CI
#
# In CI (``CI`` = true/1/yes, as .ci/run exports) a skipped test fails the run: every test must
# run there, and a missing tool is for the Makefile to install. Outside CI a skip stays a skip.


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (a skip fails the run when CI is set): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"module skipped in CI (a skip fails the run when CI is set): {reason}"


@pytest.fixture(scope="session")
def otelcol_bin() -> str:
    path = os.environ.get("OTELCOL_BIN")
    if not path:
        try:
            path = subprocess.run(["bash", str(REPO / "deploy/scripts/build-otelcol.sh")],
                                  check=True, capture_output=True, text=True).stdout.strip()
        except subprocess.CalledProcessError as e:
            fail_or_skip(f"the Collector could not be built: {e.stderr[-2000:]}")
    if not path or not Path(path).is_file():
        fail_or_skip("no Collector binary (make test builds it)")
    return str(path)


@pytest.fixture
def collector(otelcol_bin: str, tmp_path: Path) -> Iterator[Collector]:
    c = Collector(otelcol_bin, tmp_path).start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def bpf_ok() -> None:
    """Root and BCC; used by every test that loads BPF programs."""
    if os.geteuid() != 0:
        fail_or_skip("loading BPF programs needs root")
    try:
        import bcc  # noqa: F401
    except ImportError:
        fail_or_skip("BCC is not importable (apt-get install python3-bpfcc; make setup links it)")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if not path:
        fail_or_skip("Prometheus is not installed (make test installs Debian's prometheus)")
    return str(path)
