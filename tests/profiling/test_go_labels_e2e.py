"""Goroutine labels (``pprof.Do``, ``pprof.SetGoroutineLabels``) on the samples of the goroutine
that set them, and on no other goroutine's samples in the same process: stripped Go programs
built with Go 1.21 and 1.23 (labels in a Go map), 1.24 (a slice of key/value strings) and the
host's Go, profiled with real BPF (receiver/profiling/runtimes/go.py).

Each toolchain's row of ``GO_OFFSETS`` is checked against the DWARF of an unstripped binary it
builds (deploy/scripts/go-offsets), so a wrong row fails here rather than reading wrong memory."""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from receiver.convert.profiles import profile_to_otlp
from receiver.profiling.output.pprof import to_pprof
from receiver.profiling.runtimes.go import (
    GO_OFFSETS,
    LABEL_ATTRIBUTE_PREFIX,
    MAX_KEY_BYTES,
    MAX_LABELS,
    GoLabels,
    layout_for,
)

from ..harness import go_env
from .test_go_e2e import _go, go_build, go_version
from .test_unwind_e2e import profiled, user_frames

pytestmark = [pytest.mark.bpf]

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ["1.21.13", "1.23.12", "1.24.0", "host"]

LABELS_SOURCE = """\
package main

import (
	"context"
	"fmt"
	"os"
	"runtime/pprof"
	"strconv"
	"time"
)

var sinks [3]uint64

// Three goroutines at once, each in its own leaf: one labelled with pprof.Do, one with
// SetGoroutineLabels, one without labels.
//
//go:noinline
func spinAlpha(n int) uint64 {
	var s uint64
	for i := 0; i < n; i++ {
		s += uint64(i) ^ (s >> 3)
	}
	return s
}

//go:noinline
func spinGamma(n int) uint64 {
	var s uint64
	for i := 0; i < n; i++ {
		s += uint64(i) ^ (s >> 5)
	}
	return s
}

//go:noinline
func spinPlain(n int) uint64 {
	var s uint64
	for i := 0; i < n; i++ {
		s += uint64(i) ^ (s >> 7)
	}
	return s
}

func main() {
	secs, _ := strconv.Atoi(os.Args[1])
	end := time.Now().Add(time.Duration(secs) * time.Second)
	done := make(chan bool)
	go func() {
		labels := pprof.Labels("worker", "alpha", "request", "r-1", "a_key_longer_than_fifteen", "v")
		pprof.Do(context.Background(), labels, func(context.Context) {
			for time.Now().Before(end) {
				sinks[0] += spinAlpha(200000)
			}
		})
		done <- true
	}()
	go func() {
		// 12 labels: a Go map of two buckets before 1.24; 10 are kept, the first by key.
		kv := []string{"worker", "gamma"}
		for i := 0; i < 11; i++ {
			kv = append(kv, fmt.Sprintf("k%02d", i), fmt.Sprintf("v%d", i))
		}
		pprof.SetGoroutineLabels(pprof.WithLabels(context.Background(), pprof.Labels(kv...)))
		for time.Now().Before(end) {
			sinks[1] += spinGamma(200000)
		}
		done <- true
	}()
	go func() {
		for time.Now().Before(end) {
			sinks[2] += spinPlain(200000)
		}
		done <- true
	}()
	<-done
	<-done
	<-done
}
"""

LEAVES = ("main.spinAlpha", "main.spinGamma", "main.spinPlain")
MIN_SAMPLES = 40
ALPHA = {"worker": "alpha", "request": "r-1", "a_key_longer_than_fifteen"[:MAX_KEY_BYTES]: "v"}
GAMMA = {f"k{i:02d}": f"v{i}" for i in range(MAX_LABELS)}   # k00..k09 of k00..k10 and worker


def _by_leaf(profile: Any) -> dict[str, collections.Counter[tuple[tuple[str, str], ...]]]:
    """Per Go leaf function: samples by label set."""
    out: dict[str, collections.Counter[tuple[tuple[str, str], ...]]] = collections.defaultdict(collections.Counter)
    for s in profile.samples:
        frames = user_frames(s)
        if frames and frames[0].function.startswith("main.spin"):
            out[frames[0].function][s.labels] += s.count
    return out


def _profile_until(program: Path, n: int, limit_s: float = 90.0) -> Any:
    """The program profiled in 3-second drains until each spinning leaf has ``n`` samples (a
    loaded machine gives the three goroutines few), as one profile."""
    from receiver.kernel.compile_cache import wait_deferred

    with profiled(str(program), "3600") as (_, prof):
        prof.warm()
        assert wait_deferred(300), "the profiler's walkers did not load"
        prof.sampler.drain()
        samples: list[Any] = []
        deadline = time.monotonic() + limit_s
        while True:
            profile = prof.measure(3.0)
            samples += profile.samples
            profile = dataclasses.replace(profile, samples=samples)
            counts = _by_leaf(profile)
            if all(sum(counts[leaf].values()) >= n for leaf in LEAVES) or time.monotonic() > deadline:
                return profile


