"""Issue 12: the unit's MemoryDenyWriteExecute=yes does not break the agent.

systemd implements it with a seccomp filter; the kernel (6.3+) has the same rule as
prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), inherited across fork and exec. The agent runs under
it here, end to end: key loading, signing, a TLS round trip to the sandbox with its answer verified,
SQLite, the clock probe. A real systemd boot of the unit is issue 13's test tier.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.sandbox import Sandbox
from tests.conftest import Broker, Publisher, events, eventually, run_cli
from tests.integration.delivery_helpers import gate_config

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
# Turns MDWE on, proves it is on (a W+X mapping is refused), then becomes `edgeagent ARGS`.
WRAPPER = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE): errno {ctypes.get_errno()}")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("MDWE is not enforced: a W+X mapping succeeded")
except PermissionError:
    pass
os.execv(sys.executable, [sys.executable, "-m", "edgeagent", *sys.argv[1:]])
"""


def mdwe_supported() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import ctypes; l = ctypes.CDLL(None); raise SystemExit(l.prctl(65, 1, 0, 0, 0))"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


@pytest.mark.slow
def test_the_agent_delivers_a_read_with_memory_deny_write_execute(
    broker: Broker, sandbox: Sandbox, tmp_path: Path
) -> None:
    if not mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    config = gate_config(tmp_path / "edgeagent.toml", sandbox, state_dir=tmp_path / "state", mqtt_port=broker.port)
    log_path = tmp_path / "agent-mdwe.log"
    with log_path.open("ab") as log:
        agent = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, "run", "--config", str(config)],
            stdout=log,
            stderr=log,
            env={k: v for k, v in os.environ.items() if k != "EDGEAGENT_CLOCK_SYNCED"},  # the real clock probe
        )
    camera = Publisher(broker.port)
    try:
        eventually(
            lambda: (
                json.loads(run_cli("status", "--json", "--config", str(config)).stdout or "{}").get("mqtt") or {}
            ).get("connected"),
            timeout=30,
            what="the agent subscribed",
        )
        camera.publish("anpr/south-1/plate", {"plate": "粤B12345", "event_id": "mdwe-1"})
        sent = eventually(
            lambda: [r for r in events(config, "sent") if r["plate_number"] == "粤B12345"],
            timeout=60,
            what="the read sent and its answer verified",
        )
        assert sent[0]["serial_number"]
        assert agent.poll() is None, log_path.read_text()
    finally:
        camera.close()
        agent.kill()
        agent.wait(timeout=30)


def test_outside_systemd_the_journal_is_private_and_no_core_is_dumped(
    broker: Broker, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Started from a shell with umask 022, the journal used to come out 0644 (issue 12)."""
    config = gate_config(tmp_path / "edgeagent.toml", sandbox, state_dir=tmp_path / "state", mqtt_port=broker.port)
    journal = tmp_path / "state" / "journal.sqlite3"
    old = os.umask(0o022)
    try:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "INVOCATION_ID"},
        )
    finally:
        os.umask(old)
    try:
        eventually(journal.exists, timeout=30, what="the journal")
        limits = Path(f"/proc/{agent.pid}/limits").read_text()
        assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.M), limits
        for path in (journal, *journal.parent.iterdir()):
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path}: {stat.S_IMODE(path.stat().st_mode):o}"
    finally:
        agent.kill()
        agent.wait(timeout=30)
