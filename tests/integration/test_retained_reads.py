"""Issue 12: a retained camera read is a replay, never a second entry.

A camera (or a camera account) that publishes with the retain flag leaves its last read on the broker,
which hands it to the agent again at every SUBSCRIBE, i.e. at every (re)connect. While the first
copy's row is in the journal its unique key absorbed the replay; once the row was pruned (sent rows go
after 30 days) the replay became a new entry with a new out_serial_number, sent to WeChat Pay again.
Real Mosquitto, `edgeagent run`, the HTTPS sandbox, and `Journal.prune` with a far-future time.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.journal import Journal
from edgeagent.localbroker import LocalBroker
from edgeagent.sandbox import Sandbox
from tests.conftest import CAMERAS_DEFAULT, Agent, Publisher, events, eventually, run_cli

TOPIC = "anpr/south-1/plate"
AGENT_ID = "edgeagent-retained"
FAR_FUTURE = 10 * 365 * 86400.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """The conftest broker, logging every packet: its PUBACKs tell when the agent has handled a replay."""
    made = LocalBroker(tmp_path / "broker")
    with made.conf.open("a") as conf:
        conf.write("log_type all\n")
    made.start()
    yield made
    made.stop(signal.SIGKILL)


def replays_acked(broker: LocalBroker) -> int:
    """Retained copies the broker sent the agent (flag r1) that the agent acknowledged.

    The agent acknowledges a read only once it is journaled (or, since this fix, dropped): a PUBACK
    says the replay went all the way through, whatever the agent made of it.
    """
    sent: set[str] = set()
    acked = 0
    for line in (broker.dir / "mosquitto.log").read_text(errors="replace").splitlines():
        if m := re.search(rf"Sending PUBLISH to {AGENT_ID} \(d\d, q1, r1, m(\d+),", line):
            sent.add(m.group(1))
        elif (m := re.search(rf"Received PUBACK from {AGENT_ID} \(Mid: (\d+),", line)) and m.group(1) in sent:
            sent.discard(m.group(1))
            acked += 1
    return acked


@pytest.fixture
def gate(broker: LocalBroker, sandbox: Sandbox, tmp_path: Path) -> Iterator[tuple[Path, Agent, Publisher]]:
    fragment = sandbox.materials.config_file.read_text(encoding="utf-8")
    config = tmp_path / "edgeagent.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\nserial_prefix = "RET1"\n\n{fragment}\n'
        f'[parking]\nparking_id = "{sandbox.materials.parking_id}"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nclient_id = "{AGENT_ID}"\n\n{CAMERAS_DEFAULT}',
        encoding="utf-8",
    )
    agent = Agent(config, tmp_path / "agent.log")
    camera = Publisher(broker.port, client_id="retaining-camera")
    try:
        yield config, agent, camera
    finally:
        camera.close()
        agent.kill(signal.SIGTERM)


def connected(config: Path, agent: Agent) -> None:
    def check() -> bool:
        view = json.loads(run_cli("status", "--json", "--config", str(config)).stdout or "{}")
        pid = agent.proc.pid if agent.proc else None
        return bool((view.get("daemon") or {}).get("pid") == pid and (view.get("mqtt") or {}).get("connected"))

    eventually(check, timeout=30, what="agent connected")


def publish_retained(camera: Publisher, plate: str, event_id: str) -> None:
    payload = json.dumps({"plate": plate, "event_id": event_id}, ensure_ascii=False).encode()
    camera.client.publish(TOPIC, payload, qos=1, retain=True).wait_for_publish(timeout=10)


def entries(config: Path, plate: str) -> list[dict[str, Any]]:
    return [row for row in events(config) if row["plate_number"] == plate and row["state"] != "rejected"]


def prune_everything(config: Path) -> int:
    """What 30 days of housekeeping would do to the sent rows, now."""
    journal = Journal(config.parent / "state" / "journal.sqlite3")
    try:
        return journal.prune(time.time() + FAR_FUTURE)
    finally:
        journal.close()


def restart(config: Path, agent: Agent, broker: LocalBroker) -> None:
    """Stop, start, and wait until the agent acknowledged the broker's replay of the retained read."""
    agent.kill(signal.SIGTERM)
    before = replays_acked(broker)
    agent.start()
    connected(config, agent)
    eventually(lambda: replays_acked(broker) > before, timeout=20, what="the agent acknowledging the replay")


@pytest.mark.slow
def test_a_retained_read_is_one_entry_across_restarts_and_pruning(
    gate: tuple[Path, Agent, Publisher], sandbox: Sandbox, broker: LocalBroker
) -> None:
    config, agent, camera = gate
    agent.start()
    connected(config, agent)

    # Live: the broker forwards it with the retain flag off (MQTT 3.1.1 §3.3.1.3): an ordinary read.
    publish_retained(camera, "粤B10001", "live-1")
    row = eventually(lambda: [r for r in entries(config, "粤B10001") if r["state"] == "sent"], what="live read sent")
    number = row[0]["out_serial_number"]
    for _ in range(2):
        restart(config, agent, broker)
        assert [r["out_serial_number"] for r in entries(config, "粤B10001")] == [number]

    # Thirty days later the sent row is pruned; the broker still holds the retained read and replays
    # it at every (re)subscribe. Before this fix each replay after the prune was a new entry, with a
    # new out_serial_number, sent to WeChat Pay as a second car.
    agent.kill(signal.SIGTERM)
    assert prune_everything(config) >= 1
    assert entries(config, "粤B10001") == []
    for _ in range(3):
        restart(config, agent, broker)
        assert entries(config, "粤B10001") == []
    assert [b["out_serial_number"] for b in sandbox.accepted() if b["plate_number"] == "粤B10001"] == [number]

    # Nothing lost either: a retained read published while the agent is away waits in its session's
    # queue and arrives with the flag off, once; the replay at its SUBSCRIBE is the one dropped.
    agent.kill(signal.SIGTERM)
    publish_retained(camera, "粤B10002", "away-1")
    agent.start()
    connected(config, agent)
    eventually(lambda: entries(config, "粤B10002"), what="the read queued while the agent was away")
    restart(config, agent, broker)
    assert len(entries(config, "粤B10002")) == 1

    # One line per replay, naming the topic and what to change on the camera.
    log = agent.log.read_text(encoding="utf-8", errors="replace")
    assert log.count("mqtt_retained_dropped") == replays_acked(broker)
    assert f"mqtt_retained_dropped topic={TOPIC!r}" in log
    assert "switch retain off" in log
