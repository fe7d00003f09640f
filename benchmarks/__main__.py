"""``python -m benchmarks [--smoke] [NAME]``: runs one benchmark, or all that exist (except the
long ones, which run only when named: ``soak`` takes ``SOAK_MINUTES``, 10 by default).

``--smoke`` runs each benchmark's smoke mode: every code path of the real run (the same programs,
agent, Collector and load generators) on a load and for times small enough that all six together
take a few minutes; ``tests/test_benchmarks.py`` runs it in ``make test``, so a broken benchmark
fails CI. Without a name it runs all six, ``soak`` included. A smoke run's figures prove that the
path runs and ends with its ``bench:`` lines, not what it measures: never quote them."""

from __future__ import annotations

import importlib
import sys

NAMES = ("exporter", "profiler", "network", "syscalls", "memory", "http", "startup", "offcpu")
LONG = ("soak",)


def main(argv: list[str]) -> int:
    smoke = "--smoke" in argv
    args = [a for a in argv if a != "--smoke"]
    if any(a.startswith("-") for a in args) or len(args) > 1:
        print("usage: python -m benchmarks [--smoke] [NAME]", file=sys.stderr)
        return 2
    wanted = args or list(NAMES + LONG if smoke else NAMES)
    unknown = [n for n in wanted if n not in NAMES + LONG]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(NAMES + LONG)}", file=sys.stderr)
        return 2
    rc = 0
    for name in wanted:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"benchmarks.{name}":
                raise   # a benchmark that exists but cannot import is broken, not missing
            print(f"bench: {name} not implemented yet", file=sys.stderr)
            rc = rc or (1 if args else 0)
            continue
        if smoke:
            print(f"{name}: smoke mode (proves the code path; the figures are not measurements)", flush=True)
        rc = module.run(smoke=smoke) or rc
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
