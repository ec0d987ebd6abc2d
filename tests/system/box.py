"""A Debian bookworm root filesystem, built once and cached, booted with a real systemd as PID 1.

The host this runs on is itself a container without systemd, machined or D-Bus, so:
- the rootfs comes from `debootstrap` and is cached under /var/tmp/edgeagent-system, named by a digest
  of its package list (a changed list builds a new one; the old one is removed);
- every boot lays a throwaway overlay over the cached rootfs, so each run starts from the same tree;
- `systemd-nspawn -b --register=no --keep-unit` is the only way it boots here (no machined to register
  with), and `--keep-unit` would put the container's cgroups at the host's root, so the nspawn process
  is moved into a cgroup of its own before it starts;
- commands run inside through `nsenter` into the container's PID 1 namespaces (no machinectl);
- `--private-network` gives the box its own loopback: its Mosquitto and sandbox do not meet the
  host's ports, and pip inside installs from a wheelhouse downloaded on the host (bind-mounted).

For arm64 the same rootfs is built with `debootstrap --foreign` and a second stage under qemu-user
(binfmt_misc with the F flag, so nothing of qemu lives in the rootfs); it is entered, not booted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("EDGEAGENT_SYSTEM_CACHE", "/var/tmp/edgeagent-system"))
SUITE = "bookworm"
MIRROR = os.environ.get("EDGEAGENT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
REPO = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO / "deploy" / "requirements.lock"
PYTHON_VERSION = "3.11"  # bookworm's python3

# What a lane box has before install.sh runs, plus what the tier drives it with (procps for pgrep).
BOOT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "mosquitto", "mosquitto-clients",
                 "ca-certificates", "procps")  # fmt: skip
ARM_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Wheel platform tags pip may pick for each Debian architecture (glibc 2.36 in bookworm).
PLATFORMS = {
    "amd64": ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "arm64": ("manylinux_2_34_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
}
QEMU = {"arm64": "qemu-aarch64"}
CGROUP_HIERARCHIES = ("systemd", "unified")  # cgroup v1 name=systemd and the cgroup2 of a hybrid layout
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_COLORS": "0",
}


class Unavailable(Exception):
    """This machine cannot run the tier; the message says why."""


def say(message: str) -> None:
    print(f"system-box: {message}", file=sys.stderr, flush=True)


def run_host(argv: list[str], log: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run on the host; with `log`, output goes there and its tail is shown when the command fails."""
    if log is None:
        return subprocess.run(argv, check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]
    with log.open("w") as out:
        done = subprocess.run(argv, text=True, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{' '.join(argv[:3])}… failed ({done.returncode}); {log}:\n{tail}")
    return done  # type: ignore[no-any-return]


# -- the host -------------------------------------------------------------------------------------


def why_not(arch: str = "amd64") -> str | None:
    """None when this machine can run the tier for `arch`, else the reason in one line."""
    if os.geteuid() != 0:
        return "the system tier needs root (it debootstraps a rootfs and runs systemd-nspawn)"
    if not shutil.which("apt-get") and not (shutil.which("systemd-nspawn") and shutil.which("debootstrap")):
        return "systemd-nspawn/debootstrap are missing and there is no apt-get to install them"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no /sys/fs/cgroup here: systemd cannot boot in a container"
    return None


def ensure_host_tools(arch: str = "amd64") -> None:
    """systemd-nspawn and debootstrap (and qemu-user for arm64), installed with apt-get when missing."""
    wanted = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap"}
    if arch in QEMU:
        wanted |= {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support"}
    missing = sorted({pkg for tool, pkg in wanted.items() if not shutil.which(tool)})
    if missing:
        say(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        logs = CACHE / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        run_host(["apt-get", "update", "-q"], logs / "apt-update.log", env=env)
        run_host(["apt-get", "install", "-y", "-q", *missing], logs / "apt-install.log", env=env)
    # systemd-container pulls libnss-mymachines, which adds `mymachines` to the host's nsswitch.conf.
    if subprocess.run(["dpkg", "-s", "libnss-mymachines"], capture_output=True, check=False).returncode == 0:
        run_host(["apt-get", "purge", "-y", "-q", "libnss-mymachines"], CACHE / "logs" / "apt-purge.log")
    if arch in QEMU:
        binfmt = Path("/proc/sys/fs/binfmt_misc")
        if not (binfmt / "register").exists():
            run_host(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
        if not (binfmt / QEMU[arch]).exists():
            run_host(["update-binfmts", "--enable", QEMU[arch]])
        if "F" not in (binfmt / QEMU[arch]).read_text().split("flags:")[1].splitlines()[0]:
            raise Unavailable(f"{QEMU[arch]} is registered without the F flag: the rootfs would need qemu inside")


# -- the cached root filesystem ---------------------------------------------------------------------


def digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """One builder at a time per cached thing (two CI runs on one machine wait for each other)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rootfs(arch: str = "amd64") -> Path:
    """The cached bookworm rootfs for `arch`; built (1-2 min amd64, ~6 min arm64) when missing or stale."""
    packages = BOOT_PACKAGES if arch == "amd64" else ARM_PACKAGES
    path = CACHE / f"{SUITE}-{arch}-{digest(SUITE, arch, packages, MIRROR)}"
    with cache_lock(f"rootfs-{arch}"):
        if (path / ".complete").exists():
            return path
        for stale in CACHE.glob(f"{SUITE}-{arch}-*"):
            say(f"removing {stale} (another package list)")
            shutil.rmtree(stale)
        partial = path.with_name(path.name + ".partial")
        logs = CACHE / "logs"
        logs.mkdir(exist_ok=True)
        start = time.monotonic()
        say(f"debootstrap {SUITE} {arch} into {path} (cached for the next runs)")
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}"]
        if arch != "amd64":
            argv += [f"--arch={arch}", "--foreign"]
        run_host([*argv, SUITE, str(partial), MIRROR], logs / f"debootstrap-{arch}.log")
        if arch != "amd64":
            say(f"second stage under qemu-user ({time.monotonic() - start:.0f} s so far)")
            run_host(["chroot", str(partial), "/debootstrap/debootstrap", "--second-stage"],
                     logs / f"debootstrap-{arch}-stage2.log")  # fmt: skip
        # Trust what the host trusts (an egress proxy's CA), as a box on a site network would.
        for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(crt, partial / "usr/local/share/ca-certificates" / crt.name)
        run_host(["chroot", str(partial), "update-ca-certificates"], logs / f"ca-{arch}.log")
        (partial / "etc/hostname").write_text(f"edgebox-{arch}\n")
        (partial / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        (partial / ".complete").write_text(f"built in {time.monotonic() - start:.0f} s\n")
        partial.rename(path)
        say(f"rootfs ready in {time.monotonic() - start:.0f} s")
        return path


def wheelhouse(arch: str = "amd64") -> Path:
    """The locked wheels for `arch` (checked against the lock's hashes), downloaded once per lock."""
    lock = LOCK_FILE.read_bytes()
    path = CACHE / f"wheels-{arch}-{hashlib.sha256(lock).hexdigest()[:12]}"
    with cache_lock(f"wheels-{arch}"):
        if (path / ".complete").exists():
            return path
        for stale in CACHE.glob(f"wheels-{arch}-*"):
            shutil.rmtree(stale)
        path.mkdir(parents=True)
        argv = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--isolated",
                "--require-hashes", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
                "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none", "-d", str(path),
                "-r", str(LOCK_FILE)]  # fmt: skip
        for platform in PLATFORMS[arch]:
            argv += ["--platform", platform]
        cert = Path("/etc/ssl/certs/ca-certificates.crt")
        if cert.exists():
            argv += ["--cert", str(cert)]
        run_host(argv, CACHE / "logs" / f"wheels-{arch}.log")
        (path / ".complete").touch()
        return path


# -- a booted box -----------------------------------------------------------------------------------


def _own_cgroup(name: str) -> None:
    """In the nspawn child before exec: leave the host's root cgroup for one of our own."""
    for hierarchy in CGROUP_HIERARCHIES:
        group = Path("/sys/fs/cgroup", hierarchy, name)
        if group.parent.is_dir():
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(os.getpid()))


def _remove_cgroup(name: str) -> None:
    for hierarchy in CGROUP_HIERARCHIES:
        top = Path("/sys/fs/cgroup", hierarchy, name)
        if top.is_dir():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


@dataclass
class Box:
    """A booted container: `run` executes a shell command inside as root."""

    name: str
    root: Path  # the merged overlay the container sees as /
    session: Path
    process: subprocess.Popen[bytes] | None = None
    leader: int = 0
    console: Path = field(init=False)

    def __post_init__(self) -> None:
        self.console = self.session / "console.log"

    def run(
        self, command: str, *, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", "--",
                "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in {**INSIDE_ENV, **(env or {})}.items()),
                "/bin/bash", "-c", command]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(
                f"in the box: {command!r} exited {done.returncode}\n"
                f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
            )
        return done

    def out(self, command: str, **kwargs: object) -> str:
        return self.run(command, **kwargs).stdout.strip()  # type: ignore[arg-type]


def _leader(nspawn: int) -> int:
    """The container's PID 1 as the host sees it: nspawn's child in another pid namespace."""
    own = os.readlink("/proc/self/ns/pid")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == nspawn and os.readlink(proc / "ns/pid") != own:
                return int(proc.name)
    return 0


def reap_stale_sessions() -> None:
    """Boxes of earlier runs that were killed before they could clean up: stop, unmount, remove."""
    for session in (CACHE / "run").glob("*-*"):
        owner = session.name.rsplit("-", 1)[-1]
        if not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        say(f"cleaning up {session} (its run, pid {owner}, is gone)")
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if proc.name.isdigit() and str(session).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), 15)  # nspawn halts the container on SIGTERM
                    for _ in range(60):
                        if not proc.exists():
                            break
                        time.sleep(0.5)
        subprocess.run(["umount", str(session / "root")], check=False, capture_output=True)
        _remove_cgroup(f"edgeagent-system-{session.name}")
        shutil.rmtree(session, ignore_errors=True)


@contextlib.contextmanager
def booted(rootfs_path: Path, binds: dict[Path, str], name: str = "edgebox") -> Iterator[Box]:
    """Boot `rootfs_path` under a throwaway overlay; binds are host path → read-only path inside."""
    reap_stale_sessions()
    session = CACHE / "run" / f"{name}-{os.getpid()}"
    shutil.rmtree(session, ignore_errors=True)
    merged, upper, work = session / "root", session / "upper", session / "work"
    for d in (merged, upper, work):
        d.mkdir(parents=True)
    run_host(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={rootfs_path},upperdir={upper},workdir={work}", str(merged)])  # fmt: skip
    box = Box(name, merged, session)
    cgroup = f"edgeagent-system-{name}-{os.getpid()}"
    try:
        argv = ["systemd-nspawn", "-b", "-D", str(merged), "-M", name, "--register=no", "--keep-unit",
                "--private-network", "--console=read-only"]  # fmt: skip
        argv += [f"--bind-ro={host}:{inside}" for host, inside in binds.items()]
        with box.console.open("wb") as console:
            box.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                preexec_fn=lambda: _own_cgroup(cgroup), start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not box.leader and time.monotonic() < deadline and box.process.poll() is None:
            time.sleep(0.1)
            box.leader = _leader(box.process.pid)
        if not box.leader:
            raise RuntimeError(f"the container did not start; {box.console}:\n{box.console.read_text()[-2000:]}")
        state = ""
        while time.monotonic() < deadline + 60 and state not in ("running", "degraded"):
            state = box.run("systemctl is-system-running --wait", check=False, timeout=120).stdout.strip()
            if not state:
                time.sleep(0.3)
        if state != "running":
            failed = box.out("systemctl --failed --no-legend", check=False)
            say(f"booted {name}: is-system-running says {state or '?'}; failed units: {failed or 'none'}")
        yield box
    finally:
        if box.process is not None:
            if box.leader and box.process.poll() is None:
                box.run("systemctl poweroff --no-block", check=False, timeout=30)
            try:
                box.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                box.process.kill()
                box.process.wait()
        _remove_cgroup(cgroup)
        subprocess.run(["umount", str(merged)], check=False)
        shutil.rmtree(session, ignore_errors=True)


def nspawn_run(rootfs_path: Path, argv: list[str], binds: dict[Path, str], name: str, extra: list[str]) -> int:
    """Run argv in the rootfs without booting (arm64 under qemu-user), with the host network."""
    cgroup = f"edgeagent-system-{name}-{os.getpid()}"
    full = ["systemd-nspawn", "-q", "-D", str(rootfs_path), "-M", name, "--register=no", "--keep-unit",
            "--resolv-conf=copy-host", "--console=pipe", "-E", "LANG=C.UTF-8",
            "-E", "PIP_DEFAULT_TIMEOUT=180"]  # fmt: skip
    full += [f"--bind-ro={host}:{inside}" for host, inside in binds.items()] + extra
    try:
        done = subprocess.run([*full, *argv], preexec_fn=lambda: _own_cgroup(cgroup), check=False)
        return int(done.returncode)
    finally:
        _remove_cgroup(cgroup)
