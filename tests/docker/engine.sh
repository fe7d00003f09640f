#!/usr/bin/env bash
# The deployment test's Docker engine: Debian's docker.io (20.10 on Debian 12), with its own data
# root, exec root and socket under ~/.cache/ebpf-otlp-receiver/docker, so it touches no other
# Docker on the machine and what it built (images, layers) is kept for the next run.
#   engine.sh start    installs docker.io if missing, starts dockerd unless it answers; prints
#                      the DOCKER_HOST to use
#   engine.sh status   exit 0 when the engine answers
#   engine.sh stop     stops the dockerd this script started
#   engine.sh images COMPOSE_FILE...
#                      makes every image the compose files name available: pulled when a
#                      registry answers, else built locally under the same name (stand-ins,
#                      see tests/docker/*.Dockerfile), each rebuilt only when its inputs change
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
state=${XDG_CACHE_HOME:-$HOME/.cache}/ebpf-otlp-receiver/docker
sock=$state/docker.sock
export DOCKER_HOST=unix://$sock DOCKER_BUILDKIT=0
docker=/usr/bin/docker   # Debian's CLI, whatever else is on PATH

answers() { "$docker" version >/dev/null 2>&1; }

start() {
  bash "$here/deploy/scripts/install-system-deps.sh" --docker >&2
  mkdir -p "$state/data" "$state/exec"
  if ! answers; then
    if [ -f "$state/dockerd.pid" ] && kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null; then
      kill "$(cat "$state/dockerd.pid")" 2>/dev/null || true; sleep 2
    fi
    rm -f "$sock" "$state/dockerd.pid"
    echo "docker: starting dockerd ($(dockerd --version)) with data root $state/data" >&2
    setsid dockerd --data-root "$state/data" --exec-root "$state/exec" --pidfile "$state/dockerd.pid" \
      -H "$DOCKER_HOST" >"$state/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do answers && break; sleep 1; done
    answers || { tail -n 30 "$state/dockerd.log" >&2; echo "error: dockerd did not start" >&2; exit 1; }
  fi
  echo "$DOCKER_HOST"
}

stop() {
  [ -f "$state/dockerd.pid" ] || return 0
  local pid; pid=$(cat "$state/dockerd.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
}

label=org.ebpf-otlp-receiver.stand-in
have() {   # NAME [KEY]: present, and (for a stand-in) built from inputs with this key
  local got; got=$("$docker" image inspect -f "{{index .Config.Labels \"$label\"}}" "$1" 2>/dev/null) || return 1
  [ -z "${2:-}" ] || [ -z "$got" ] || [ "$got" = "$2" ] || [ "$got" = "<no value>" ]
}
keyof() { cat "$@" | sha256sum | cut -c1-16; }

base_image() {   # debian:bookworm-slim from debootstrap (minbase)
  local name=debian:bookworm-slim key; key=$(keyof "$0" | cut -c1-8)-minbase
  have "$name" && return 0
  "$docker" pull -q "$name" >&2 2>/dev/null && return 0
  echo "docker: no registry; building $name with debootstrap" >&2
  local root; root=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$state/debootstrap.log" 2>&1 || {
    tail -n 20 "$state/debootstrap.log" >&2; rm -rf "$root"; exit 1; }
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
  tar -C "$root" -c . | "$docker" import --change "LABEL $label=$key" --change 'CMD ["bash"]' - "$name" >/dev/null
  rm -rf "$root"
}

otelcol_image() {   # NAME: the contrib image's layout around our ocb build
  local name=$1 bin ctx key
  bin=$(bash "$here/deploy/scripts/build-otelcol.sh")
  key=$(keyof "$bin" "$here/tests/docker/otelcol-contrib.Dockerfile")
  have "$name" "$key" && return 0
  "$docker" pull -q "$name" >&2 2>/dev/null && return 0
  echo "docker: no registry; building $name from $bin" >&2
  ctx=$(mktemp -d)
  cp "$bin" "$ctx/otelcol-contrib"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
  cp "$here/deploy/otelcol/config.yaml" "$ctx/config.yaml"
  "$docker" build -q --label "$label=$key" -t "$name" -f "$here/tests/docker/otelcol-contrib.Dockerfile" "$ctx" >/dev/null
  rm -rf "$ctx"
}

prometheus_image() {   # NAME: Debian's prometheus in the official image's layout
  local name=$1 key; key=$(keyof "$here/tests/docker/prometheus.Dockerfile")
  have "$name" "$key" && return 0
  "$docker" pull -q "$name" >&2 2>/dev/null && return 0
  echo "docker: no registry; building $name from Debian's prometheus" >&2
  "$docker" build -q --label "$label=$key" -t "$name" -f "$here/tests/docker/prometheus.Dockerfile" \
    "$here/tests/docker" >/dev/null
}

images() {
  base_image
  local name
  for name in $(sed -n 's/^ *image: *//p' "$@" | sort -u); do
    case $name in
      otel/opentelemetry-collector-contrib:*) otelcol_image "$name" ;;
      prom/prometheus:*) prometheus_image "$name" ;;
      debian:bookworm-slim) ;;
      *) ;;   # built by compose (the agent)
    esac
  done
}

case "${1:-}" in
  start) start ;;
  status) answers ;;
  stop) stop ;;
  images) shift; images "$@" ;;
  *) echo "usage: $0 start|status|stop|images COMPOSE_FILE..." >&2; exit 2 ;;
esac
