"""Deployment files (issue 7), checked without a Docker engine or a cluster: docker-compose.yml,
deploy/Dockerfile, the Kubernetes manifests, the systemd unit and the Prometheus config parse, point
at files that exist, and agree with the agent's own configuration defaults; the Collector
configuration validates with the real Collector binary."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from receiver.config import EbpfConfig, parse_address
from receiver.kernel.capabilities import CAPABILITIES

from .harness import REPO, fail_or_skip

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
AGENT_CONFIG = REPO / "deploy" / "config" / "agent.yaml"
K8S_DIR = REPO / "deploy" / "kubernetes"
SYSTEMD_UNIT = REPO / "deploy" / "systemd" / "ebpf-otlp-receiver.service"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
INSTALL_SCRIPT = "deploy/scripts/install-system-deps.sh"
DOCKER20_ENV = REPO / "deploy" / "compose" / "docker20.env"
README = REPO / "README.md"
# The one capability set (receiver/kernel/capabilities.py), as Docker and Kubernetes spell it.
CAP_SET = {c.name for c in CAPABILITIES}
SHORT_SET = {c.removeprefix("CAP_") for c in CAP_SET}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port → host port, from short-syntax "HOST:CONTAINER" entries."""
    out = {}
    for p in service.get("ports") or []:
        parts = str(p).split("/")[0].split(":")
        out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return out


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs.extend((path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


# --------------------------------------------------------------------------- compose


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"otelcol", "agent", "prometheus"} <= set(services)
    assert services["otelcol"]["image"] == "otel/opentelemetry-collector-contrib:0.159.0"
    command = services["otelcol"]["command"]
    command = command if isinstance(command, list) else shlex.split(command)
    assert "--config=/etc/otelcol/config.yaml" in command
    assert "--feature-gates=service.profilesSupport" in command
    assert 4317 in _published(services["otelcol"])


def test_compose_local_files_exist(compose: dict[str, Any]) -> None:
    agent = compose["services"]["agent"]
    context = REPO / agent["build"]["context"]
    assert context.is_dir()
    assert (context / agent["build"]["dockerfile"]).is_file()
    checked = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: mounted file {source} does not exist"
                checked += 1
    assert checked >= 2  # the Collector and Prometheus configs


def test_compose_agent_privileges_and_mounts(compose: dict[str, Any]) -> None:
    agent = compose["services"]["agent"]
    assert agent["pid"] == "host"
    assert not agent.get("privileged")
    mounts = {str(v).split(":")[1]: str(v) for v in agent["volumes"]}
    for target in ("/sys/kernel/tracing", "/sys/kernel/debug", "/sys/fs/cgroup", "/sys/kernel/btf"):
        assert target in mounts, f"agent does not mount {target}"
        assert mounts[target].endswith(":ro"), f"{target} must be mounted read-only"
    # The image's own headers and a compile cache volume; no host headers (issue 29).
    assert "/lib/modules" not in mounts and "/usr/src" not in mounts
    assert mounts["/var/cache/ebpf-otlp-receiver"].split(":")[0] in compose["volumes"]
    # bpffs, writable, for request links' pins (bpf.pin_path's default)
    assert mounts["/sys/fs/bpf"] == f"{EbpfConfig().bpf.pin_path}:/sys/fs/bpf"


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}``."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), value)


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#"))


def test_one_capability_set_everywhere(compose: dict[str, Any]) -> None:
    """compose (current Docker, and Docker 20.10 through its env file), the DaemonSet, the
    systemd unit and the README state the same set as receiver/kernel/capabilities.py."""
    cap_add = compose["services"]["agent"]["cap_add"]
    assert {_interpolate(c, {}) for c in cap_add} == SHORT_SET
    # Docker 20.10 rejects the BPF/PERFMON names; SYS_ADMIN stands in for both, nothing else changes.
    docker20 = {_interpolate(c, _env_file(DOCKER20_ENV)) for c in cap_add}
    assert docker20 == (SHORT_SET - {"BPF", "PERFMON"}) | {"SYS_ADMIN"}
    (table,) = re.findall(r"\| capability \| why \|\n\|[-|]+\|\n((?:\|.*\|\n)+)", README.read_text())
    readme = {row.split("|")[1].strip().strip("`") for row in table.splitlines()}
    assert readme == CAP_SET


