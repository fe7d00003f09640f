"""Fixtures the profiling tests share."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """A directory of the test's own on bpffs, for the agent's pinned maps; removed after."""
    d = Path("/sys/fs/bpf") / f"ebpf_otlp_test_{uuid.uuid4().hex[:12]}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)
