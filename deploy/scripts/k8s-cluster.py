#!/usr/bin/env python3
"""A real single-node Kubernetes (v1.34) on this host, from package registries alone.

    k8s-cluster.py build     build (or reuse) the Kubernetes binaries (build-kubernetes.sh)
    k8s-cluster.py images    build the images the shipped manifests need, registry-free, and load
                             them into the cluster's containerd (`ctr -n k8s.io images import`)
    k8s-cluster.py up        start etcd, containerd, the control plane, kube-proxy, the kubelet
                             and a cluster DNS; wait for the node to be Ready; print KUBECONFIG
    k8s-cluster.py down      stop everything by pid, remove containers, mounts, network
                             devices, iptables chains and cgroups it made; nothing left behind
    k8s-cluster.py status    exit 0 when the API server answers and the node is Ready
    k8s-cluster.py dns       (run by `up`) the cluster DNS: <svc>.<ns>.svc.cluster.local -> ClusterIP

Everything runs by hand (no systemd here), on cgroup v1 with the cgroupfs driver
(`failCgroupV1: false`: Kubernetes 1.34 is the last to run there with containerd 1.x). Debian's
etcd-server, containerd, runc and containernetworking-plugins (/usr/lib/cni). containerd's CRI
sets `restrict_oom_score_adj = true`: root here lacks CAP_SYS_RESOURCE and runc fails every pod
otherwise. State lives in $K8S_STATE (default /run/ebpf-otlp-receiver-k8s).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("K8S_STATE", "/run/ebpf-otlp-receiver-k8s"))
NODE = "ebpf-node"
POD_CIDR = "10.244.0.0/24"
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
BRIDGE = "k8sbr0"
API_PORT = 6443
ETCD_PORT = 23790
CNI_BIN = "/usr/lib/cni"
PAUSE_IMAGE = "ebpf-otlp-receiver.local/pause:3.10"
AGENT_IMAGE = "ebpf-otlp-receiver:0.1.0"
GATEWAY_IMAGE = "ebpf-otlp-receiver.local/otelcol-gateway:0.159.0"
DAEMONS = ["etcd", "containerd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
           "kube-proxy", "kubelet", "dns"]
DOCKER_ENGINE = REPO / "tests" / "docker" / "engine.sh"


def log(msg: str) -> None:
    print(f"k8s: {msg}", file=sys.stderr, flush=True)


def run(*cmd: str, check: bool = True, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)[:200]} failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")
    return r  # type: ignore[no-any-return]


def host_ip() -> str:
    """The address pods reach the host on (the source address of the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.123", 9))   # no packet is sent
        return str(s.getsockname()[0])


def bins() -> Path:
    out = run("bash", str(REPO / "deploy/scripts/build-kubernetes.sh"), timeout=3600).stdout.strip()
    return Path(out.splitlines()[-1])


def kubeconfig() -> Path:
    return STATE / "admin.kubeconfig"


# ---- PKI --------------------------------------------------------------------------------------

def _openssl(*args: str) -> None:
    run("openssl", *args)


def pki(ip: str) -> None:
    d = STATE / "pki"
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=ebpf-k8s-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    _openssl("genrsa", "-out", str(d / "sa.key"), "2048")
    _openssl("rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"))
    certs = {
        "apiserver": ("/CN=kube-apiserver",
                      f"subjectAltName=IP:127.0.0.1,IP:{ip},IP:{API_SERVICE_IP},DNS:kubernetes,"
                      "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
                      "DNS:kubernetes.default.svc.cluster.local,DNS:localhost"),
        "admin": ("/O=system:masters/CN=kubernetes-admin", None),
    }
    for name, (subj, san) in certs.items():
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subj, "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"))
        ext = d / f"{name}.ext"
        ext.write_text((san + "\n" if san else "") + "extendedKeyUsage=serverAuth,clientAuth\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"), "-CAkey",
                 str(d / "ca.key"), "-CAcreateserial", "-days", "30", "-extfile", str(ext),
                 "-out", str(d / f"{name}.crt"))
    kubeconfig().write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "ebpf",
        "clusters": [{"name": "ebpf", "cluster": {"server": f"https://127.0.0.1:{API_PORT}",
                                                  "certificate-authority": str(d / "ca.crt")}}],
        "users": [{"name": "admin", "user": {"client-certificate": str(d / "admin.crt"),
                                             "client-key": str(d / "admin.key")}}],
        "contexts": [{"name": "ebpf", "context": {"cluster": "ebpf", "user": "admin"}}],
    }, indent=1))


