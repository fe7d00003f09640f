"""The package's layering, read from its source: no import circles, and no module imports from a
layer above its own (imports inside functions count too: a lazy import is still a dependency).

    0 base       errors, model, config, telemetry, records, aggregates, consumer, proto
    1 kernel     BCC loading, tracefs, capabilities, /proc and cgroup identity, syscall names
    2 profiling  sampling program, symbolization, writers (its data model is in layer 0)
    3 convert    the conversion rules (records/events/profiles → OTLP)
    4 sources    one per BPF program: decode, aggregate, hand records to a consumer
    5 pipeline   resources + conversion + submission to a sink
    6 export     OTLP exporters
    7 service, preflight, profile_cli
    8 cli, __main__, the package's public API
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "receiver"

LAYERS = {
    "receiver._version": 0, "receiver.errors": 0, "receiver.model": 0, "receiver.config": 0,
    "receiver.telemetry": 0, "receiver.web_config": 0, "receiver.records": 0, "receiver.aggregates": 0,
    "receiver.proto": 0,
    "receiver.consumer": 0, "receiver.profiling.model": 0,   # the profile data model, plain dataclasses
    "receiver.kernel": 1, "receiver.profiling": 2, "receiver.convert": 3, "receiver.sources": 4,
    "receiver.protocols": 3,   # protocol parsers (HTTP/1) for the request source
    "receiver.pipeline": 5, "receiver.export": 6, "receiver.service": 7, "receiver.preflight": 7,
    "receiver.profile_cli": 7, "receiver.cli_warm": 7,   # warm-cache: compiles what profile would load
    "receiver.cli": 8, "receiver.__main__": 8, "receiver.config_doc": 8,
    "receiver.bpf": 0,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every receiver module ``path`` imports, at any depth of the file."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("receiver"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("receiver"):
                continue
            out.add(mod)
            for a in node.names:   # `from . import logs` names a module
                sub = f"{mod}.{a.name}"
                if (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (PKG.parent / Path(*sub.split(".")) / "__init__.py").exists():
                    out.add(sub)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PKG.rglob("*.py"):
        name = _module_name(path)
        if name.startswith("receiver.proto"):
            continue
        graph[name] = _imports(path, name)
    return graph


def _layer(name: str) -> int:
    if name == "receiver":
        return 8
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return LAYERS[best]


def test_no_module_imports_from_a_layer_above() -> None:
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_circles() -> None:
    graph = _graph()
    # A package's __init__ re-exporting its own modules is not a circle through them.
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and d in graph)} for m, deps in graph.items()}
    seen: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for d in edges.get(m, ()):
            if seen.get(d) == 1:
                circles.append(" → ".join(stack[stack.index(d):] + [d]))
            elif d not in seen:
                visit(d)
        stack.pop()
        seen[m] = 2

    for m in sorted(edges):
        if m not in seen:
            visit(m)
    assert not circles, "\n".join(circles)


def _exists(name: str) -> bool:
    if name == "receiver.bpf":   # bpf/ ships as receiver/bpf in the wheel (pyproject's package-dir)
        return (PKG.parent / "bpf").is_dir()
    path = PKG.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists() or path.is_dir()


def test_every_import_of_the_package_resolves() -> None:
    """A relative import that names no module (one level short after a move) fails only when
    its line runs; read here, it fails at once."""
    missing = [f"{m} imports {d}" for m, deps in _graph().items() for d in deps
               if not _exists(d)]
    assert not missing, "\n".join(missing)


def test_the_checker_sees_a_circle_and_an_upward_import() -> None:
    """The two checks above would find what they look for (they are not vacuous)."""
    graph = _graph()
    assert "receiver.kernel.bcc" in graph["receiver.sources.base"]     # a real edge is seen
    assert _layer("receiver.sources.network") > _layer("receiver.kernel.identity")
    assert "receiver.profile_cli" in graph["receiver.cli"]
    assert "receiver.convert.network" in graph["receiver.convert.converter"]  # `from . import network`
