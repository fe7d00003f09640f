"""The kernel matrix's machinery: a cached guest image built only from Debian packages, and qemu
runs of the agent's kernel smoke suite (``tests/kernels/guest_suite.py``) on Debian's kernels.

Image (under ``~/.cache/ebpf-otlp-receiver/kernel-image-<key>/``, key = hash of this file, the
resolved kernel packages and the guest's Python dependencies):

- ``rootfs/``: a debootstrap'ed bookworm (python3-bpfcc, gcc for the tests' workloads), each
  kernel's headers (``/lib/modules/<release>/build`` for BCC) and ``/opt/venv`` with the agent's
  Python dependencies. No kernel modules: the guest boots with its root on 9p, read-only, shared
  by every run.
- ``kernels/<release>/{vmlinuz,initrd}``: the kernel and a tiny busybox initramfs holding only the
  virtio/9p modules (with their dependencies from ``modules.dep``), which mounts the 9p root and
  the checkout, and runs the suite.

Which kernels: whatever ``linux-image-amd64`` depends on in bullseye, bookworm and
bookworm-backports at build time (looked up with a private apt configuration; the host's own apt
state is not touched).

Built once, with its parts in parallel: debootstrap (its .debs kept in ``debootstrap-debs/``),
each kernel's download, initramfs and headers (the kernel .debs kept in ``kernel-debs/``), and
the wheels of the guest venv. Builders take ``image.lock``: the host suite starts a build in the
background at the start of a session that runs the matrix (tests/conftest.py), and the matrix
test waits for it.

Run ``python -m tests.kernels.vm build`` to build (or find) the image and print its directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EBPF_RECEIVER_CACHE", Path.home() / ".cache" / "ebpf-otlp-receiver"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITES = ("bullseye", "bookworm", "bookworm-backports")
GUEST_SUITE = "bookworm"   # the root filesystem's release (its python3-bpfcc runs on every kernel)
GUEST_PACKAGES = ("python3-bpfcc", "python3-venv", "gcc", "libc6-dev", "binutils", "iproute2",
                  "ca-certificates", "procps")
# Modules the guest needs before its root is mounted; dependencies come from modules.dep.
INITRD_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p")
# Python packages for the guest venv, besides the project's own dependencies.
GUEST_PY_EXTRA = ("pytest>=8,<9", "pytest-timeout>=2.3")


@dataclass(frozen=True)
class Kernel:
    suite: str
    release: str            # uname -r, e.g. 5.10.0-35-amd64
    image_pkg: str          # linux-image-<release>
    version: str            # Debian package version
    header_pkgs: tuple[str, ...]


def log(msg: str) -> None:
    print(f"[kernels {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    kw.setdefault("text", True)
    return subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


class Apt:
    """apt-get/apt-cache with their own sources and state under ``root``: the three suites'
    indexes, without touching the host's apt configuration."""

    def __init__(self, root: Path):
        self.root = root
        (root / "state/lists/partial").mkdir(parents=True, exist_ok=True)
        (root / "cache/archives/partial").mkdir(parents=True, exist_ok=True)
        (root / "etc").mkdir(parents=True, exist_ok=True)
        sources = "".join(f"deb {MIRROR} {s} main\n" for s in SUITES)
        (root / "etc/sources.list").write_text(sources)

    def opts(self) -> list[str]:
        r = self.root
        return ["-o", f"Dir::State={r}/state", "-o", f"Dir::Cache={r}/cache",
                "-o", f"Dir::Etc::SourceList={r}/etc/sources.list", "-o", "Dir::Etc::SourceParts=-",
                "-o", "Dir::State::status=/dev/null", "-o", "APT::Get::List-Cleanup=0",
                "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-q"]

    def update(self, max_age: float = 3600) -> None:
        """Indexes younger than ``max_age`` seconds are kept (a background build just fetched
        them, or an earlier run within the hour)."""
        stamp = self.root / "updated"
        if stamp.exists() and time.time() - stamp.stat().st_mtime < max_age:
            return
        run("apt-get", *self.opts(), "update", stdout=subprocess.DEVNULL)
        stamp.touch()

    def show(self, spec: str) -> dict[str, str]:
        text = run("apt-cache", *self.opts(), "show", "--no-all-versions", spec,
                   capture_output=True).stdout
        fields: dict[str, str] = {}
        for line in text.splitlines():
            if not line.strip():
                break
            if ":" in line and not line.startswith(" "):
                k, _, v = line.partition(":")
                fields[k] = v.strip()
        return fields

    def download(self, dest: Path, specs: list[str]) -> None:
        run("apt-get", *self.opts(), "download", *specs, cwd=dest, stdout=subprocess.DEVNULL)


