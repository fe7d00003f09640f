"""The README is the front door and docs/ holds the rest: the configuration reference in
docs/configuration.md matches the code, the README stays short and names the two commands a new
reader needs, no page points at anything outside the repository, and every relative link (and
its #anchor) leads to something that exists."""

from __future__ import annotations

import re
from pathlib import Path

from receiver.config_doc import render

from .harness import REPO

README = REPO / "README.md"
CONFIGURATION = REPO / "docs" / "configuration.md"
PAGES = [README, REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_configuration_reference_matches_the_code() -> None:
    assert render() in CONFIGURATION.read_text(), \
        "docs/configuration.md is stale: python -m receiver.config_doc --update docs/configuration.md"


def test_readme_is_a_short_front_door() -> None:
    readme = README.read_text()
    assert "make test" in readme and "make run" in readme
    assert len(readme.splitlines()) <= 260, "README.md is the front door: details go to docs/"


def test_pages_refer_to_nothing_outside_the_repository() -> None:
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"\bissues? #?\d+", text, re.IGNORECASE), page.name
        assert not re.search(r"design (document|card)", text, re.IGNORECASE), page.name


def test_relative_links_lead_to_existing_files_and_headings() -> None:
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):   # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: {target} does not exist"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{page.name}: no heading for {target}"
