#!/usr/bin/env bash
# Debian packages the agent needs at run time (and, with --test, the ones the test suite needs).
# One script for `make test`, `make run` and deploy/Dockerfile, so the image and CI install alike.
# Idempotent: packages already present are not reinstalled and apt-get is not even called.
set -euo pipefail

RUNTIME_PKGS=(python3 python3-venv python3-bpfcc libbpfcc iproute2 ca-certificates binutils)
# Kernel headers for BCC's clang. Debian's headers match Debian kernels; on other kernels they
# still provide the generic headers BCC needs, because our BPF code reads kernel data only
# through tracepoint fields and helpers (never through struct layouts).
HEADER_PKGS=(linux-headers-amd64)
# systemd for systemd-analyze (the unit file test), prometheus for promtool and the scrape test.
TEST_PKGS=(prometheus golang-go make gcc g++ libc6-dev curl unzip linux-perf bpftool systemd openssl util-linux
           nginx-light wrk nodejs)
# The deployment test (tests/test_deploy_compose.py): Debian's Docker engine, debootstrap for a
# base image where no registry answers, bpftool to list loaded BPF programs.
DOCKER_PKGS=(docker.io debootstrap bpftool)
# The kernel matrix (tests/kernels): guest image from Debian's packages, booted under qemu.
KERNEL_TEST_PKGS=(qemu-system-x86 debootstrap busybox-static cpio xz-utils)

want=("${RUNTIME_PKGS[@]}")
case "${1:-}" in
  --test) want+=("${HEADER_PKGS[@]}" "${TEST_PKGS[@]}" "${KERNEL_TEST_PKGS[@]}") ;;
  --runtime-with-headers) want+=("${HEADER_PKGS[@]}") ;;
  --docker) want=("${DOCKER_PKGS[@]}") ;;
  --runtime|"") ;;
  *) echo "usage: $0 [--runtime|--runtime-with-headers|--test|--docker]" >&2; exit 2 ;;
esac

missing=()
for p in "${want[@]}"; do
  # golang-go only when no Go toolchain is already on PATH (the CI machine ships one).
  if [ "$p" = golang-go ] && command -v go >/dev/null 2>&1; then continue; fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "error: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