def _depends(fields: dict[str, str]) -> list[str]:
    return [d.split()[0] for d in re.split(r",\s*", fields.get("Depends", "")) if d]


def resolve_kernels(apt: Apt) -> list[Kernel]:
    """What ``linux-image-amd64`` points to in each suite today."""
    out = []
    for suite in SUITES:
        meta = apt.show(f"linux-image-amd64/{suite}")
        image = next(d for d in _depends(meta) if d.startswith("linux-image-") and d != "linux-image-amd64")
        fields = apt.show(f"{image}/{suite}")
        release = image.removeprefix("linux-image-").removesuffix("-unsigned")
        headers = f"linux-headers-{release}"
        hdr = apt.show(f"{headers}/{suite}")
        common = [d for d in _depends(hdr) if d.startswith("linux-headers-") and d.endswith("-common")]
        out.append(Kernel(suite, release, image, fields["Version"], (headers, *common)))
    return out


def python_dependencies() -> list[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *GUEST_PY_EXTRA]


def image_key(kernels: list[Kernel]) -> str:
    """What the image is made of: the build steps, the packages, the Python dependencies."""
    h = hashlib.sha256()
    for fn in (build_image, _debootstrap, _build_kernel, _build_initrd, _modules_closure,
               _install_venv, _slim):
        h.update(inspect.getsource(fn).encode())
    h.update(INIT.encode())
    h.update(json.dumps([GUEST_SUITE, GUEST_PACKAGES, [k.__dict__ for k in kernels],
                         python_dependencies()], sort_keys=True).encode())
    return h.hexdigest()[:12]


def _module_bytes(path: Path) -> bytes:
    if path.suffix == ".xz":
        return run("xz", "-dc", str(path), capture_output=True, text=False).stdout
    if path.suffix == ".zst":
        return run("zstd", "-dc", str(path), capture_output=True, text=False).stdout
    return path.read_bytes()


