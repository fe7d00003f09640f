"""The DaemonSet on a real Kubernetes (issue 34): a single-node v1.34 cluster on this host
(deploy/scripts/k8s-cluster.py: etcd, containerd, the control plane, kube-proxy and a kubelet,
binaries built from the Go module proxy and cached), with deploy/kubernetes/*.yaml applied as
shipped. Changed for the test only: the image references (images built and loaded without a
registry). The shipped gateway exports to a Service named `otel-backend`, which the manifests leave
to the user; the test makes it a Service without selector whose EndpointSlice is a Collector on the
host, so it reads what reached the gateway with the gateway's configuration as shipped.

Asserted: the runtime grants the agent exactly the documented capabilities (the container's OCI
spec) and no thread of any process in it holds more (the agent drops some after start);
/healthz and /readyz answer (the pod turned Ready through its readiness probe, and both answer
through the API server's proxy); /metrics scrapes; a workload pod's exec logs, a
TCP span and a profile sample reach the gateway carrying that pod's k8s.pod.name,
k8s.namespace.name and container.id; `kubectl delete` of the DaemonSet leaves none of the agent's
BPF programs, maps or links on the node."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from .harness import REPO, Collector, _decoded_kv, fail_or_skip, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]

CLUSTER = REPO / "deploy" / "scripts" / "k8s-cluster.py"
STATE = Path(os.environ.get("K8S_STATE", "/run/ebpf-otlp-receiver-k8s"))
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
SHIPPED_GATEWAY_IMAGE = "otel/opentelemetry-collector-contrib:0.159.0"
SHIPPED_AGENT_IMAGE = "ebpf-otlp-receiver:0.1.0"
NS = "observability"
WORKLOAD_NS = "k8s-test-workload"
WORKLOAD_PORT = 18080
# The README's capability set: CAP_SYS_PTRACE 19, CAP_SYSLOG 34, CAP_PERFMON 38, CAP_BPF 39.
AGENT_CAPS = (1 << 19) | (1 << 34) | (1 << 38) | (1 << 39)


@dataclass
class Cluster:
    kubectl: list[str]
    env: dict[str, str]
    collector: Collector
    images: dict[str, str]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        r = subprocess.run([*self.kubectl, *args], capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert r.returncode == 0, f"kubectl {' '.join(args)}: {r.stderr[-2000:]}"
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json"))

    def describe(self) -> str:
        out = []
        for args in (["get", "pods", "-A", "-o", "wide"], ["get", "events", "-A", "--sort-by=.lastTimestamp"]):
            out.append(self.run(*args, check=False)[-3000:])
        return "\n".join(out)


def _script(*args: str, timeout: float) -> str:
    r = subprocess.run([sys.executable, str(CLUSTER), *args], capture_output=True, text=True,
                       timeout=timeout, check=False)
    if r.returncode != 0:
        fail_or_skip(f"k8s-cluster.py {' '.join(args)}: {r.stderr[-3000:]}")
    return r.stdout.strip()


def _rendered(images: dict[str, str]) -> str:
    """deploy/kubernetes/*.yaml with the test's changes only: the image references."""
    text = "---\n".join(p.read_text() for p in MANIFESTS)
    for shipped, local in images.items():
        text = text.replace(f"image: {shipped}", f"image: {local}")
    return text


def _backend(host_ip: str, port: int) -> str:
    """The user's part the manifests leave open: the `otel-backend` Service the gateway exports
    to, here without selector, its one endpoint the Collector on the host."""
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "otel-backend", "namespace": NS},
               "spec": {"ports": [{"name": "otlp-grpc", "port": 4317, "targetPort": port,
                                   "protocol": "TCP", "appProtocol": "grpc"}]}}
    endpoints = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": "otel-backend-host", "namespace": NS,
                              "labels": {"kubernetes.io/service-name": "otel-backend"}},
                 "addressType": "IPv4",
                 "ports": [{"name": "otlp-grpc", "port": port, "protocol": "TCP"}],
                 "endpoints": [{"addresses": [host_ip]}]}
    return yaml.safe_dump_all([service, endpoints])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        fail_or_skip("the Kubernetes test runs a kubelet and containerd: needs root")
    otelcol = os.environ.get("OTELCOL_BIN", "")
    if not Path(otelcol).is_file():
        fail_or_skip("OTELCOL_BIN is not set (make test sets it)")
    work = tmp_path_factory.mktemp("k8s")
    engine = REPO / "tests" / "docker" / "engine.sh"   # builds the images (k8s-cluster.py images)
    engine_was_running = subprocess.run(["bash", str(engine), "status"], capture_output=True,
                                        timeout=60, check=False).returncode == 0
    # Binaries first (cached; `make test` starts their build in the background at setup).
    _script("build", timeout=3600)
    kubeconfig = _script("up", timeout=900).splitlines()[-1]
    collector = None
    try:
        loaded = _script("images", timeout=3600).splitlines()
        images = {SHIPPED_GATEWAY_IMAGE: next(i for i in loaded if "otelcol-gateway" in i),
                  SHIPPED_AGENT_IMAGE: next(i for i in loaded if i.startswith("ebpf-otlp-receiver:"))}
        kubectl = [str(Path(_script("build", timeout=60)) / "kubectl"), f"--kubeconfig={kubeconfig}"]
        host_ip = (STATE / "host-ip").read_text().strip()
        collector = Collector(otelcol, work)
        port = collector.port
        collector.start({"OTELCOL_OTLP_GRPC_ENDPOINT": f"0.0.0.0:{port}"})
        c = Cluster(kubectl, {}, collector, images)
        manifest = work / "applied.yaml"
        manifest.write_text(_rendered(images))
        c.run("apply", "-f", str(manifest))
        backend = work / "backend.yaml"
        backend.write_text(_backend(host_ip, port))
        c.run("apply", "-f", str(backend))
        try:
            c.run("-n", NS, "rollout", "status", "deployment/otelcol-gateway", "--timeout=300s", timeout=320)
            c.run("-n", NS, "rollout", "status", "daemonset/ebpf-otlp-receiver", "--timeout=420s", timeout=440)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{c.describe()}") from None
        yield c
    finally:
        if collector is not None:
            collector.stop()
        subprocess.run([sys.executable, str(CLUSTER), "down"], capture_output=True, timeout=600, check=False)
        if not engine_was_running:   # what it built stays in its data root for the next run
            subprocess.run(["bash", str(engine), "stop"], capture_output=True, timeout=120, check=False)


def _agent_pod(c: Cluster) -> dict[str, Any]:
    pods = c.json("-n", NS, "get", "pods", "-l", "app.kubernetes.io/name=ebpf-otlp-receiver")["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def _pod_pids(pod_uid: str) -> list[int]:
    """Host pids of the processes in the pod's containers (its pause sandbox excluded)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cg = (p / "cgroup").read_text()
            comm = (p / "comm").read_text().strip()
        except OSError:
            continue
        if f"pod{pod_uid}/" in cg and comm != "pause":
            pids.append(int(p.name))
    return pids


def _caps(pid: int) -> list[dict[str, int]]:
    out = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = dict(line.split(":\t", 1) for line in (t / "status").read_text().splitlines() if ":\t" in line)
        except OSError:
            continue   # a thread that ended
        out.append({k: int(fields[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")})
    return out


def test_agent_ready_with_exactly_its_capabilities(cluster: Cluster) -> None:
    pod = _agent_pod(cluster)
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    # Ready came from the readiness probe on /readyz; the liveness probe on /healthz keeps it up.
    cond = {x["type"]: x["status"] for x in pod["status"]["conditions"]}
    assert cond.get("Ready") == "True", pod["status"]
    (spec,) = pod["spec"]["containers"]
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for path in ("healthz", "readyz"):
        body = cluster.run("get", "--raw", f"/api/v1/namespaces/{NS}/pods/{name}:9464/proxy/{path}")
        assert body.strip(), path
    # /metrics, scraped through the API server as Prometheus' kubernetes_sd would reach it.
    def scraped() -> str:
        text = cluster.run("get", "--raw", f"/api/v1/namespaces/{NS}/pods/{name}:9464/proxy/metrics")
        return text if "ebpf_receiver_source_up" in text else ""

    metrics = wait_until(scraped, 120, 2, "ebpf_receiver_source_up on the agent's /metrics")
    up = {line.split("{")[1].split("}")[0]: line.rsplit(" ", 1)[1] for line in metrics.splitlines()
          if line.startswith("ebpf_receiver_source_up{")}
    assert up and all(v in ("1", "1.0") for v in up.values()), up
    # The runtime granted exactly the documented set (the OCI spec containerd gave runc) ...
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    info = json.loads(subprocess.run(["ctr", "-a", str(STATE / "containerd" / "containerd.sock"), "-n", "k8s.io",
                                      "containers", "info", cid], capture_output=True, text=True,
                                     timeout=60, check=True).stdout)
    granted = info["Spec"]["process"]["capabilities"]
    want = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_SYSLOG"}
    for kind in ("bounding", "permitted", "effective"):
        assert set(granted.get(kind) or []) == want, (kind, granted)
    assert not granted.get("inheritable") and not granted.get("ambient"), granted
    # ... and no thread of any process in the container holds more (the agent drops some of
    # them after start, docs/operations.md: every set only shrinks).
    pids = _pod_pids(uid)
    assert pids, f"no processes of pod {uid}"
    threads = [(pid, t) for pid in pids for t in _caps(pid)]
    assert len(threads) > 1
    for pid, t in threads:
        for k in ("CapPrm", "CapEff", "CapBnd"):
            assert t[k] & ~AGENT_CAPS == 0, f"pid {pid} {k} {t[k]:#x}"
        assert t["CapInh"] == 0 and t["CapAmb"] == 0, (pid, t)
    agent = [p for p in pids if b"ebpf-otlp-receiver" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert agent, pids
    # CAP_SYS_PTRACE (process identity, symbolization) is kept in every thread of the agent.
    assert all(t["CapEff"] & (1 << 19) for p in agent for t in _caps(p)), agent
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0


WORKLOAD = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {WORKLOAD_NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: workload, namespace: {WORKLOAD_NS}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: work
      image: IMAGE
      imagePullPolicy: IfNotPresent
      command: ["bash", "-c"]
      args:
        - |
          python3 -m http.server {WORKLOAD_PORT} --bind 127.0.0.1 >/dev/null 2>&1 &
          while :; do
            dd if=/dev/zero of=/dev/null bs=64k count=40000 2>/dev/null
            exec 3<>/dev/tcp/127.0.0.1/{WORKLOAD_PORT} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3 >/dev/null
            exec 3<&-
            sleep 1
          done
"""


def _res(item: dict[str, Any]) -> dict[str, Any]:
    return item["resource"]


def test_workload_pod_metadata_reaches_the_gateway(cluster: Cluster, tmp_path: Path) -> None:
    f = tmp_path / "workload.yaml"
    f.write_text(WORKLOAD.replace("IMAGE", cluster.images[SHIPPED_AGENT_IMAGE]))
    cluster.run("apply", "-f", str(f))
    try:
        cluster.run("-n", WORKLOAD_NS, "wait", "--for=condition=Ready", "pod/workload", "--timeout=180s", timeout=200)
        pod = cluster.json("-n", WORKLOAD_NS, "get", "pod", "workload")
        cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
        want = {"k8s.pod.name": "workload", "k8s.namespace.name": WORKLOAD_NS, "container.id": cid}
        col = cluster.collector

        def ours(resource: dict[str, Any]) -> bool:
            return all(resource.get(k) == v for k, v in want.items())

        def dd_execs() -> list[dict[str, Any]]:
            return [r for r in col.log_records() if r.get("eventName") == "process.exec" and ours(_res(r))
                    and str(r["attrs"].get("process.executable.path")).endswith("/dd")]

        wait_until(dd_execs, 180, 2, f"exec logs of the workload's dd carrying {want}")

        def tcp_spans() -> list[dict[str, Any]]:
            return [s for s in col.spans() if ours(_res(s)) and s["attrs"].get("network.transport") == "tcp"
                    and s["attrs"].get("server.port") == WORKLOAD_PORT]

        wait_until(tcp_spans, 180, 2, f"a TCP span of the workload carrying {want}")

        def profile_samples() -> list[dict[str, Any]]:
            found = []
            for req in col.requests("profiles"):
                strings = req.get("dictionary", {}).get("stringTable", [])
                for rp in req.get("resourceProfiles", []):
                    res = dict(_decoded_kv(kv, strings) for kv in rp.get("resource", {}).get("attributes", []))
                    if ours(res):
                        found.extend(p for sp in rp.get("scopeProfiles", []) for p in sp.get("profiles", [])
                                     if p.get("sample") or p.get("samples"))
            return found

        wait_until(profile_samples, 180, 2, f"a profile sample of the workload carrying {want}")
        # The agent's own data is not dressed as the agent's pod: host processes have no pod.
        agent_pod = _agent_pod(cluster)["metadata"]["name"]
        host = [r for r in col.log_records() if r.get("eventName") == "process.exec"
                and "container.id" not in _res(r)]
        assert all(_res(r).get("k8s.pod.name") != agent_pod for r in host), "host execs got the agent's pod name"
    finally:
        cluster.run("delete", "namespace", WORKLOAD_NS, "--wait=false", check=False)


def _bpf_ids(pid: int) -> dict[str, set[int]]:
    ids: dict[str, set[int]] = {"prog": set(), "map": set(), "link": set()}
    try:
        fds = list(Path(f"/proc/{pid}/fdinfo").iterdir())
    except OSError:   # ended meanwhile (a loader process hands its descriptors over, then exits)
        return ids
    for f in fds:
        try:
            for line in f.read_text().splitlines():
                for kind in ids:
                    if line.startswith(f"{kind}_id:"):
                        ids[kind].add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def _bpftool(kind: str) -> set[int]:
    r = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return {int(x["id"]) for x in json.loads(r.stdout or "[]")}


def test_delete_leaves_no_bpf_objects(cluster: Cluster) -> None:
    pod = _agent_pod(cluster)
    held: dict[str, set[int]] = {"prog": set(), "map": set(), "link": set()}
    for pid in _pod_pids(pod["metadata"]["uid"]):
        for k, v in _bpf_ids(pid).items():
            held[k] |= v
    assert held["prog"] and held["map"], held
    assert held["prog"] <= _bpftool("prog"), "the agent's programs are not all loaded"
    cluster.run("-n", NS, "delete", "daemonset", "ebpf-otlp-receiver", "--wait=true", "--timeout=120s", timeout=150)
    wait_until(lambda: not cluster.json("-n", NS, "get", "pods", "-l",
                                        "app.kubernetes.io/name=ebpf-otlp-receiver")["items"],
               120, 1, "the agent pod to be gone")
    wait_until(lambda: not _pod_pids(pod["metadata"]["uid"]), 60, 0.5, "the agent's processes to end")
    # Programs, maps and links are freed when their last fd closes (after an RCU grace period,
    # and the kernel's deferred work on a loaded node): none may be left.
    def left() -> dict[str, set[int]]:
        return {k: held[k] & _bpftool(k) for k in held}

    with contextlib.suppress(AssertionError):   # timed out: the assertion below names what is left
        wait_until(lambda: not any(left().values()), 30, 0.5, "the agent's BPF objects to be freed")
    assert not any(left().values()), left()
