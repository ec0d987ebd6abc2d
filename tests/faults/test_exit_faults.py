"""kill -9 across entries and exits (issue 10): the agent as a subprocess, killed and restarted at once.

1. Killed between the entry's answer and its exit: both are sent once, the exit after the entry.
2. A seeded storm: a stream of cars entering and leaving (some exits read before their entry, some
   reads published twice, some exits for cars that never entered) while the agent is SIGKILLed at
   random moments; then it drains. The outside check (tests/integration/lot_check.py) judges the result
   from the sandbox's logs alone; the journal passes integrity_check and keeps the never-entered reads
   as orphans. EDGEAGENT_FAULT_SEED replays a run, EDGEAGENT_EXIT_STORM_KILLS sets the kills (default 60).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeagent.sandbox import Sandbox
from tests.conftest import Agent, Broker, Publisher, eventually
from tests.integration.delivery_helpers import gate_config, integrity, journal_rows, started_sandbox, status
from tests.integration.lot_check import ENTRY_PATH, outside_check, progress
from tests.integration.test_exits import EXIT_TOPIC, LOT

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("EDGEAGENT_FAULT_SEED", "20261202"))
KILLS = int(os.environ.get("EDGEAGENT_EXIT_STORM_KILLS", "60"))
SOUTH = "anpr/south-1/plate"
STORM_LOT = LOT.replace("exit_hold_s = 3", "exit_hold_s = 30")  # the agent may be down while an entry waits


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    box = started_sandbox(tmp_path / "sandbox", latency_s=0.02)
    yield box
    box.stop()


def start(agent: Agent, config: Path) -> None:
    agent.start()
    pid = agent.proc.pid if agent.proc else None
    eventually(
        lambda: (v := status(config)[1])["mqtt"]["connected"] and v["daemon"]["pid"] == pid,
        timeout=30,
        what="agent connected",
    )


def read(plate: str, event_id: str, when: int) -> dict[str, Any]:
    return {"plate": plate, "event_id": event_id, "time": when}


def test_kill_between_the_entrys_answer_and_its_exit_sends_both_once(
    tmp_path: Path, broker: Broker, sandbox: Sandbox, agent_factory: Callable[[Path], Agent]
) -> None:
    """The exit read is journaled while its entry is on the wire; the agent dies as the entry's 200 goes
    out (before or just after it is journaled as sent, before the exit is sent). Several cars, the kill
    a little later each time, so both sides of the entry's `mark sent` are hit."""
    config = gate_config(tmp_path / "edgeagent.toml", sandbox, state_dir=tmp_path / "state", mqtt_port=broker.port,
                         cameras=STORM_LOT)  # fmt: skip
    agent = agent_factory(config)
    start(agent, config)
    camera = Publisher(broker.port)
    sandbox.set(latency_s=0.5)  # the entry stays on the wire while its exit read is journaled
    plates = [f"粤N{n:05d}" for n in (10, 20, 30, 40, 50, 60)]
    try:
        for n, (plate, delay) in enumerate(zip(plates, (0.0, 0.0, 0.005, 0.01, 0.02, 0.05), strict=True)):
            now = int(time.time())
            camera.publish(SOUTH, read(plate, f"in{n}", now - 60))
            camera.publish(EXIT_TOPIC, read(plate, f"out{n}", now))

            def answered(p: str = plate) -> bool:
                serials = {e["out_serial_number"] for e in sandbox.accepted() if e["plate_number"] == p}
                return any(r["path"] == ENTRY_PATH and r["status"] == 200 and r["out_serial_number"] in serials
                           for r in sandbox.requests())  # fmt: skip

            eventually(answered, timeout=30, interval=0.001, what=f"the entry of {plate} answered")
            time.sleep(delay)  # spacing the kill after the answer, not a synchronisation
            agent.kill()
            start(agent, config)
        sandbox.set(latency_s=0.0)
        eventually(lambda: len(sandbox.exits()) == len(plates), timeout=60, what="every exit accepted")
    finally:
        camera.close()
    report = outside_check(sandbox, entered=plates, left=plates)
    assert (report.entries, report.exits) == (len(plates), len(plates))

    def journaled() -> list[dict[str, Any]] | None:
        rows = [r for r in journal_rows(tmp_path / "state") if r["kind"] in ("entry", "exit")]
        return rows if {r["state"] for r in rows} == {"sent"} else None

    rows = eventually(journaled, timeout=20, what="entries and exits journaled as sent")
    assert len(rows) == 2 * len(plates)
    assert integrity(tmp_path / "state") == "ok"
    print(f"entry_resends={report.entry_resends} exit_resends={report.exit_resends}")


# -- the storm --------------------------------------------------------------------------------------


@dataclass(order=True)
class Publication:
    at: float  # seconds after the stream starts
    topic: str = field(compare=False)
    plate: str = field(compare=False)
    payload: dict[str, Any] = field(compare=False)


def plate_of(n: int) -> str:
    """粤A + five base-9 digits without 7: no two plates of the stream are one confusable character apart
    (1/7 is the only digit pair cameras confuse), so every exit read has exactly one session to match."""
    digits = "012345689"
    text = ""
    for _ in range(5):
        n, d = divmod(n, 9)
        text = digits[d] + text
    return f"粤A{text}"