def _modules_closure(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(file name, contents) of ``wanted`` and the modules they depend on, in load order,
    decompressed; built-in ones are skipped. Dependencies come from each module's
    ``depends=`` modinfo string (the .deb has no modules.dep, and depmod needs kmod)."""
    by_name = {re.sub(r"\.ko(\.\w+)?$", "", p.name).replace("-", "_"): p
               for p in (moddir / "kernel").rglob("*.ko*")}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        path = by_name.get(name)
        if path is None or name in seen:
            return
        seen.add(name)
        data = _module_bytes(path)
        m = re.search(rb"\0depends=([\w,-]*)\0", b"\0" + data)
        for dep in (m.group(1).decode().split(",") if m and m.group(1) else []):
            visit(dep)
        order.append((f"{name}.ko", data))

    for name in wanted:
        visit(name)
    return order


INIT = r"""#!/bin/busybox sh
# Guest PID 1 in the initramfs: load the virtio/9p modules, mount the shared root read-only,
# the checkout and the results folder, then run the suite's guest script.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/modules/$m" || echo "init: insmod $m failed"; done
opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$opts,ro,cache=loose" rootfs /newroot || { echo "init: no 9p root"; poweroff -f; }
mount -t tmpfs -o mode=1777 tmp /newroot/tmp
mount -t tmpfs tmp /newroot/run
mount -t tmpfs tmp /newroot/root
mount -t 9p -o "$opts,ro" src /newroot/mnt/src
mount -t 9p -o "$opts,ro" otelcol /newroot/mnt/otelcol
mount -t 9p -o "$opts" out /newroot/mnt/out
mount --move /dev /newroot/dev
umount /proc
exec switch_root /newroot /bin/bash /mnt/src/tests/kernels/guest.sh
"""


def _build_initrd(kernel_root: Path, release: str, dest: Path, busybox: Path) -> None:
    mods = _modules_closure(kernel_root / "lib/modules" / release, INITRD_MODULES)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "bin").mkdir()
        shutil.copy(busybox, t / "bin/busybox")
        (t / "modules").mkdir()
        names = []
        for name, data in mods:
            (t / "modules" / name).write_bytes(data)
            names.append(name)
        (t / "modules.order").write_text("\n".join(names) + "\n")
        (t / "init").write_text(INIT)
        (t / "init").chmod(0o755)
        files = run("find", ".", "-print0", cwd=t, capture_output=True).stdout
        cpio = subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet"], input=files.encode(),
                              cwd=t, capture_output=True, check=True).stdout
        dest.write_bytes(run("gzip", "-9", input=cpio, capture_output=True, text=False).stdout)
    log(f"initrd for {release}: {', '.join(names)}")


def _chroot(rootfs: Path, *cmd: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run("chroot", str(rootfs), *cmd, env=env)


def _download_wheels(wheels: Path) -> None:
    """The guest venv's wheels, downloaded with the host's own pip configuration (the guest's
    Python is the same Debian 3.11, so the same wheels fit)."""
    host_py = REPO / ".venv/bin/python"
    run(str(host_py if host_py.exists() else sys.executable), "-m", "pip", "download", "-q",
        "--only-binary=:all:", "-d", str(wheels), *python_dependencies())


def _install_venv(rootfs: Path, downloaded: Path) -> None:
    """The guest's venv, from the wheels ``_download_wheels`` put in ``downloaded``."""
    wheels = rootfs / "tmp/wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    shutil.copytree(downloaded, wheels)
    for d in ("proc", "dev"):
        run("mount", "--bind", f"/{d}", str(rootfs / d))
    try:
        _chroot(rootfs, "/usr/bin/python3", "-m", "venv", "/opt/venv")
        site = "/opt/venv/lib/python3.11/site-packages"
        _chroot(rootfs, "/bin/ln", "-sfn", "/usr/lib/python3/dist-packages/bcc", f"{site}/bcc")
        _chroot(rootfs, "/opt/venv/bin/pip", "install", "-q", "--no-index", "--find-links=/tmp/wheels",
                *python_dependencies())
        shutil.rmtree(wheels)
    finally:
        for d in ("dev", "proc"):
            subprocess.run(["umount", "-l", str(rootfs / d)], check=False)


def _slim(rootfs: Path) -> None:
    for rel in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
                "var/cache/apt", "var/lib/apt/lists"):
        shutil.rmtree(rootfs / rel, ignore_errors=True)
    (rootfs / "var/cache/apt").mkdir(parents=True, exist_ok=True)


def _debootstrap(work: Path) -> None:
    rootfs = work / "rootfs"
    if (work / "debootstrap.done").exists():   # an interrupted build resumes after it
        return
    t0 = time.monotonic()
    log(f"debootstrap {GUEST_SUITE} into {rootfs}")
    shutil.rmtree(rootfs, ignore_errors=True)
    debs = CACHE / "debootstrap-debs"   # kept: a new image key does not download them again
    debs.mkdir(parents=True, exist_ok=True)
    run("debootstrap", "--variant=minbase", f"--include={','.join(GUEST_PACKAGES)}",
        f"--cache-dir={debs}", GUEST_SUITE, str(rootfs), MIRROR, stdout=subprocess.DEVNULL)
    (work / "debootstrap.done").touch()
    log(f"debootstrap done in {time.monotonic() - t0:.0f}s")


