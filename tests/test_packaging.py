"""The wheel (and so the container image) ships every subpackage: pyproject's explicit package
list names each directory of ``receiver/`` that has an ``__init__.py`` (``receiver.kernel`` was
once missing from it)."""

from __future__ import annotations

import tomllib

from .harness import REPO


def test_every_subpackage_is_in_the_wheel() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "receiver").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
