"""Disk safety (issue 5): the journal's filesystem fills up, the agent stops acknowledging, says why,
and recovers by itself when space returns — nothing lost, nothing doubled, no corruption.

The state dir is a size-limited tmpfs (root may mount one here); a ballast file fills it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Agent, Broker, Keys, Publisher, events, eventually, run_cli, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path) -> Path:
    """Fill the filesystem completely with a ballast file."""
    ballast = mount / "ballast"
    with ballast.open("wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return ballast


def status(config: Path) -> dict[str, Any]:
    view: dict[str, Any] = json.loads(run_cli("status", "--json", "--config", str(config)).stdout)
    return view


def test_full_disk_stops_acks_then_recovers(tmp_path: Path, tiny_fs: Path, broker: Broker, keys: Keys) -> None:
    state = tiny_fs / "state"
    config = write_config(tmp_path / "edgeagent.toml", keys=keys, state_dir=state, mqtt_port=broker.port)
    agent = Agent(config, tmp_path / "agent.log")
    agent.start()
    camera = Publisher(broker.port)
    try:
        eventually(lambda: status(config)["mqtt"]["connected"], timeout=20, what="agent connected")
        before = [f"粤B{10000 + i}" for i in range(20)]
        for plate in before:
            camera.publish("anpr/south-1/plate", {"plate": plate})
        eventually(lambda: len(events(config)) == len(before), timeout=20, what="first reads journaled")

        ballast = fill(tiny_fs)
        during = [f"粤B{20000 + i}" for i in range(60)]
        for plate in during:  # PUBACKed by the broker, which now holds them for the agent
            camera.publish("anpr/south-1/plate", {"plate": plate, "event_id": plate, "time": 1795000000})

        view = eventually(
            lambda: (v := status(config))["state"] == "down" and v, timeout=30, what="status down with the cause"
        )
        assert any("journal not writable" in p and "full" in p for p in view["problems"]), view["problems"]
        assert agent.alive(), "the agent must wait for space, not crash"
        assert len(events(config)) < len(before) + len(during)

        ballast.unlink()
        eventually(
            lambda: len(events(config)) == len(before) + len(during),
            timeout=60,
            what="every read journaled once space returned",
        )
        plates = [row["plate_number"] for row in events(config)]
        assert sorted(plates) == sorted(before + during)  # each exactly once
        eventually(
            lambda: "journal not writable" not in " ".join(status(config)["problems"]),
            timeout=30,
            what="status recovered",
        )
        assert agent.alive()
    finally:
        camera.close()
        agent.kill()
    with sqlite3.connect(state / "journal.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