def _offsets_from_dwarf(version: str, tmp_path: Path) -> dict[str, Any]:
    """go-offsets' reading of an unstripped binary built with ``version``."""
    program = go_build(version, tmp_path / "dwarf", LABELS_SOURCE)
    out = subprocess.run([str(_go("host")), "run", ".", str(program)], cwd=ROOT / "deploy/scripts/go-offsets",
                         env={**go_env(tmp_path), "GOTOOLCHAIN": "local"}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.mark.parametrize("version", VERSIONS)
def test_labels_on_their_goroutine_only(bpf_ok: None, tmp_path: Path, version: str) -> None:
    program = go_build(version, tmp_path / "labels", LABELS_SOURCE, "-ldflags=-s -w")
    real = go_version(program)
    if version != "host":
        assert real == f"go{version}"
    # The offsets the kernel reads through are the ones this toolchain's DWARF gives.
    dwarf = _offsets_from_dwarf(version, tmp_path)
    layout = layout_for(real)
    assert layout is not None, f"{real} is not in GO_OFFSETS: {sorted(GO_OFFSETS)}"
    assert (layout.g_m, layout.g_labels, layout.m_g0, layout.m_curg, layout.kind) == \
        (dwarf["g.m"], dwarf["g.labels"], dwarf["m.g0"], dwarf["m.curg"], dwarf["labels"]), dwarf
    if layout.kind == "slice":
        assert (layout.list_at, layout.label_size, layout.key_at, layout.value_at) == \
            (dwarf["labelMap.list"], dwarf["label.size"], dwarf["label.key"], dwarf["label.value"]), dwarf
    else:
        assert (layout.hmap_count, layout.hmap_b, layout.hmap_buckets, layout.hmap_oldbuckets, layout.bucket_keys,
                layout.bucket_values, layout.bucket_overflow, layout.bucket_size) == \
            (dwarf["hmap.count"], dwarf["hmap.B"], dwarf["hmap.buckets"], dwarf["hmap.oldbuckets"],
             dwarf["bucket.keys"], dwarf["bucket.values"], dwarf["bucket.overflow"], dwarf["bucket.size"]), dwarf

    profile = _profile_until(program, MIN_SAMPLES)
    by_leaf = _by_leaf(profile)
    alpha, gamma, plain = by_leaf["main.spinAlpha"], by_leaf["main.spinGamma"], by_leaf["main.spinPlain"]
    for name, counts in (("alpha", alpha), ("gamma", gamma), ("plain", plain)):
        assert sum(counts.values()) >= MIN_SAMPLES, (name, dict(by_leaf))
    want_alpha = tuple(sorted(ALPHA.items()))
    want_gamma = tuple(sorted(GAMMA.items()))
    # The labelled goroutines' samples carry their own labels (pprof.Do; SetGoroutineLabels) ...
    assert alpha[want_alpha] / sum(alpha.values()) >= 0.95, alpha
    assert gamma[want_gamma] / sum(gamma.values()) >= 0.95, gamma
    # ... and never another goroutine's: no other label set on them, none on the unlabelled one.
    assert set(alpha) <= {want_alpha, ()} and set(gamma) <= {want_gamma, ()}, (alpha, gamma)
    assert set(plain) == {()}, plain

    # OTLP: sample attributes process.context.label.<key>; pprof: labels <key>.
    request = profile_to_otlp(profile)
    d = request.dictionary
    attrs_of = collections.Counter()
    for rp in request.resource_profiles:
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                for sample in p.samples:
                    kv = {d.string_table[d.attribute_table[i].key_strindex]: d.attribute_table[i].value.string_value
                          for i in sample.attribute_indices}
                    labels = {k[len(LABEL_ATTRIBUTE_PREFIX):]: v for k, v in kv.items()
                              if k.startswith(LABEL_ATTRIBUTE_PREFIX)}
                    attrs_of[tuple(sorted(labels.items()))] += 1
    assert want_alpha in attrs_of and want_gamma in attrs_of, attrs_of
    pprof = to_pprof(profile)
    strings = pprof.string_table
    pprof_sets = {tuple(sorted((strings[lb.key], strings[lb.str]) for lb in s.label
                               if strings[lb.key] in {"worker", "request", "k00"})) for s in pprof.sample}
    assert (("request", "r-1"), ("worker", "alpha")) in pprof_sets and (("k00", "v0"),) in pprof_sets, pprof_sets


class _FakeMap(dict):  # type: ignore[type-arg]
    """go_processes without BPF: what GoLabels writes, keyed by pid."""

    Key = ctypes.c_uint32

    def __setitem__(self, k: Any, v: Any) -> None:
        super().__setitem__(k.value, v)

    def __delitem__(self, k: Any) -> None:
        super().__delitem__(k.value)


def test_go_version_outside_the_table_gets_no_labels(tmp_path: Path) -> None:
    """A stripped binary's version is read from .go.buildinfo; a version with a row is entered in
    go_processes with that row's offsets, one without is not entered and is counted (the same
    binary with its version string rewritten to go1.99.0)."""
    assert layout_for("go1.20.14") is None and layout_for(None) is None
    program = go_build("host", tmp_path / "labels", LABELS_SOURCE, "-ldflags=-s -w")
    data = program.read_bytes()
    version = go_version(program).encode()
    assert data.count(version) >= 1
    other = tmp_path / "labels-199"
    other.write_bytes(data.replace(version, b"go1.99." + b"9" * (len(version) - 7)))
    other.chmod(0o755)
    procs = [subprocess.Popen([str(p), "30"], stdout=subprocess.DEVNULL) for p in (program, other)]
    try:
        fake = _FakeMap()
        labels = GoLabels({"go_processes": fake}, 16)
        labels.note_process(procs[0].pid)
        labels.note_process(procs[1].pid)
        layout = layout_for(version.decode())
        assert layout is not None and set(fake) == {procs[0].pid}
        entry = fake[procs[0].pid]
        assert (entry.m, entry.curg, entry.g0, entry.labels) == (layout.g_m, layout.m_curg, layout.m_g0,
                                                                  layout.g_labels)
        assert labels.stats["processes"] == 1 and labels.stats["unsupported_version"] == 1, labels.stats
        labels.forget(procs[0].pid)
        assert not fake
    finally:
        for p in procs:
            p.kill()
            p.wait()