# ---- daemons ----------------------------------------------------------------------------------

def spawn(name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
    logf = open(STATE / f"{name}.log", "ab")   # noqa: SIM115 - handed to the child
    p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env={**os.environ, **(env or {})})
    (STATE / f"{name}.pid").write_text(str(p.pid))
    return p.pid


def alive(name: str) -> int | None:
    f = STATE / f"{name}.pid"
    try:
        pid = int(f.read_text())
        os.kill(pid, 0)
        # a zombie or a recycled pid is not ours
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            return None
        return pid
    except (OSError, ValueError, IndexError):
        return None


def stop(name: str, timeout: float = 20) -> None:
    pid = alive(name)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while time.monotonic() < end and alive(name) is not None:
            time.sleep(0.2)
        if alive(name) is not None:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
    (STATE / f"{name}.pid").unlink(missing_ok=True)


def wait(what: str, pred: object, timeout: float, name: str | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():  # type: ignore[operator]
                return
        except Exception:   # noqa: BLE001 - not ready yet
            pass
        if name and alive(name) is None:
            break
        time.sleep(0.5)
    tail = ""
    if name and (STATE / f"{name}.log").exists():
        tail = "\n".join((STATE / f"{name}.log").read_text(errors="replace").splitlines()[-25:])
    raise SystemExit(f"error: {what} did not come up\n{tail}")


def api_ok() -> bool:
    ctx = ssl.create_default_context(cafile=str(STATE / "pki/ca.crt"))
    ctx.load_cert_chain(str(STATE / "pki/admin.crt"), str(STATE / "pki/admin.key"))
    with urllib.request.urlopen(f"https://127.0.0.1:{API_PORT}/readyz", context=ctx, timeout=3) as r:
        return bool(r.status == 200)


def kubectl(b: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(str(b / "kubectl"), f"--kubeconfig={kubeconfig()}", *args, check=check, timeout=timeout)


def node_ready(b: Path) -> bool:
    r = kubectl(b, "get", "node", NODE, "-o", "json", check=False)
    if r.returncode != 0:
        return False
    conds = json.loads(r.stdout)["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def containerd_sock() -> str:
    return str(STATE / "containerd" / "containerd.sock")


def write_containerd_config() -> Path:
    d = STATE / "containerd"
    (d / "root").mkdir(parents=True, exist_ok=True)
    (d / "state").mkdir(parents=True, exist_ok=True)
    cfg = d / "config.toml"
    cfg.write_text(f"""version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
[grpc]
  address = "{containerd_sock()}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: without this runc fails every pod
  # ("can't get final child's PID from pipe")
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{STATE / 'cni'}"
""")
    (STATE / "cni").mkdir(exist_ok=True)
    (STATE / "cni" / "10-ebpf-bridge.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "ebpf-k8s",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(STATE / "cni-ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}, indent=1))
    return cfg


# Debian's packages the cluster runs on: the command each provides.
PACKAGES = {"etcd": "etcd-server", "containerd": "containerd", "runc": "runc", "openssl": "openssl",
            "iptables": "iptables", "bpftool": "bpftool", f"{CNI_BIN}/bridge": "containernetworking-plugins"}


def ensure_packages() -> None:
    missing = sorted({pkg for tool, pkg in PACKAGES.items()
                      if not (Path(tool).exists() if tool.startswith("/") else shutil.which(tool))})
    if missing:
        log(f"installing Debian's {' '.join(missing)}")
        run("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def up(args: argparse.Namespace) -> None:
    if alive("kube-apiserver") and alive("kubelet"):
        b = bins()
        wait("the node", lambda: node_ready(b), 60)
        print(kubeconfig())
        return
    down(args, quiet=True)
    b = bins()
    ensure_packages()
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "bin-path").write_text(str(b))
    ip = host_ip()
    (STATE / "host-ip").write_text(ip)
    pki(ip)
    # Bridged pod traffic through iptables (Service DNAT between pods on the one bridge).
    for k, v in (("net/bridge/bridge-nf-call-iptables", "1"), ("net/ipv4/ip_forward", "1")):
        try:
            Path("/proc/sys", k).write_text(v)
        except OSError as e:
            log(f"cannot set {k}: {e}")
    pk = STATE / "pki"
    spawn("etcd", ["etcd", "--name", "ebpf", "--data-dir", str(STATE / "etcd"),
                   "--listen-client-urls", f"http://127.0.0.1:{ETCD_PORT}",
                   "--advertise-client-urls", f"http://127.0.0.1:{ETCD_PORT}",
                   "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PORT + 1}",
                   "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PORT + 1}",
                   "--initial-cluster", f"ebpf=http://127.0.0.1:{ETCD_PORT + 1}"],
          )
    spawn("containerd", ["containerd", "--config", str(write_containerd_config())])
    spawn("kube-apiserver", [
        str(b / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
        f"--advertise-address={ip}", "--bind-address=0.0.0.0", f"--secure-port={API_PORT}",
        f"--service-cluster-ip-range={SERVICE_CIDR}", f"--client-ca-file={pk / 'ca.crt'}",
        f"--tls-cert-file={pk / 'apiserver.crt'}", f"--tls-private-key-file={pk / 'apiserver.key'}",
        f"--kubelet-client-certificate={pk / 'admin.crt'}", f"--kubelet-client-key={pk / 'admin.key'}",
        f"--service-account-key-file={pk / 'sa.pub'}", f"--service-account-signing-key-file={pk / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--authorization-mode=Node,RBAC", "--allow-privileged=true", "--profiling=false"])
    wait("kube-apiserver", api_ok, 120, "kube-apiserver")
    kc = str(kubeconfig())
    spawn("kube-controller-manager", [
        str(b / "kube-controller-manager"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}", f"--service-account-private-key-file={pk / 'sa.key'}",
        f"--root-ca-file={pk / 'ca.crt'}", "--use-service-account-credentials=true",
        "--bind-address=127.0.0.1", "--secure-port=10257", "--leader-elect=false", "--profiling=false"])
    spawn("kube-scheduler", [str(b / "kube-scheduler"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                             f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1",
                             "--secure-port=10259", "--leader-elect=false", "--profiling=false"])
    (STATE / "kube-proxy.yaml").write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": kc}, "mode": "iptables", "clusterCIDR": POD_CIDR,
        "hostnameOverride": NODE, "bindAddress": "0.0.0.0",
        "healthzBindAddress": "127.0.0.1:10256", "metricsBindAddress": "127.0.0.1:10249",
        # Pod -> Service -> pod on the one bridge: masquerade so replies come back through the host.
        "iptables": {"masqueradeAll": True},
        "conntrack": {"maxPerCore": 0}}))   # 0: leave the host's nf_conntrack_max alone
    spawn("kube-proxy", [str(b / "kube-proxy"), f"--config={STATE / 'kube-proxy.yaml'}"])
    wait("containerd", lambda: Path(containerd_sock()).exists(), 60, "containerd")
    dns_ip = ip
    spawn("dns", [sys.executable, str(Path(__file__).resolve()), "dns", "--listen", dns_ip])
    (STATE / "kubelet").mkdir(exist_ok=True)
    (STATE / "kubelet.yaml").write_text(json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "failCgroupV1": False, "cgroupDriver": "cgroupfs", "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{containerd_sock()}",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pk / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local", "clusterDNS": [dns_ip],
        "resolvConf": "/etc/resolv.conf", "podCIDR": POD_CIDR,
        "address": "0.0.0.0", "port": 10250, "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
        "readOnlyPort": 0, "podLogsDir": str(STATE / "pod-logs"),
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False, "enforceNodeAllocatable": [],
        "cgroupsPerQOS": True, "protectKernelDefaults": False, "makeIPTablesUtilChains": True,
        "localStorageCapacityIsolation": False}))
    spawn("kubelet", [str(b / "kubelet"), f"--config={STATE / 'kubelet.yaml'}", f"--kubeconfig={kc}",
                      f"--root-dir={STATE / 'kubelet'}", f"--hostname-override={NODE}",
                      f"--node-ip={ip}", "--v=1"])
    wait("the node to be Ready", lambda: node_ready(b), 180, "kubelet")
    log(f"node {NODE} Ready; KUBECONFIG={kubeconfig()}")
    print(kubeconfig())


