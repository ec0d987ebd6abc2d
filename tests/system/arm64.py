"""`make arm64`: the checkout on Debian bookworm arm64 (Raspberry Pi OS 64-bit) under qemu-user.

In one run of the cached arm64 rootfs (a throwaway overlay over it, host network for PyPI): a venv,
the locked dependencies exactly as install.sh installs them (--require-hashes) but with
--only-binary=:all:, so anything that would have to compile on arm64 fails the run; edgeagent itself;
pytest and hypothesis; then which wheel each distribution came from, `edgeagent check` on a sample
config, and tests/unit. Prints the time of every step; exits non-zero when a step fails.
"""

from __future__ import annotations

import shlex
import sys
import time

from tests.system import box as boxlib

CHECKOUT = "/srv/edgeagent-checkout"

SAMPLE_CONFIG = r"""
import re
from pathlib import Path
from edgeagent.sandbox.ca import ensure_materials
m = ensure_materials(Path("/root/sandbox"))
want = {"mchid": m.mchid, "merchant_serial_no": m.merchant_serial_no,
        "platform_public_key": str(m.platform_public_key_file), "platform_public_key_id": m.platform_public_key_id,
        "base_url": "https://127.0.0.1:8443", "backup_base_url": "", "ca_file": str(m.ca_file)}
text = Path("/root/edgeagent/deploy/edgeagent.toml.example").read_text(encoding="utf-8")
text = text.replace('state_dir = "/var/lib/edgeagent"', 'state_dir = "/root/state"')
for key, value in want.items():
    text = re.sub(rf"^{key} = .*$", f'{key} = "{value}"', text, count=1, flags=re.M)
Path("/root/sample.toml").write_text(text, encoding="utf-8")
"""

WHEELS_USED = r"""
import glob, os
for info in sorted(glob.glob("/root/venv/lib/python3*/site-packages/*.dist-info")):
    tags = [l.split(":", 1)[1].strip() for l in open(os.path.join(info, "WHEEL")) if l.startswith("Tag:")] \
        if os.path.exists(os.path.join(info, "WHEEL")) else ["?"]
    print(f"  {os.path.basename(info)[:-10]:<36} {', '.join(tags)}")
"""


def script() -> str:
    pip = "/root/venv/bin/pip install -q --disable-pip-version-check"
    steps = [
        ("copy the checkout", f"mkdir -p /root/edgeagent && cd {CHECKOUT} && "
         "cp -r pyproject.toml README.md edgeagent tests deploy systemd /root/edgeagent/"),
        ("python3 -m venv", "python3 -m venv /root/venv"),
        ("locked dependencies (wheels only)",
         f"{pip} --only-binary=:all: --require-hashes -r /root/edgeagent/deploy/requirements.lock"),
        ("edgeagent (--no-deps --no-build-isolation)",
         f"{pip} --no-deps --no-build-isolation /root/edgeagent"),
        ("pytest, hypothesis (wheels only)", f"{pip} --only-binary=:all: 'pytest>=8' 'hypothesis>=6'"),
        ("wheels used", f"/root/venv/bin/python -c {shlex.quote(WHEELS_USED)}"),
        ("edgeagent --version", "/root/venv/bin/edgeagent --version"),
        ("sample config + keys", f"/root/venv/bin/python -c {shlex.quote(SAMPLE_CONFIG)}"),
        ("edgeagent check",
         "CREDENTIALS_DIRECTORY=/root/sandbox /root/venv/bin/edgeagent check --config /root/sample.toml"),
        ("pytest tests/unit", "cd /root/edgeagent && /root/venv/bin/python -m pytest tests/unit -q -p no:cacheprovider "
         "-o addopts='-ra --strict-markers' 2>&1 | tail -4; exit ${PIPESTATUS[0]}"),
    ]  # fmt: skip
    lines = ["set -u", 'echo "arm64: $(uname -m), $(python3 --version), $(. /etc/os-release; echo $PRETTY_NAME)"']
    for label, command in steps:
        lines += [
            "s=$(date +%s%N)",
            f"( {command} ); rc=$?",
            "t=$(( ($(date +%s%N) - s) / 100000000 ))",
            f'printf "arm64: [%4d.%d s] %s%s\\n" $((t / 10)) $((t % 10)) {shlex.quote(label)} '
            '"$([ $rc = 0 ] || echo "  FAILED ($rc)")"',
            "[ $rc = 0 ] || exit $rc",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    reason = boxlib.why_not("arm64")
    if reason:
        print(f"make arm64: skipped: {reason}", file=sys.stderr)
        return 2
    start = time.monotonic()
    boxlib.ensure_host_tools("arm64")
    rootfs = boxlib.rootfs("arm64")
    print(f"arm64: rootfs ready after {time.monotonic() - start:.0f} s ({rootfs})", flush=True)
    rc = boxlib.nspawn_run(
        rootfs,
        ["/bin/bash", "-c", script()],
        {boxlib.REPO: CHECKOUT},
        "edgebox-arm64",
        extra=["--volatile=overlay"],
    )
    print(f"arm64: {'passed' if rc == 0 else f'FAILED ({rc})'} in {time.monotonic() - start:.0f} s in all")
    return rc


if __name__ == "__main__":
    sys.exit(main())
