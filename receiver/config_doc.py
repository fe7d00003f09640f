"""The configuration reference table of docs/configuration.md: ``python -m receiver.config_doc``
prints it, ``python -m receiver.config_doc --update docs/configuration.md`` replaces the table in
the file."""

import sys
from pathlib import Path

from .config import reference_table

HEADER = "| key | expected | default |"


def render() -> str:
    rows = [HEADER, "|---|---|---|"]
    rows += [f"| `{k}` | {form.replace('|', '/')} | `{default}` |" for k, form, default in reference_table()]
    return "\n".join(rows) + "\n"


def update(path: Path) -> None:
    """Replaces the table that starts at ``HEADER`` and runs to the first non-table line."""
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    path.write_text("".join(lines[:start]) + render() + "".join(lines[end:]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"] and len(sys.argv) == 3:
        update(Path(sys.argv[2]))
    else:
        print(render(), end="")