# ---- teardown ---------------------------------------------------------------------------------

def _shim_pids() -> list[int]:
    pids = []
    sock = containerd_sock()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and sock.encode() in b" ".join(cmd):
                pids.append(int(p.name))
    return pids


def _umount_under(root: Path) -> None:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if mp == str(root) or mp.startswith(str(root) + "/"):
            mounts.append(mp)
    for mp in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


def _cgroups() -> None:
    base = Path("/sys/fs/cgroup")
    for ctl in base.iterdir():
        d = ctl / "kubepods"
        if d.is_dir():
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    sub.rmdir()
                except OSError:
                    pass
            try:
                d.rmdir()
            except OSError:
                pass


def _iptables_cleanup() -> None:
    """The kubelet's, kube-proxy's and the CNI bridge's chains (KUBE-*, CNI-* of this cluster's
    network) and the rules jumping to them."""
    for table in ("filter", "nat", "mangle"):
        dump = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True, check=False).stdout
        chains = [ln[1:].split()[0] for ln in dump.splitlines()
                  if ln.startswith((":KUBE-", ":CNI-"))]
        ours = set(chains)
        for ln in dump.splitlines():
            if not ln.startswith("-A "):
                continue
            parts = shlex.split(ln)
            target = parts[parts.index("-j") + 1] if "-j" in parts else ""
            if parts[1] not in ours and (target in ours or "ebpf-k8s" in ln):
                subprocess.run(["iptables", "-t", table, "-D", *parts[1:]], capture_output=True, check=False)
        for chain in chains:
            subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True, check=False)
        for chain in chains:
            subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True, check=False)


