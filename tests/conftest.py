from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import REPO, Collector, fail_or_skip


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
