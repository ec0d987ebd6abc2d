"""kill -9 storm (issue 6, item 1): the agent is killed at random moments of a sustained stream of reads
while it is also draining to the sandbox, and restarted at once, many times over.

Kills land during batch commits, acks, delivery attempts, outcome writes and WAL checkpoints alike.
Reproducible: EDGEAGENT_FAULT_SEED picks the kill times, EDGEAGENT_FAULT_KILLS how many (default 150).
Afterwards: every read the broker PUBACKed to the camera is accepted by the sandbox, each plate under
exactly one out_serial_number, the journal passes integrity_check, and the agent reports `ok`.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.sandbox import Sandbox
from tests.conftest import Agent, Broker, Publisher, eventually
from tests.integration.delivery_helpers import gate_config, integrity, journal_rows, started_sandbox, status

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("EDGEAGENT_FAULT_SEED", "20261127"))
KILLS = int(os.environ.get("EDGEAGENT_FAULT_KILLS", "150"))


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    box = started_sandbox(tmp_path / "sandbox", latency_s=0.02)
    yield box
    box.stop()


class Camera(threading.Thread):
    """Publishes unique reads at a steady rate until stopped; remembers every PUBACKed plate."""

    def __init__(self, port: int, rate: float) -> None:
        super().__init__(name="camera", daemon=True)
        self.publisher = Publisher(port, client_id="storm-camera")
        self.interval = 1.0 / rate
        self.acked: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            plate = f"{'粤苏浙京沪'[n // 90000 % 5]}{'ABCDEFGH'[n // 10000 % 8]}{n % 10000:04d}{n // 10000 % 10}"
            info = self.publisher.publish("anpr/south-1/plate", {"plate": plate, "event_id": f"s{n}"}, wait=False)
            info.wait_for_publish(timeout=10)
            if info.is_published():
                self.acked.append(plate)
            self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=15)
        self.publisher.close()


def test_kill_storm(tmp_path: Path, broker: Broker, sandbox: Sandbox) -> None:
    rng = random.Random(SEED)
    config = gate_config(
        tmp_path / "edgeagent.toml",
        sandbox,
        state_dir=tmp_path / "state",
        mqtt_port=broker.port,
        wechatpay={"max_in_flight": 4, "max_rate_per_s": 200},
        parking={"repeat_window_s": 0},
    )
    agent = Agent(config, tmp_path / "agent.log")
    agent.start()
    eventually(lambda: status(config)[1]["mqtt"]["connected"], timeout=20, what="agent connected")
    camera = Camera(broker.port, rate=40)
    camera.start()
    kills = 0
    try:
        while kills < KILLS:
            # Alive for 50 ms to 1.5 s: sometimes mid-start, mostly mid-batch or mid-drain.
            time.sleep(rng.uniform(0.05, 1.5))
            agent.kill()
            kills += 1
            agent.start()
    finally:
        camera.stop()
    assert len(camera.acked) > 1000, "the stream was too thin to prove anything"

    def all_delivered() -> bool:
        accepted = {a["plate_number"] for a in sandbox.accepted()}
        return set(camera.acked) <= accepted

    eventually(all_delivered, timeout=120, interval=0.5, what="every acknowledged read delivered")
    eventually(lambda: status(config)[1]["state"] == "ok", timeout=60, what="agent back to ok by itself")
    agent.kill()

    accepted = sandbox.accepted()
    plates = [a["plate_number"] for a in accepted]
    doubled = {p for p in plates if plates.count(p) > 1}
    assert not doubled, f"plates accepted under two out_serial_numbers: {sorted(doubled)[:10]}"
    rows = [r for r in journal_rows(tmp_path / "state") if r["state"] != "rejected"]
    assert sorted(r["plate_number"] for r in rows) == sorted(set(plates))
    assert all(r["state"] == "sent" for r in rows)
    by_serial = {a["out_serial_number"]: a["serial_number"] for a in accepted}
    assert all(by_serial[r["out_serial_number"]] == r["serial_number"] for r in rows)
    assert integrity(tmp_path / "state") == "ok"
    print(f"kills={kills} reads_acked={len(camera.acked)} entries={len(rows)} seed={SEED}")