def down(args: argparse.Namespace, quiet: bool = False) -> None:
    if not STATE.exists():
        return
    b = None
    stop("kubelet")
    # Every container and sandbox: the shims' children, then the shims themselves.
    if alive("containerd"):
        ctr = ["ctr", "-a", containerd_sock(), "-n", "k8s.io"]
        tasks = run(*ctr, "tasks", "ls", "-q", check=False).stdout.split()
        for t in tasks:
            run(*ctr, "tasks", "kill", "-s", "SIGKILL", t, check=False)
        time.sleep(1)
        for t in tasks:
            run(*ctr, "tasks", "delete", "-f", t, check=False)
        for c in run(*ctr, "containers", "ls", "-q", check=False).stdout.split():
            run(*ctr, "containers", "delete", c, check=False)
    for pid in _shim_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    # The control plane is thrown away: no need to wait out the API server's graceful drain.
    for name in ("dns", "kube-proxy", "kube-scheduler", "kube-controller-manager", "kube-apiserver"):
        stop(name, timeout=5)
    for name in ("containerd", "etcd"):
        stop(name)
    kp = STATE / "bin-path"
    if kp.exists():
        b = Path(kp.read_text().strip())
    if b is not None and (b / "kube-proxy").exists():
        subprocess.run([str(b / "kube-proxy"), "--cleanup"], capture_output=True, timeout=60, check=False)
    # Network namespaces the CNI made, the bridge, its masquerade chains.
    for ns in Path("/var/run/netns").glob("cni-*"):
        subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True, check=False)
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
    _iptables_cleanup()
    _umount_under(STATE)
    _cgroups()
    shutil.rmtree(STATE, ignore_errors=True)
    if not quiet:
        log("cluster stopped and removed")


# ---- images -----------------------------------------------------------------------------------