def _build_kernel(work: Path, k: Kernel, apt: Apt, busybox: Path) -> Path:
    """``kernels/<release>/{vmlinuz,initrd}``, and the kernel's headers' ``/usr/src`` trees
    staged under ``headers/<release>`` (moved into the root filesystem once it exists)."""
    t0 = time.monotonic()
    debs = CACHE / "kernel-debs" / k.release   # kept: a new image key does not download them again
    debs.mkdir(parents=True, exist_ok=True)
    pkgs = (k.image_pkg, *k.header_pkgs)   # one source package: one version

    def deb(pkg: str) -> list[Path]:
        return sorted(debs.glob(f"{pkg}_{k.version}_*.deb"))

    want = [p for p in pkgs if not deb(p)]
    if want:
        apt.download(debs, [f"{p}/{k.suite}" for p in want])
    kdir = work / "kernels" / k.release
    shutil.rmtree(kdir, ignore_errors=True)
    kdir.mkdir(parents=True)
    kroot = work / f"kroot-{k.release}"
    shutil.rmtree(kroot, ignore_errors=True)
    for path in deb(k.image_pkg):
        run("dpkg-deb", "-x", str(path), str(kroot))
    shutil.copy(kroot / "boot" / f"vmlinuz-{k.release}", kdir / "vmlinuz")
    _build_initrd(kroot, k.release, kdir / "initrd", busybox)
    shutil.rmtree(kroot)
    # Only /usr/src from the headers: extracting into the root would replace the merged-/usr
    # symlink /lib with a directory.
    hroot = work / "headers" / k.release
    shutil.rmtree(hroot, ignore_errors=True)
    hroot.mkdir(parents=True)
    for pkg in k.header_pkgs:
        for path in deb(pkg):
            run("dpkg-deb", "-x", str(path), str(hroot))
    log(f"kernel {k.release} in {time.monotonic() - t0:.0f}s")
    return hroot / "usr/src"


