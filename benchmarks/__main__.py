"""``python -m benchmarks [NAME]``: runs one benchmark, or all that exist (except the long ones,
which run only when named: ``soak`` takes ``SOAK_MINUTES``, 10 by default)."""

from __future__ import annotations

import importlib
import sys

NAMES = ("exporter", "profiler", "network", "syscalls", "memory")
LONG = ("soak",)


def main(argv: list[str]) -> int:
    wanted = argv[:1] or list(NAMES)
    unknown = [n for n in wanted if n not in NAMES + LONG]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(NAMES + LONG)}", file=sys.stderr)
        return 2
    rc = 0
    for name in wanted:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError:
            print(f"bench: {name} not implemented yet", file=sys.stderr)
            rc = rc or (1 if argv else 0)
            continue
        rc = module.run() or rc
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