def stream(rng: random.Random, base: int, cars: int, rate: float) -> tuple[list[Publication], list[str], list[str]]:
    """Entries at `rate` per second; most cars leave 1-8 s later; 10% read leaving before their entry
    arrives (camera clocks, MQTT order); 10% stay; 5% of reads published twice; 5% never-entered exits."""
    plan: list[Publication] = []
    leaving: list[str] = []
    strangers: list[str] = []
    for n in range(cars):
        plate, arrive = plate_of(n), n / rate
        entry = read(plate, f"in{n}", base + int(arrive))
        fate = rng.random()
        entry_at = arrive + (0.5 if fate < 0.1 else 0.0)
        plan.append(Publication(entry_at, SOUTH, plate, entry))
        if fate < 0.9:
            stay = rng.uniform(2, 8)
            exit_read = read(plate, f"out{n}", base + int(arrive + stay))
            plan.append(Publication(arrive if fate < 0.1 else arrive + stay, EXIT_TOPIC, plate, exit_read))
            leaving.append(plate)
        if rng.random() < 0.05:
            strangers.append(stranger := f"琼Z{n:05d}")  # two characters from every car of the stream
            plan.append(Publication(arrive + 1, EXIT_TOPIC, stranger, read(stranger, f"x{n}", base + int(arrive))))
    plan += [Publication(p.at + 0.2, p.topic, p.plate, p.payload) for p in plan if rng.random() < 0.05]
    return sorted(plan), leaving, strangers


class Cameras(threading.Thread):
    """Publishes the plan on time; remembers which plates the broker PUBACKed, per topic."""

    def __init__(self, port: int, plan: list[Publication]) -> None:
        super().__init__(name="cameras", daemon=True)
        self.publisher = Publisher(port, client_id="exit-storm-cameras")
        self.plan = plan
        self.acked: dict[str, set[str]] = {SOUTH: set(), EXIT_TOPIC: set()}
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        for item in self.plan:
            wait = start + item.at - time.monotonic()
            if wait > 0 and self.done.wait(wait):  # the cameras' pace, not a synchronisation
                return
            info = self.publisher.publish(item.topic, item.payload, wait=False)
            info.wait_for_publish(timeout=10)
            if info.is_published():
                self.acked[item.topic].add(item.plate)
        self.done.set()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=15)
        self.publisher.close()


def test_kill_storm_across_entries_and_exits(tmp_path: Path, broker: Broker, sandbox: Sandbox) -> None:
    rng = random.Random(SEED)
    config = gate_config(
        tmp_path / "edgeagent.toml",
        sandbox,
        state_dir=tmp_path / "state",
        mqtt_port=broker.port,
        wechatpay={"max_in_flight": 4, "max_rate_per_s": 200},
        cameras=STORM_LOT,
    )
    agent = Agent(config, tmp_path / "agent.log")
    start(agent, config)
    plan, leaving, strangers = stream(rng, int(time.time()), cars=int(os.environ.get("EDGEAGENT_EXIT_STORM_CARS",
                                                                                      "600")), rate=10)  # fmt: skip
    cameras = Cameras(broker.port, plan)
    began = time.monotonic()
    cameras.start()
    kills = 0
    try:
        while kills < KILLS and not cameras.done.is_set():
            time.sleep(rng.uniform(0.1, 2.0))  # alive 0.1-2 s: mid-start, mid-batch, mid-drain, mid-rematch
            agent.kill()
            kills += 1
            agent.start()
        eventually(cameras.done.is_set, timeout=300, interval=0.5, what="the stream published")
    finally:
        cameras.stop()
    storm_s = time.monotonic() - began
    entered = sorted(cameras.acked[SOUTH])
    left = sorted(p for p in leaving if p in cameras.acked[EXIT_TOPIC] and p in cameras.acked[SOUTH])
    never = sorted(p for p in strangers if p in cameras.acked[EXIT_TOPIC])
    assert len(entered) > 300 and len(left) > 200 and never, "the stream was too thin to prove anything"

    def drained() -> bool:
        now = progress(sandbox, entered, left)
        return bool(now["entries_missing"] == 0 and now["exits_missing"] == 0)

    try:
        eventually(drained, timeout=180, interval=0.5, what=f"drained: {progress(sandbox, entered, left)}")
        eventually(lambda: status(config)[1]["sessions"]["orphans"] == len(never), timeout=60,
                   what="the never-entered exit reads orphaned")  # fmt: skip
    finally:
        agent.kill()
    report = outside_check(sandbox, entered=entered, left=left, never_entered=never)
    rows = journal_rows(tmp_path / "state")
    orphans = sorted(r["plate_number"] for r in rows if r["kind"] == "exit" and r["state"] == "orphan")
    assert orphans == never, "an exit read was lost, matched wrongly or orphaned wrongly"
    requests = [r for r in rows if r["kind"] in ("entry", "exit") and r["state"] not in ("orphan", "held")]
    assert {r["state"] for r in requests} == {"sent"}
    assert len(requests) == len(entered) + len(left)
    assert integrity(tmp_path / "state") == "ok"
    print(
        f"kills={kills} storm_s={storm_s:.0f} reads={len(plan)} entries={report.entries} exits={report.exits} "
        f"never_entered={len(never)} entry_resends={report.entry_resends} exit_resends={report.exit_resends} "
        f"seed={SEED}"
    )