def build_image(work: Path, kernels: list[Kernel], apt: Apt) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise RuntimeError("busybox-static is not installed (make test installs it)")
    rootfs = work / "rootfs"
    t0 = time.monotonic()
    shutil.rmtree(work / "kernels", ignore_errors=True)
    wheels = work / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    # Everything that needs no root filesystem runs beside debootstrap.
    with ThreadPoolExecutor(2 + len(kernels)) as pool:
        jobs = [pool.submit(_debootstrap, work), pool.submit(_download_wheels, wheels)]
        kjobs = [pool.submit(_build_kernel, work, k, apt, busybox) for k in kernels]
        for job in jobs:
            job.result()
        srcs = [job.result() for job in kjobs]
    for k, src in zip(kernels, srcs):
        for d in src.iterdir():
            shutil.rmtree(rootfs / "usr/src" / d.name, ignore_errors=True)
            shutil.move(d, rootfs / "usr/src" / d.name)
        # What the packages' postinst would link: BCC reads build (the -amd64 part) and
        # source (the -common part, with include/linux/kconfig.h).
        moddir = rootfs / "usr/lib/modules" / k.release
        moddir.mkdir(parents=True, exist_ok=True)
        common = next(p for p in k.header_pkgs if p.endswith("-common"))
        for name, target in (("build", f"linux-headers-{k.release}"), ("source", common)):
            (moddir / name).unlink(missing_ok=True)
            (moddir / name).symlink_to(f"/usr/src/{target}")
    shutil.rmtree(work / "headers")
    log("guest venv")
    _install_venv(rootfs, wheels)
    shutil.rmtree(wheels)
    for d in ("mnt/src", "mnt/out", "mnt/otelcol"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    _slim(rootfs)
    (work / "kernels.json").write_text(json.dumps([k.__dict__ for k in kernels], indent=1))
    log(f"image built in {time.monotonic() - t0:.0f}s")


def ensure_image() -> tuple[Path, list[Kernel]]:
    """The cached image for today's kernels, built when missing; older images are removed.
    One builder at a time (``image.lock``): a second caller waits and finds the image."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "image.lock", "w") as lock:
        t0 = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        if time.monotonic() - t0 > 1:
            log(f"waited {time.monotonic() - t0:.0f}s for another build of the image")
        apt = Apt(CACHE / "kernel-apt")
        apt.update()
        kernels = resolve_kernels(apt)
        image = CACHE / f"kernel-image-{image_key(kernels)}"
        if (image / "kernels.json").is_file():
            return image, kernels
        log("kernels: " + ", ".join(f"{k.suite} {k.release} ({k.version})" for k in kernels))
        work = image.with_name(image.name + ".partial")
        work.mkdir(exist_ok=True)
        build_image(work, kernels, apt)
        work.rename(image)
        for old in CACHE.glob("kernel-image-*"):
            if old != image:
                shutil.rmtree(old, ignore_errors=True)
        releases = {k.release for k in kernels}
        for old in (CACHE / "kernel-debs").iterdir():
            if old.name not in releases:
                shutil.rmtree(old, ignore_errors=True)
        return image, kernels


# ------------------------------------------------------------------------------- running a VM


def kvm_works(image: Path, kernel: Kernel, timeout: float = 20) -> bool:
    """Whether KVM boots ``kernel`` to its first process here: /dev/kvm exists on these machines
    but hangs stock kernels in the decompressor, with no error. One short boot (init is busybox,
    which exits, so the kernel panics and qemu stops); the answer is cached per host kernel
    (whether KVM works is the host's property: one probe, with the first kernel that asks).
    KERNEL_MATRIX_KVM=0 or 1 skips the probe."""
    forced = os.environ.get("KERNEL_MATRIX_KVM")
    if forced in ("0", "1"):
        return forced == "1"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    cached = CACHE / f"kvm-probe-{os.uname().release}"
    if cached.exists():
        return cached.read_text() == "yes"
    kdir = image / "kernels" / kernel.release
    cmd = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-display", "none",
           "-monitor", "none", "-no-reboot", "-nodefaults", "-serial", "stdio",
           "-kernel", str(kdir / "vmlinuz"), "-initrd", str(kdir / "initrd"),
           "-append", "console=ttyS0 panic=-1 loglevel=7 rdinit=/bin/busybox"]
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
        ok = b"as init process" in p.stdout
    except subprocess.TimeoutExpired:
        ok = False
    cached.write_text("yes" if ok else "no")
    log(f"KVM probe with {kernel.release}: {'works' if ok else 'hangs or fails; using TCG'}")
    return ok


@dataclass
class VmResult:
    kernel: Kernel
    returncode: int | None      # None: timed out
    seconds: float
    serial: str
    out: Path

    def save(self) -> None:
        """vm.json beside the guest's own results: what the matrix test reads, whichever
        process ran the guest."""
        (self.out / "vm.json").write_text(json.dumps({"returncode": self.returncode, "seconds": self.seconds,
                                                      "serial": self.serial[-20000:]}))

    @staticmethod
    def load(kernel: Kernel, out: Path) -> "VmResult | None":
        try:
            d = json.loads((out / "vm.json").read_text())
        except (OSError, ValueError):
            return None
        return VmResult(kernel, d["returncode"], d["seconds"], d["serial"], out)


def run_vm(image: Path, kernel: Kernel, out: Path, otelcol_dir: Path, timeout: float,
           memory_mb: int = 2048) -> VmResult:
    """Boots ``kernel`` on the image with the checkout, the Collector and ``out`` shared; the
    guest powers itself off when its suite is done. A guest that does not end within
    ``timeout`` is killed."""
    out.mkdir(parents=True, exist_ok=True)
    kdir = image / "kernels" / kernel.release
    serial = out / "serial.log"
    accel = (["-accel", "kvm", "-cpu", "host"] if kvm_works(image, kernel)
             else ["-accel", "tcg", "-cpu", "max"])
    shares = [("rootfs", image / "rootfs", True), ("src", REPO, True), ("otelcol", otelcol_dir, True),
              ("out", out, False)]
    cmd = ["qemu-system-x86_64", *accel, "-m", str(memory_mb), "-smp", "1", "-display", "none",
           "-monitor", "none", "-no-reboot", "-nodefaults", "-serial", f"file:{serial}",
           "-kernel", str(kdir / "vmlinuz"), "-initrd", str(kdir / "initrd"),
           "-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"]
    for i, (tag, path, ro) in enumerate(shares):
        cmd += ["-fsdev", f"local,id=fs{i},path={path},security_model=none{',readonly=on' if ro else ''}",
                "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag={tag}"]
    cmd += ["-device", "virtio-rng-pci"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        qemu_out, _ = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        qemu_out, _ = proc.communicate()
        rc = None
    finally:   # also when the test itself is interrupted: no guest outlives its run
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = serial.read_text(errors="replace") if serial.exists() else ""
    if qemu_out:
        text += "\n[qemu] " + qemu_out.decode(errors="replace")
    result = VmResult(kernel, rc, time.monotonic() - t0, text, out)
    result.save()
    return result



# ------------------------------------------------------------------------------ guest lanes
#
# Guests run in lanes: a lane boots, one after another, each kernel that no other lane has
# claimed yet (a ``claimed`` file made with O_EXCL in the kernel's results folder). The host
# suite starts one lane in the background, niced, as soon as the session starts (tests/conftest.py):
# it builds the image and then soaks up the CPU the rest of the suite leaves idle. The matrix
# test, which runs last, restores that lane's priority and adds its own lanes beside it.


def kernel_version(k: Kernel) -> tuple[int, ...]:
    """5.10.0-32-amd64 → (5, 10, 0)"""
    return tuple(int(p) for p in k.release.split("-", 1)[0].split(".")[:3] if p.isdigit())


def newest_first(kernels: list[Kernel]) -> list[Kernel]:
    """The order lanes take kernels in: the newest (slowest to compile for) first, so the others
    share the remaining lanes meanwhile."""
    return sorted(kernels, key=kernel_version, reverse=True)


def claim(out_root: Path, kernel: Kernel) -> bool:
    folder = out_root / kernel.release
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def run_lane(image: Path, kernels: list[Kernel], out_root: Path, otelcol_dir: Path, timeout: float) -> None:
    for k in newest_first(kernels):
        if claim(out_root, k):
            log(f"lane {os.getpid()}: {k.release}")
            r = run_vm(image, k, out_root / k.release, otelcol_dir, timeout)
            log(f"lane {os.getpid()}: {k.release} exit {r.returncode} after {r.seconds:.0f}s")


LANE_PID = "lane.pid"
# Per guest. Alone under TCG on an idle core a guest takes 5-10 minutes; the background lane's
# guest may spend part of its run niced behind the host suite.
VM_TIMEOUT = float(os.environ.get("KERNEL_MATRIX_VM_TIMEOUT", "2400"))


def background_lane(out_root: Path) -> int | None:
    """The pid of the background lane running for ``out_root``, if it is still running."""
    try:
        pid = int((out_root / LANE_PID).read_text())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return None if state in ("Z", "X") else pid


def main() -> int:
    if sys.argv[1:] == ["build"]:
        image, kernels = ensure_image()
        kvm_works(image, kernels[0])   # probed here, not while the matrix waits
        print(image)
        return 0
    if sys.argv[1:2] == ["lane"] and len(sys.argv) == 5:
        out_root, otelcol_dir, timeout = Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
        out_root.mkdir(parents=True, exist_ok=True)
        (out_root / LANE_PID).write_text(str(os.getpid()))
        image, kernels = ensure_image()
        kvm_works(image, kernels[0])
        run_lane(image, kernels, out_root, otelcol_dir, timeout)
        return 0
    print("usage: python -m tests.kernels.vm build | lane OUT_ROOT OTELCOL_DIR TIMEOUT_S", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