def test_compose_agent_consistent_with_receiver_config(compose: dict[str, Any]) -> None:
    agent = compose["services"]["agent"]
    env = _env(agent)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otelcol:4317"
    # The default telemetry port is the one compose publishes, probes and Prometheus scrape.
    _, default_port = parse_address(EbpfConfig.default().telemetry.listen)
    config = EbpfConfig.load(AGENT_CONFIG, environ=env)
    _, port = parse_address(config.telemetry.listen)
    assert port == default_port == 9464
    assert _published(agent).get(port) == port
    assert config.exporter.endpoint == "http://otelcol:4317"
    assert config.exporter.target == "otelcol:4317" and not config.exporter.use_tls
    assert config.telemetry.enabled
    health = " ".join(agent["healthcheck"]["test"])
    assert f"http://localhost:{port}/healthz" in health
    # The Collector listens on the port the agent dials.
    assert _published(compose["services"]["otelcol"]).get(4317) == 4317


def test_compose_matches_compose_spec_schema(compose: dict[str, Any]) -> None:
    """Against the Compose Specification JSON schema that check-jsonschema vendors."""
    pytest.importorskip("check_jsonschema",
                        reason="check-jsonschema (vendors the compose-spec schema) is not installed")
    import importlib.resources

    import jsonschema

    schema = json.loads((importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
                         / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors


def test_prometheus_scrapes_agent() -> None:
    data = yaml.safe_load(PROMETHEUS.read_text())
    targets = [t for job in data["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]]
    assert "agent:9464" in targets
    promtool = shutil.which("promtool")
    if not promtool:
        fail_or_skip("promtool is not installed (Debian's prometheus package has it; make test installs it)")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_uses_the_shared_install_script() -> None:
    instr = _dockerfile_instructions()
    assert any(w == "FROM" and r.startswith("debian:bookworm-slim") for w, r in instr)
    runs = [r for w, r in instr if w == "RUN"]
    assert any("install-system-deps.sh --runtime-with-headers" in r for r in runs)
    # The script is copied from the repository, not re-typed: no apt package lists here.
    assert any(w == "COPY" and INSTALL_SCRIPT in r for w, r in instr)
    assert not any("apt-get install" in r for r in runs)
    assert (REPO / INSTALL_SCRIPT).is_file()
    # Every repository path the Dockerfile copies exists.
    for w, r in instr:
        if w == "COPY" and not r.startswith("--from"):
            for src in r.split()[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} does not exist"


def test_dockerfile_runtime() -> None:
    instr = dict(_dockerfile_instructions())
    text = DOCKERFILE.read_text()
    assert "/usr/lib/python3/dist-packages/bcc" in text and "/usr/bin/python3 -m venv" in text
    assert "prepare-host.sh" not in instr["ENTRYPOINT"]   # nothing written to the host
    assert "/var/cache/ebpf-otlp-receiver" in instr["VOLUME"]
    assert "run --config /etc/ebpf-otlp-receiver/config.yaml" in " ".join(
        yaml.safe_load(instr["CMD"]))
    assert "localhost:9464/healthz" in instr["HEALTHCHECK"]
    assert "org.opencontainers.image.title" in text
    assert "CAP_BPF" in text and "CAP_PERFMON" in text


# --------------------------------------------------------------------------- Collector


@pytest.mark.collector
def test_collector_config_validates(otelcol_bin: str) -> None:
    result = subprocess.run(
        [otelcol_bin, "validate", "--config", str(REPO / "deploy/otelcol/config.yaml"),
         "--feature-gates=service.profilesSupport"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Kubernetes


def test_kubernetes_manifests_parse() -> None:
    docs = _k8s_docs()
    assert {p.name for p, _ in docs} >= {"daemonset.yaml", "gateway-collector.yaml"}
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: {doc}"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} has no name"


def test_kubernetes_manifests_match_schemas() -> None:
    """Against the Kubernetes OpenAPI schemas that kubernetes-validate ships (strict: unknown
    fields fail)."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for path, doc in _k8s_docs():
        try:
            kv.validate(doc, "1.30", strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {e.message}")


def test_daemonset() -> None:
    (ds,) = [d for _, d in _k8s_docs() if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    (agent,) = pod["containers"]
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9464}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9464}
    assert set(agent["securityContext"]["capabilities"]["add"]) == SHORT_SET
    assert agent["securityContext"]["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["K8S_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["OTEL_RESOURCE_ATTRIBUTES"]["value"] == "k8s.node.name=$(K8S_NODE_NAME)"
    names = [e["name"] for e in agent["env"]]
    assert names.index("K8S_NODE_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert agent["resources"]["requests"] and agent["resources"]["limits"]
    # The image's own headers, a read-only root, and the compile cache on the node (issue 29).
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "/lib/modules" not in mounts and "/usr/src" not in mounts
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    assert volumes[mounts["/var/cache/ebpf-otlp-receiver"]]["hostPath"]["path"] == "/var/cache/ebpf-otlp-receiver"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # bpffs, writable, for request links' pins (bpf.pin_path's default)
    bpffs = next(m for m in agent["volumeMounts"] if m["mountPath"] == EbpfConfig().bpf.pin_path)
    assert not bpffs.get("readOnly") and volumes[bpffs["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9464"
    # The ConfigMap's config is valid for the agent, with the node name expanded by Kubernetes.
    (cm,) = [d for _, d in _k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "ebpf-otlp-receiver"]
    environ = {"OTEL_RESOURCE_ATTRIBUTES": "k8s.node.name=node-1",
               "OTEL_EXPORTER_OTLP_ENDPOINT": env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"]}
    config = EbpfConfig.from_dict(yaml.safe_load(cm["data"]["config.yaml"]), environ)
    assert config.resource.attributes["k8s.node.name"] == "node-1"
    assert parse_address(config.telemetry.listen)[1] == 9464
    # The agent's endpoint is the gateway Service.
    (svc,) = [d for _, d in _k8s_docs() if d["kind"] == "Service"]
    assert config.exporter.target == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:4317"


def test_gateway_collector() -> None:
    docs = [d for _, d in _k8s_docs()]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "otelcol-gateway"]
    config = yaml.safe_load(cm["data"]["config.yaml"])
    sources = [s for a in config["processors"]["k8sattributes"]["pod_association"] for s in a["sources"]]
    assert {"from": "resource_attribute", "name": "container.id"} in sources
    for pipeline in config["service"]["pipelines"].values():
        assert "k8sattributes" in pipeline["processors"]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert {"pods", "namespaces", "replicasets"} <= resources
    (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert binding["subjects"][0]["name"] == dep["spec"]["template"]["spec"]["serviceAccountName"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        "otel/opentelemetry-collector-contrib:")


# --------------------------------------------------------------------------- systemd


def test_systemd_unit() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(SYSTEMD_UNIT.read_text())
    service = parser["Service"]
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert set(service[key].split()) == CAP_SET
    # ProtectKernelLogs= would take CAP_SYSLOG out of the bounding set.
    assert service.get("ProtectKernelLogs", "no") == "no"
    assert "run --config /etc/ebpf-otlp-receiver/config.yaml" in service["ExecStart"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        fail_or_skip("systemd-analyze is not installed (Debian's systemd package; make test installs it)")
    # Unknown keys and bad values are reported; the missing installed binary is expected here.
    result = subprocess.run([analyze, "verify", str(SYSTEMD_UNIT)], capture_output=True, text=True,
                            timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if re.search(r"unknown|invalid|failed to parse|bad|ignoring", line, re.IGNORECASE)]
    assert not problems, problems
