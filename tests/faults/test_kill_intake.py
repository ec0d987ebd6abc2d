"""kill -9 of `edgeagent run` in the middle of a burst (SPEC §1 guarantees 1 and 2, issue 2).

A camera publishes 500 reads at QoS 1 while the agent is SIGKILLed and restarted several times at
seeded random points. Afterwards every read the broker PUBACKed to the camera is in
`edgeagent events --json` exactly once, with one out_serial_number each, nothing is left
unacknowledged on the agent's broker session, and the journal passes `PRAGMA integrity_check`.

Set EDGEAGENT_FAULT_SEED to replay a failing run; the seed is in every assertion message.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.conftest import Agent, Broker, Keys, Publisher, events, eventually, write_config
from tests.integration.test_intake import SOUTH, leftovers_for_session, wait_connected

READS = 500
KILLS = 4
READS_PER_S = 100  # a busy camera burst; slow enough that the kills land while reads are flowing


class Camera(threading.Thread):
    """Publishes the burst at a steady rate, remembering the broker's answer to each read."""

    def __init__(self, publisher: Publisher, payloads: list[bytes]) -> None:
        super().__init__(name="camera", daemon=True)
        self.publisher = publisher
        self.payloads = payloads
        self.infos: list[paho.MQTTMessageInfo] = []
        self.stopped = threading.Event()

    def wait_published(self, count: int, plan: str) -> None:
        target = min(count, len(self.payloads))
        eventually(lambda: len(self.infos) >= target, timeout=60, what=f"{target} reads published ({plan})")

    def run(self) -> None:
        for payload in self.payloads:
            if self.stopped.wait(1 / READS_PER_S):  # the camera's pace, not a synchronisation
                return
            self.infos.append(self.publisher.publish(SOUTH, payload, wait=False))


@pytest.mark.slow
def test_kill_9_during_a_burst_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, broker: Broker, keys: Keys, agent_factory: Callable[[Path], Agent]
) -> None:
    seed = int(os.environ.get("EDGEAGENT_FAULT_SEED", "20250704"))
    rng = random.Random(seed)
    config = write_config(tmp_path / "edgeagent.toml", keys=keys, state_dir=tmp_path / "state", mqtt_port=broker.port)
    agent = agent_factory(config)
    agent.start()
    wait_connected(config, agent)  # the broker queues for our session only after its first connect

    plates = [f"粤B{n:05d}" for n in rng.sample(range(100_000), READS)]
    now = int(time.time())
    payloads = [
        json.dumps({"plate": p, "event_id": f"burst-{i}", "time": now, "confidence": 0.9}, ensure_ascii=False).encode()
        for i, p in enumerate(plates)
    ]
    # One kill in each slice of the burst; after some kills the agent stays down for a few reads.
    slice_len = READS // (KILLS + 1)
    kill_at = [slice_len * (k + 1) + rng.randrange(-slice_len // 3, slice_len // 3) for k in range(KILLS)]
    down_for = [rng.choice([0, 0, rng.randrange(5, 40)]) for _ in range(KILLS)]
    plan = f"seed={seed} kill_at={kill_at} down_for={down_for}"

    publisher = Publisher(broker.port)
    camera = Camera(publisher, payloads)
    camera.start()
    try:
        for at, down in zip(kill_at, down_for, strict=True):
            camera.wait_published(at, plan)
            assert agent.kill(signal.SIGKILL) == -signal.SIGKILL, plan
            camera.wait_published(len(camera.infos) + down, plan)  # reads arriving while the agent is down
            agent.start()
            wait_connected(config, agent, timeout=30)  # the next kill hits a connected agent draining its backlog
        camera.join(timeout=60)
        assert not camera.is_alive(), plan
    finally:
        camera.stopped.set()
        camera.join(timeout=10)

    for info in camera.infos:
        info.wait_for_publish(timeout=10)
    acked = [plates[i] for i, info in enumerate(camera.infos) if info.is_published()]
    assert len(acked) == READS, f"the broker stayed up, so it should have PUBACKed every read ({plan})"

    def all_journaled() -> list[dict[str, object]] | None:
        rows = events(config)
        return rows if {r.get("plate_number") for r in rows} >= set(acked) else None

    rows = eventually(all_journaled, timeout=60, what=f"every PUBACKed read journaled ({plan})")
    assert rows is not None
    entries = Counter(str(r["plate_number"]) for r in rows if r["state"] == "pending")
    twice = sorted(p for p, n in entries.items() if n > 1)
    assert not twice, f"journaled more than once: {twice[:10]} ({plan})"
    assert set(entries) == set(acked), plan
    rejected = [(r["plate_number"], r["reason"]) for r in rows if r["state"] == "rejected"]
    assert rejected == [], f"redeliveries must be absorbed, not kept as repeats: {rejected[:10]} ({plan})"
    assert len({r["out_serial_number"] for r in rows}) == READS, plan

    # Stop cleanly: whatever the agent was handed is acknowledged, so its broker session is empty.
    assert agent.kill(signal.SIGTERM) == 0, plan
    assert leftovers_for_session(broker, publisher) == [], plan
    publisher.close()

    db = sqlite3.connect(f"{(tmp_path / 'state' / 'journal.sqlite3').as_uri()}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", plan
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == READS, plan
    finally:
        db.close()
    log = (tmp_path / "agent0.log").read_text(encoding="utf-8", errors="replace")
    assert log.count("agent_started") == KILLS + 1, plan
    assert "Traceback" not in log, plan
