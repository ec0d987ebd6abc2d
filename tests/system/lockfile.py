"""deploy/requirements.lock: the exact, hashed runtime dependencies install.sh puts on every box.

    python -m tests.system.lockfile build   resolve pyproject's dependencies once (pip, for CPython 3.11
                                            on Linux) and record every wheel for amd64, arm64 and armhf,
                                            with the sdist where an architecture has no wheel (cffi on armhf)
    python -m tests.system.lockfile check   the lock still matches pyproject.toml (no network)

Why: PyPI served httpx 0.29.0 to one box and 0.28.1 to another 25 minutes apart; boxes of one lot must
run the same code, and `pip install --require-hashes` refuses anything the lock does not name.
setuptools is in the lock as the one build-time tool: install.sh builds edgeagent's own wheel from the
checkout with it (--no-build-isolation), so a box never fetches an unpinned build backend.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "deploy" / "requirements.lock"
PYTHON = "3.11"
CERT = "/etc/ssl/certs/ca-certificates.crt"
PLATFORMS = {
    "amd64": ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
    "arm64": ["manylinux_2_34_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"],
    "armhf": ["manylinux_2_31_armv7l", "manylinux_2_28_armv7l", "manylinux_2_17_armv7l", "manylinux2014_armv7l"],
}
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\]+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def wanted() -> tuple[list[str], list[str]]:
    """pyproject's runtime dependencies and its build requirements."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return list(data["project"]["dependencies"]), list(data["build-system"]["requires"])


def source_digest() -> str:
    runtime, build = wanted()
    return hashlib.sha256(json.dumps([runtime, build, PYTHON, sorted(PLATFORMS)]).encode()).hexdigest()[:16]


def parse(text: str) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, [sha256, ...])} from a lock file's text."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current: str = ""
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        pin = PIN.match(line)
        if pin:
            current = canonicalize_name(pin.group(1))
            pins[current] = (pin.group(2), [])
        pins[current][1].extend(HASH.findall(line))
    return pins


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--isolated", *args]
    if Path(CERT).exists():  # --isolated ignores pip.conf: trust what the host trusts (an egress proxy's CA)
        argv += ["--cert", CERT]
    return subprocess.run(argv, check=True, text=True, capture_output=True)


def resolve(requirements: list[str]) -> dict[str, str]:
    """What pip picks today for CPython 3.11 on Linux: {name: version}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--ignore-installed", "--quiet", "--only-binary=:all:", "--report", str(report),
            *requirements)  # fmt: skip
        items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in items}


def build() -> None:
    runtime, build_requires = wanted()
    pins = resolve(runtime) | resolve(build_requires)
    files: dict[str, set[str]] = {canonicalize_name(n): set() for n in pins}
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "pins.txt"
        reqs.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
        for arch, platforms in PLATFORMS.items():
            dest = Path(tmp) / arch
            # --no-deps: the pins are the whole set; without --only-binary pip takes the sdist where
            # this architecture has no wheel (and says so below).
            args = ["download", "--quiet", "--no-deps", "--python-version", PYTHON, "--implementation", "cp",
                    "--abi", "cp311", "--abi", "abi3", "--abi", "none", "-d", str(dest), "-r", str(reqs)]  # fmt: skip
            for platform in platforms:
                args += ["--platform", platform]
            pip(*args)
            for f in sorted(dest.iterdir()):
                project = canonicalize_name(re.split(r"-\d", f.name, maxsplit=1)[0].replace("_", "-"))
                files[project].add(hashlib.sha256(f.read_bytes()).hexdigest())
                if not f.name.endswith(".whl"):
                    print(f"{arch}: no wheel for {f.name}: built from source on such a box", file=sys.stderr)
    lines = [
        "# Generated by `make lock` (python -m tests.system.lockfile build) from pyproject.toml; do not edit.",
        f"# source-digest: {source_digest()}",
        "# For CPython 3.11 on Linux amd64, arm64 and armhf. Runtime: " + ", ".join(runtime),
        "# Build-time (edgeagent's own wheel, --no-build-isolation): " + ", ".join(build_requires),
        "# install.sh: pip install --require-hashes -r requirements.lock, then edgeagent with --no-deps.",
    ]
    for name in sorted(pins, key=canonicalize_name):
        hashes = sorted(files[canonicalize_name(name)])
        lines.append(f"{canonicalize_name(name)}=={pins[name]} \\")
        cont = [" \\"] * (len(hashes) - 1) + [""]
        lines += [f"    --hash=sha256:{h}{c}" for h, c in zip(hashes, cont, strict=True)]
    LOCK.write_text("\n".join(lines) + "\n")
    print(f"wrote {LOCK.relative_to(REPO)}: {len(pins)} packages")


def problems(text: str) -> list[str]:
    """Why the lock no longer fits pyproject.toml (empty when it does)."""
    found = []
    digest = re.search(r"^# source-digest: (\w+)", text, re.M)
    if not digest or digest.group(1) != source_digest():
        found.append("pyproject's dependencies changed since the lock was built: run `make lock`")
    pins = parse(text)
    runtime, build_requires = wanted()
    for spec in runtime + build_requires:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name not in pins:
            found.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            found.append(f"{name}=={pins[name][0]} does not satisfy {spec}")
    found += [f"{name}=={version} has no --hash" for name, (version, hashes) in pins.items() if not hashes]
    return found


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        build()
    found = problems(LOCK.read_text() if LOCK.exists() else "")
    for problem in found:
        print(f"{LOCK.relative_to(REPO)}: {problem}", file=sys.stderr)
    if not found:
        print(f"{LOCK.relative_to(REPO)}: {len(parse(LOCK.read_text()))} packages pinned with hashes, fits pyproject")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
