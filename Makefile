# One entry point for people and CI. Every target installs what it needs, idempotently.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH ?=
CONFIG ?= deploy/config/local.yaml
HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(HASH)

.PHONY: help setup system host venv otelcol warm-cache test test-unit test-kernels lint run check bench proto clean \
	k8s-prebuild k8s-up k8s-down

help:
	@echo "make test-unit      lint, then the unit tier (pytest -m unit): no root, BPF, servers or Go; < 2 min"
	@echo "make test           install everything needed, lint (ruff), then run the whole test suite (CI runs this)"
	@echo "make test-kernels   the agent's smoke suite on Debian's 5.10, 6.1 and 6.12 kernels (qemu)"
	@echo "make run            local Collector + the agent pointed at it (Ctrl-C stops both)"
	@echo "make check          preflight: what this host has and lacks for the configured sources (reads only)"
	@echo "make bench [BENCH=exporter|profiler|network|syscalls|memory|soak]  (soak: SOAK_MINUTES=10, not in the default set)"

setup: system host venv otelcol warm-cache

# The compile cache for this kernel and $(CONFIG) (and `profile --pid`), so the first `make run`
# loads its programs without compiling. Once per kernel release, program text and config; a
# failure is reported and does not fail the setup (the agent compiles at start instead).
WARM_STAMP := $(VENV)/.warm-$(shell uname -r)-$(shell (find bpf -type f | sort | xargs cat; cat $(CONFIG)) 2>/dev/null | sha256sum | cut -c1-12)
warm-cache: $(WARM_STAMP)

$(WARM_STAMP): | venv
	@$(PY) -m receiver warm-cache --config $(CONFIG) && touch $@ || echo "warm-cache failed: the agent compiles its programs at start instead"

system:
	@bash deploy/scripts/install-system-deps.sh --test

host:
	@bash deploy/scripts/prepare-host.sh

venv: $(STAMP)

# Debian's python3 (the one python3-bpfcc is built for) with only bcc linked in from
# dist-packages: the rest of Debian's site-packages stays out of the venv.
$(STAMP): pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  ln -sfn /usr/lib/python3/dist-packages/bcc "$$site/bcc"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

otelcol:
	@bash deploy/scripts/build-otelcol.sh >/dev/null

test: k8s-prebuild setup lint
	OTELCOL_BIN=$$(bash deploy/scripts/build-otelcol.sh) $(PY) -m pytest $(PYTEST_ARGS)

# The tier for every commit: tests/conftest.py marks `unit` every test that needs no root, BPF,
# Collector, Prometheus, docker, qemu or Go. Run by root, it drops every capability first
# (setpriv), so a unit test that secretly needs one fails here instead of passing.
UNPRIVILEGED := $(if $(filter 0,$(shell id -u)),setpriv --no-new-privs --inh-caps=-all --ambient-caps=-all --bounding-set=-all --)
test-unit: venv lint
	EBPF_TEST_FUZZ_SCALE=0.25 $(UNPRIVILEGED) $(PY) -m pytest -m unit $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check receiver tests benchmarks deploy examples

# tests/test_kubernetes.py's Kubernetes binaries (~7.5 min on 2 cores, once; cached in
# ~/.cache/ebpf-otlp-receiver/kubernetes): `make test` starts their build in the background,
# niced, before the rest of its setup; the test waits for it. Log: out/k8s-build.log.
k8s-prebuild:
	@mkdir -p out; setsid nohup bash deploy/scripts/build-kubernetes.sh >out/k8s-build.log 2>&1 </dev/null &

# A single-node Kubernetes v1.34 with the agent's images loaded (deploy/scripts/k8s-cluster.py);
# KUBECONFIG is printed. `make k8s-down` stops it and removes all it made.
k8s-up: venv
	@$(PY) deploy/scripts/k8s-cluster.py up && $(PY) deploy/scripts/k8s-cluster.py images >/dev/null

k8s-down:
	@$(PY) deploy/scripts/k8s-cluster.py down

# Also part of `make test`; the guest image is cached in ~/.cache/ebpf-otlp-receiver.
test-kernels: setup
	OTELCOL_BIN=$$(bash deploy/scripts/build-otelcol.sh) $(PY) -m pytest tests/kernels $(PYTEST_ARGS)

run: setup
	@OTELCOL_BIN=$$(bash deploy/scripts/build-otelcol.sh) $(PY) deploy/scripts/run-local.py --config $(CONFIG)

# Reads the host only (installs nothing, mounts nothing): the project venv is all it makes.
check: venv
	$(VENV)/bin/ebpf-otlp-receiver check --config $(CONFIG)

bench: setup
	OTELCOL_BIN=$$(bash deploy/scripts/build-otelcol.sh) $(PY) -m benchmarks $(BENCH)

proto: venv
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=receiver/proto protos/profile.proto

clean:
	rm -rf $(VENV) build dist *.egg-info out
