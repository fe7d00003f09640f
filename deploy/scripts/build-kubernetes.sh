#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy and kubectl from the Go
# module proxy alone (no GitHub, no container registry), once: the binaries are cached under
# $K8S_CACHE keyed on the Kubernetes version, the Go version and the build flags, so a second run
# (and CI on the same machine) reuses them. Prints the directory holding the binaries on stdout.
#
# The module zip of k8s.io/kubernetes carries no staging/ tree, so the 31
# `replace k8s.io/X => ./staging/src/k8s.io/X` lines are pointed at the published k8s.io/X@v0.N.M
# modules instead, vendor/ and go.work are dropped, and everything builds with -mod=mod.
# ~7.5 min on 2 cores; run it early in the background (deploy/scripts/k8s-cluster.sh build).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
k8s_version=${K8S_VERSION:-v1.34.4}
cache=${K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ebpf-otlp-receiver/kubernetes}
components="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy cmd/kubectl"
ldflags_pkg=k8s.io/component-base/version
staging_version=v0.${k8s_version#v1.}
minor=${staging_version#v0.}; minor=${minor%%.*}

. "$here/deploy/scripts/go-toolchain.sh"
ensure_go 1.24.0 "$cache"
go_version=$(go env GOVERSION)
flags="GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 -trimpath -ldflags=-s -w X=$ldflags_pkg.gitVersion=$k8s_version"
key=$(printf '%s\n' "$k8s_version" "$go_version" "$flags" "$components" | sha256sum | cut -c1-16)
out=$cache/$k8s_version-$key
if [ -x "$out/bin/kubelet" ] && [ -f "$out/bin/.complete" ]; then echo "$out/bin"; exit 0; fi

mkdir -p "$cache"
exec 9>"$cache/build.lock"
flock 9
if [ -f "$out/bin/.complete" ]; then echo "$out/bin"; exit 0; fi

work=$(mktemp -d "$cache/work.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
echo "kubernetes: downloading k8s.io/kubernetes@$k8s_version from the Go module proxy" >&2
dir=$(cd "$work" && GOFLAGS= go mod download -json "k8s.io/kubernetes@$k8s_version" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
[ -d "$dir" ] || { echo "error: go mod download k8s.io/kubernetes@$k8s_version gave no tree" >&2; exit 1; }
cp -r "$dir" "$work/src"
chmod -R u+w "$work/src"
cd "$work/src"
rm -rf vendor go.work go.work.sum
n=$(grep -cE '^\s*(replace\s+)?k8s\.io/[a-z0-9-]+ => \./staging/' go.mod || true)
[ "$n" -gt 0 ] || { echo "error: no staging replace lines in go.mod" >&2; exit 1; }
sed -i -E "s#=> \./staging/src/(k8s\.io/[a-z0-9-]+)\s*\$#=> \1 $staging_version#" go.mod
! grep -q '=> \./staging/' go.mod || { echo "error: staging replace lines left in go.mod" >&2; exit 1; }
echo "kubernetes: $n staging modules pointed at $staging_version; building with $go_version (several minutes, once)" >&2
mkdir -p "$work/bin"
# shellcheck disable=SC2086
nice -n "${K8S_BUILD_NICE:-10}" go build -trimpath -ldflags="-s -w -X $ldflags_pkg.gitVersion=$k8s_version -X $ldflags_pkg.gitMajor=1 -X $ldflags_pkg.gitMinor=$minor -X $ldflags_pkg.gitTreeState=clean" \
  -o "$work/bin/" $(printf './%s ' $components) >"$work/build.log" 2>&1 || {
  tail -n 30 "$work/build.log" >&2; cp "$work/build.log" "$cache/build-failed.log"
  echo "error: Kubernetes build failed, log: $cache/build-failed.log" >&2; exit 1; }
rm -rf "$out"; mkdir -p "$out"
mv "$work/bin" "$out/bin"
touch "$out/bin/.complete"
echo "$out/bin"