def images(args: argparse.Namespace) -> None:
    """Agent, gateway Collector and pause images, built without a registry, loaded into the
    cluster's containerd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    host = run("bash", str(DOCKER_ENGINE), "start", timeout=900).stdout.strip().splitlines()[-1]
    env.update(DOCKER_HOST=host, DOCKER_BUILDKIT="0")
    # debian:bookworm-slim (debootstrap) for the agent image's FROM, the Collector stand-in.
    run("bash", str(DOCKER_ENGINE), "images", str(REPO / "docker-compose.yml"), env=env, timeout=1800)
    ca = REPO / "deploy" / "ca-certificates" / "host-k8s.crt"
    if Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", ca)
    try:
        run("docker", "build", "-q", "-f", "deploy/Dockerfile", "-t", AGENT_IMAGE, ".", env=env, cwd=REPO, timeout=3600)
    finally:
        ca.unlink(missing_ok=True)
    gw = run("bash", str(REPO / "deploy/scripts/build-otelcol.sh"), timeout=3600,
             env={**os.environ, "OTELCOL_MANIFEST": str(REPO / "deploy/otelcol/gateway-builder-config.yaml")})
    gw_bin = gw.stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as ctx:
        shutil.copy(gw_bin, Path(ctx, "otelcol-contrib"))
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", ctx)
        Path(ctx, "config.yaml").write_text("{}\n")
        run("docker", "build", "-q", "-t", GATEWAY_IMAGE, "-f", str(REPO / "tests/docker/otelcol-contrib.Dockerfile"),
            ctx, env=env)
        # pause: Kubernetes' own pause.c (in the k8s.io/kubernetes module), static, FROM scratch.
        src = _pause_source()
        run("gcc", "-Os", "-static", "-o", str(Path(ctx, "pause")), str(src))
        Path(ctx, "Dockerfile").write_text(
            'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n')
        run("docker", "build", "-q", "-t", PAUSE_IMAGE, ctx, env=env)
    ctr = ["ctr", "-a", containerd_sock(), "-n", "k8s.io"]
    for image in (PAUSE_IMAGE, GATEWAY_IMAGE, AGENT_IMAGE):
        with tempfile.NamedTemporaryFile(suffix=".tar") as tar:
            run("docker", "save", "-o", tar.name, image, env=env, timeout=600)
            run(*ctr, "images", "import", tar.name, timeout=600)
        log(f"loaded {image}")
    print("\n".join((PAUSE_IMAGE, GATEWAY_IMAGE, AGENT_IMAGE)))


def _pause_source() -> Path:
    """build/pause/linux/pause.c of the k8s.io/kubernetes module (the Go module cache)."""
    version = os.environ.get("K8S_VERSION", "v1.34.4")
    r = run("go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}", timeout=1800,
            cwd=tempfile.gettempdir(), env={**os.environ, "GOFLAGS": "", "GOWORK": "off"})
    src = Path(json.loads(r.stdout)["Dir"], "build/pause/linux/pause.c")
    if not src.exists():
        raise SystemExit(f"error: {src} missing")
    return src


# ---- DNS --------------------------------------------------------------------------------------

def dns(args: argparse.Namespace) -> None:
    """A cluster DNS for Services: A records of <svc>.<ns>.svc.cluster.local from the API
    (ClusterIP), everything else forwarded to the host's resolver."""
    b = bins()
    upstream = "127.0.0.1"
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        if line.startswith("nameserver"):
            upstream = line.split()[1]
            break
    cache: dict[str, tuple[float, str | None]] = {}
    lock = threading.Lock()

    def lookup(svc: str, ns: str) -> str | None:
        k = f"{svc}.{ns}"
        with lock:
            hit = cache.get(k)
            if hit and time.monotonic() - hit[0] < 5:
                return hit[1]
        r = kubectl(b, "get", "service", svc, "-n", ns, "-o", "jsonpath={.spec.clusterIP}", check=False, timeout=10)
        ipv = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() not in ("", "None") else None
        with lock:
            cache[k] = (time.monotonic(), ipv)
        return ipv

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.listen, 53))

    def answer(data: bytes, peer: tuple[str, int]) -> None:
        try:
            qid, flags, qd = struct.unpack("!HHH", data[:6])
            i, labels = 12, []
            while data[i]:
                n = data[i]
                labels.append(data[i + 1:i + 1 + n].decode("ascii", "replace").lower())
                i += n + 1
            qtype, _qclass = struct.unpack("!HH", data[i + 1:i + 5])
            question = data[12:i + 5]
            name = ".".join(labels)
            if not name.endswith("cluster.local"):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up_sock:
                    up_sock.settimeout(3)
                    up_sock.sendto(data, (upstream, 53))
                    sock.sendto(up_sock.recv(4096), peer)
                return
            addr = None
            if len(labels) == 5 and labels[2] == "svc":
                addr = lookup(labels[0], labels[1])
            if addr is None:
                rcode, answers = 3, b""                         # NXDOMAIN
            elif qtype == 1:
                rcode = 0
                answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + ipaddress.IPv4Address(addr).packed
            else:
                rcode, answers = 0, b""                         # no AAAA etc.
            head = struct.pack("!HHHHHH", qid, 0x8400 | (flags & 0x0100) | 0x0080 | rcode, qd,
                               1 if answers else 0, 0, 0)
            sock.sendto(head + question + answers, peer)
        except Exception as e:   # noqa: BLE001 - one bad query must not stop the DNS
            log(f"dns: {e!r}")

    log(f"dns: listening on {args.listen}:53, forwarding to {upstream}")
    while True:
        data, peer = sock.recvfrom(4096)
        threading.Thread(target=answer, args=(data, peer), daemon=True).start()


def status(args: argparse.Namespace) -> None:
    try:
        ok = api_ok() and node_ready(bins())
    except Exception:   # noqa: BLE001
        ok = False
    raise SystemExit(0 if ok else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build").set_defaults(fn=lambda a: print(bins()))
    sub.add_parser("images").set_defaults(fn=images)
    sub.add_parser("up").set_defaults(fn=up)
    sub.add_parser("down").set_defaults(fn=down)
    sub.add_parser("status").set_defaults(fn=status)
    d = sub.add_parser("dns")
    d.add_argument("--listen", required=True)
    d.set_defaults(fn=dns)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
