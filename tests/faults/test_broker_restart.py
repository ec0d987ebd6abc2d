"""Broker restarts (issue 6, item 2): SIGTERM and SIGKILL of Mosquitto while the agent is connected and
while it is down. The agent reconnects by itself with its persistent session and loses nothing the
broker still had; after a broker SIGKILL the broker itself may have lost reads it had PUBACKed but not
yet saved or forwarded (reliability.md §3.2) — those are counted, never doubled, and everything the
agent journaled is delivered."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from edgeagent.sandbox import Sandbox
from tests.conftest import Agent, Broker, Publisher, eventually
from tests.integration.delivery_helpers import gate_config, integrity, journal_rows, status

pytestmark = pytest.mark.slow


def plates(start: int, count: int) -> list[str]:
    return [f"粤C{n:05d}" for n in range(start, start + count)]


def publish_all(port: int, batch: list[str], name: str) -> list[str]:
    """Publish every plate at QoS 1; return the ones the broker PUBACKed."""
    camera = Publisher(port, client_id=name)
    infos = [(p, camera.publish("anpr/south-1/plate", {"plate": p, "event_id": p}, wait=False)) for p in batch]
    acked = []
    for plate, info in infos:
        info.wait_for_publish(timeout=10)
        if info.is_published():
            acked.append(plate)
    camera.close()
    return acked


def delivered(sandbox: Sandbox) -> list[str]:
    return [a["plate_number"] for a in sandbox.accepted()]


def start_agent(tmp_path: Path, broker: Broker, sandbox: Sandbox) -> tuple[Path, Agent]:
    """A gate config for fast drains and no repeat window, and `edgeagent run` started on it."""
    config = gate_config(
        tmp_path / "edgeagent.toml",
        sandbox,
        state_dir=tmp_path / "state",
        mqtt_port=broker.port,
        wechatpay={"max_rate_per_s": 200},
        parking={"repeat_window_s": 0},
    )
    agent = Agent(config, tmp_path / "agent.log")
    agent.start()
    return config, agent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_broker_restart_while_agent_connected(
    tmp_path: Path, broker: Broker, sandbox: Sandbox, sig: signal.Signals
) -> None:
    config, agent = start_agent(tmp_path, broker, sandbox)
    try:
        eventually(lambda: status(config)[1]["mqtt"]["connected"], timeout=20, what="agent connected")
        first = publish_all(broker.port, plates(0, 200), "cam-a")
        broker.restart(sig)
        if sig == signal.SIGKILL:
            # A killed broker may have lost our session (and so our subscriptions) with its memory:
            # reads published before the agent resubscribes have no subscriber to be queued for.
            eventually(
                lambda: "session_present" in agent.log.read_text().split("mqtt_disconnected")[-1],
                timeout=30,
                what="agent reconnected by itself",
            )
        second = publish_all(broker.port, plates(1000, 200), "cam-b")
        assert len(second) == 200
        eventually(lambda: status(config)[1]["mqtt"]["connected"], timeout=30, what="agent reconnected by itself")
        journaled = {r["plate_number"] for r in journal_rows(tmp_path / "state") if r["state"] != "rejected"}
        eventually(lambda: set(second) <= set(delivered(sandbox)), timeout=60, what="reads after the restart")
        if sig == signal.SIGTERM:
            eventually(lambda: set(first) <= set(delivered(sandbox)), timeout=60, what="reads before the restart")
        journaled = {r["plate_number"] for r in journal_rows(tmp_path / "state") if r["state"] != "rejected"}
        eventually(lambda: journaled <= set(delivered(sandbox)), timeout=60, what="everything journaled delivered")
        got = delivered(sandbox)
        assert len(got) == len(set(got)), "a read delivered under two numbers"
        lost = set(first) - set(got)
        print(f"{sig.name}: broker lost {len(lost)} of {len(first)} PUBACKed reads before the restart")
        eventually(lambda: status(config)[1]["state"] == "ok", timeout=30, what="ok again")
    finally:
        agent.kill()
    assert integrity(tmp_path / "state") == "ok"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_broker_restart_while_agent_down(tmp_path: Path, broker: Broker, sandbox: Sandbox, sig: signal.Signals) -> None:
    config, agent = start_agent(tmp_path, broker, sandbox)
    eventually(lambda: status(config)[1]["mqtt"]["connected"], timeout=20, what="agent connected once")
    agent.kill()  # the broker now queues for the agent's persistent session
    queued = publish_all(broker.port, plates(2000, 100), "cam-c")
    # Let the broker's 1 s autosave write the queue out, as a lane broker's short autosave would: wait for
    # a save that started after the last PUBACK (on a loaded machine the interval slips).
    published = time.time()
    db = broker.dir / "mosquitto.db"
    eventually(
        lambda: db.exists() and db.stat().st_mtime > published + 1.0,
        timeout=20,
        what="mosquitto saved its db after the publishes",
    )
    broker.restart(sig)
    agent.start()
    try:
        eventually(
            lambda: set(queued) <= set(delivered(sandbox)),
            timeout=60,
            what="reads queued while the agent was down, across the broker restart",
        )
        got = delivered(sandbox)
        assert len(got) == len(set(got))
    finally:
        agent.kill()
