"""The watchdog is fed by real progress only (issue 5, issue 6 item 7): a hung intake thread or a dead
paho thread stops the WATCHDOG=1 pings, so systemd restarts the agent. Observed through a fake
$NOTIFY_SOCKET; the faults are switched on with EDGEAGENT_FAILPOINTS (edgeagent/failpoints.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Agent, Broker, Keys, Publisher, eventually, write_config
from tests.integration.test_systemd import NotifyListener

pytestmark = pytest.mark.slow

WATCHDOG_USEC = "6000000"  # WatchdogSec=6: pings every second while healthy, stale after 6 s


@pytest.mark.parametrize("failpoint", ["ingest-hang", "paho-crash"])
def test_watchdog_starves_when_intake_dies(tmp_path: Path, broker: Broker, keys: Keys, failpoint: str) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    config = write_config(tmp_path / "edgeagent.toml", keys=keys, state_dir=tmp_path / "state", mqtt_port=broker.port)
    agent = Agent(
        config,
        tmp_path / "agent.log",
        env={
            "NOTIFY_SOCKET": str(listener.path),
            "WATCHDOG_USEC": WATCHDOG_USEC,
            "EDGEAGENT_FAILPOINTS": failpoint,
        },
    )
    agent.start()
    camera = Publisher(broker.port)
    try:
        eventually(lambda: listener.fields().count("WATCHDOG=1") >= 2, timeout=20, what="healthy pings first")
        eventually(lambda: "mqtt_connected" in agent.log.read_text(), timeout=20, what="agent connected")
        # The first read goes through (ingest-hang stops after one batch); the second finds intake dead.
        camera.publish("anpr/south-1/plate", {"plate": "粤B11111"})
        camera.publish("anpr/south-1/plate", {"plate": "粤B22222"})
        time.sleep(0.5)
        count_then = listener.fields().count("WATCHDOG=1")
        eventually(lambda: "watchdog_starved" in agent.log.read_text(), timeout=20, what="starvation logged")
        pings_at_starvation = listener.fields().count("WATCHDOG=1")
        time.sleep(4)  # longer than the 1 s ping interval several times over: no more pings must come
        assert listener.fields().count("WATCHDOG=1") == pings_at_starvation
        assert pings_at_starvation >= count_then
        assert agent.alive(), "the agent itself does not exit: systemd's watchdog restarts it"
    finally:
        camera.close()
        agent.kill()
        listener.close()
