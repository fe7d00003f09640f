"""Folded stacks and a self-contained SVG flame graph, for looking at a profile without a backend.

Folded format (Brendan Gregg's, what ``flamegraph.pl`` and speedscope read): one line per unique
stack, root first, frames joined by ``;``, then a space and the sample count. The process name is
the root frame. Kernel frames carry the ``_[k]`` suffix (the convention of BCC's ``profile -a``),
so the flame graph can colour them apart from user frames even when drawn from folded text.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from ..model import OFF_CPU, CpuProfile, Frame, StackSample

__all__ = ["to_folded", "parse_folded", "write_flamegraph_svg", "KERNEL_SUFFIX"]

KERNEL_SUFFIX = "_[k]"

WIDTH = 1200          # px, whole image
PAD = 10              # px, left/right margin
FRAME_HEIGHT = 16     # px per stack level
FONT_SIZE = 12        # px
CHAR_WIDTH = 0.59 * FONT_SIZE   # average glyph width of the monospace font, for truncation
HEADER = 40           # px above the frames (title, total)
MIN_WIDTH = 0.1       # px; narrower frames are not drawn (they cannot be seen or hovered)


def _folded_name(frame: Frame) -> str:
    # ';' separates frames and a line ends at the count: keep both out of names.
    name = frame.display_name().replace(";", ":").replace("\n", " ")
    return name + KERNEL_SUFFIX if frame.frame_type == "kernel" else name


def _root_name(sample: StackSample) -> str:
    return (sample.process_name or sample.thread_name or f"pid {sample.pid}").replace(";", ":")


def to_folded(profile: CpuProfile) -> str:
    """The profile as folded stacks, lines sorted, each ending in a newline."""
    counts: Counter[str] = Counter()
    for sample in profile.samples:
        names = [_root_name(sample)]
        names.extend(_folded_name(f) for f in reversed(sample.frames))
        counts[";".join(names)] += sample.count
    return "".join(f"{stack} {count}\n" for stack, count in sorted(counts.items()))


def parse_folded(text: str) -> list[tuple[list[str], int]]:
    """Folded text → (root-first frame names, count) per line."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


@dataclass
class _Node:
    name: str
    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children.values()), default=0)


def _tree(folded: str) -> _Node:
    root = _Node("all")
    for names, count in parse_folded(folded):
        root.count += count
        node = root
        for name in names:
            node = node.children.setdefault(name, _Node(name))
            node.count += count
    return root


def _color(name: str) -> str:
    """Kernel frames blue-green, user frames red-yellow; the shade is stable per name."""
    h = zlib.crc32(name.encode())
    v1, v2 = (h & 0xFF) / 255, ((h >> 8) & 0xFF) / 255
    if name.endswith(KERNEL_SUFFIX):
        return f"rgb({int(50 + 40 * v1)},{int(150 + 60 * v2)},{int(190 + 50 * v1)})"
    return f"rgb({int(205 + 50 * v2)},{int(80 + 150 * v1)},{int(40 + 30 * v2)})"


def _label(name: str, width: float) -> str:
    fits = int((width - 6) // CHAR_WIDTH)
    if fits < 3:
        return ""
    return name if len(name) <= fits else name[:fits - 2] + ".."


def _amount(n: int, unit: str) -> str:
    return f"{n / 1e6:.3f} ms" if unit == "ns" else f"{n} samples"


def _frames_svg(root: _Node, height: int, unit: str = "samples") -> list[str]:
    """One <g> per visible frame, root at the bottom, children left to right by name."""
    scale = (WIDTH - 2 * PAD) / root.count
    out: list[str] = []
    stack = [(root, PAD + 0.0, 0)]
    while stack:
        node, x, depth = stack.pop()
        width = node.count * scale
        if width < MIN_WIDTH:
            continue
        y = height - (depth + 1) * FRAME_HEIGHT
        name = node.name.removesuffix(KERNEL_SUFFIX)
        tooltip = f"{name} ({_amount(node.count, unit)}, {100 * node.count / root.count:.2f}%)"
        fill = "rgb(200,200,200)" if node is root else _color(node.name)
        out.append(
            f'<g class="frame"><title>{escape(tooltip)}</title>'
            f'<rect x="{x:.2f}" y="{y}" width="{width:.2f}" height="{FRAME_HEIGHT - 1}" '
            f'fill="{fill}" rx="2"/><text x="{x + 3:.2f}" y="{y + FRAME_HEIGHT - 4}">'
            f'{escape(_label(name, width))}</text></g>')
        child_x = x
        for child_name in sorted(node.children):
            child = node.children[child_name]
            stack.append((child, child_x, depth + 1))
            child_x += child.count * scale
    return out


def write_flamegraph_svg(profile_or_folded: CpuProfile | str, path: str | Path,
                         title: str = "CPU flame graph") -> None:
    """Writes a self-contained SVG flame graph: frame width ∝ samples (an off-CPU profile's:
    nanoseconds off the CPU), hover shows counts (or milliseconds)."""
    root = _tree(profile_or_folded if isinstance(profile_or_folded, str)
                 else to_folded(profile_or_folded))
    unit = "ns" if isinstance(profile_or_folded, CpuProfile) and profile_or_folded.sample_type == OFF_CPU else "samples"
    height = HEADER + max(root.depth(), 1) * FRAME_HEIGHT + PAD
    frames = _frames_svg(root, height - PAD, unit) if root.count else []
    total = _amount(root.count, unit) + (" off the CPU" if unit == "ns" else "")
    svg = "\n".join([
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}">',
        f"<style>text {{ font-family: monospace; font-size: {FONT_SIZE}px; fill: #000; "
        "pointer-events: none; } .frame:hover rect { stroke: #000; stroke-width: 0.5; }</style>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#f8f8f0"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" style="font-size: 16px">'
        f"{escape(title)}</text>",
        f"<text x=\"{PAD}\" y=\"34\">{escape(total)}</text>",
        *frames,
        "</svg>",
    ])
    Path(path).write_text(svg + "\n", encoding="utf-8")
