"""Intake end to end: a real Mosquitto, `edgeagent run` as a subprocess, a real journal file.

What a lane technician would see: reads become entries, bad input becomes `rejected` rows with a
reason, every message is acknowledged and the agent keeps running, nothing published while it is
down is lost, and `status --json` tells the truth (SPEC §2, §4, §6, §7).
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import Agent, Broker, Keys, Publisher, events, eventually, run_cli, write_config

SOUTH, NORTH = "anpr/south-1/plate", "anpr/north-1/plate"
CLIENT_ID = "edgeagent-test"


def status(config: Path) -> tuple[int, dict[str, Any]]:
    result = run_cli("status", "--json", "--config", str(config))
    assert result.stdout, result.stderr
    view: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, view


def wait_connected(config: Path, agent: Agent, timeout: float = 20) -> dict[str, Any]:
    """Until this agent process (not a stale heartbeat of an earlier one) reports MQTT connected."""

    def check() -> dict[str, Any] | None:
        view = status(config)[1]
        pid = agent.proc.pid if agent.proc else None
        ok = view["daemon"]["running"] and view["daemon"]["pid"] == pid and view["mqtt"]["connected"]
        return view if ok else None

    found = eventually(check, timeout=timeout, what="agent connected to the broker")
    assert found is not None
    return found


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def encode(read: dict[str, Any]) -> bytes:
    return json.dumps(read, ensure_ascii=False).encode()


@dataclass
class Lane:
    """One gate: broker, config, a running agent, and a camera stand-in."""

    broker: Broker
    config: Path
    agent: Agent
    camera: Publisher

    def rows(self, state: str | None = None) -> list[dict[str, Any]]:
        return events(self.config, state)

    def wait_for(self, payload: bytes, what: str = "") -> dict[str, Any]:
        """Until the row for this exact payload is journaled (by digest); ingest keeps arrival order,
        so everything published before it on the same topic has been handled too."""

        def find() -> dict[str, Any] | None:
            return next((r for r in self.rows() if r["payload_sha256"] == digest(payload)), None)

        row = eventually(find, timeout=20, what=what or f"row for {payload[:60]!r}")
        assert row is not None
        return row

    def read(self, read: dict[str, Any], topic: str = SOUTH) -> dict[str, Any]:
        """Publish one read and return its journal row."""
        payload = encode(read)
        self.camera.publish(topic, payload)
        return self.wait_for(payload)


@pytest.fixture
def lane(tmp_path: Path, broker: Broker, keys: Keys, agent_factory: Callable[[Path], Agent]) -> Iterator[Lane]:
    config = write_config(tmp_path / "edgeagent.toml", keys=keys, state_dir=tmp_path / "state", mqtt_port=broker.port)
    agent = agent_factory(config)
    agent.start()
    # Mosquitto queues for our persistent session only once it exists: wait for the first connect.
    wait_connected(config, agent)
    camera = Publisher(broker.port)
    yield Lane(broker, config, agent, camera)
    camera.close()


def leftovers_for_session(broker: Broker, camera: Publisher) -> list[tuple[str, bytes, bool]]:
    """Connect as the agent's session and list what the broker still holds unacknowledged.

    A marker published after connecting arrives after any redelivery, so when it is in, the list is
    complete; anything before it is a message the agent never acknowledged.
    """
    got: list[tuple[str, bytes, bool]] = []
    probe = paho.Client(CallbackAPIVersion.VERSION2, client_id=CLIENT_ID, clean_session=False, manual_ack=True)
    probe.on_message = lambda client, userdata, msg: got.append((msg.topic, bytes(msg.payload), bool(msg.dup)))
    probe.connect("127.0.0.1", broker.port)
    probe.loop_start()
    try:
        eventually(probe.is_connected, what="probe connected")
        marker = encode({"plate": "粤Z99999", "event_id": f"marker-{time.time()}"})
        camera.publish(SOUTH, marker)
        eventually(lambda: any(payload == marker for _, payload, _ in got), what="marker delivered to the probe")
        return [item for item in got if item[1] != marker]
    finally:
        probe.disconnect()
        probe.loop_stop()


# -- reads become entries ------------------------------------------------------------------------------


def test_a_read_becomes_a_pending_entry(lane: Lane) -> None:
    now = int(time.time())
    read = {"plate": "粤B12345", "color": "blue", "time": now - 5, "lane": 3, "vehicle_type": "small",
            "confidence": 0.97, "event_id": "c7f1e2"}  # fmt: skip
    row = lane.read(read)
    assert row["state"] == "pending"
    assert (row["camera"], row["lane"], row["plate_number"]) == ("south-1", "3", "粤B12345")
    assert (row["plate_color"], row["vehicle_type"]) == ("PLATE_COLOR_BLUE", "VEHICLE_TYPE_SMALL")
    assert (row["entrance_number"], row["enter_timestamp"]) == ("A01", now - 5)
    assert row["serial_number"] is None
    serial = row["out_serial_number"]
    assert serial.startswith("T1") and serial.isalnum() and len(serial) <= 32
    assert row["received_at"].endswith("Z")

    north = lane.read({"plate": "京AD92035", "lane": 1}, NORTH)
    assert (north["entrance_number"], north["plate_color"]) == ("B01", "PLATE_COLOR_GREEN")  # new-energy plate
    assert north["out_serial_number"] != serial


def test_time_in_milliseconds_is_accepted_as_seconds(lane: Lane) -> None:
    millis = int(time.time() * 1000) - 7_250
    row = lane.read({"plate": "粤B54321", "time": millis})
    assert row["state"] == "pending"
    assert row["enter_timestamp"] == millis // 1000


def test_a_camera_clock_an_hour_ahead_never_loses_the_car(lane: Lane) -> None:
    # SPEC §5: with timestamp_source "auto" and a synchronised agent clock, the agent's time is used.
    before = int(time.time())
    row = lane.read({"plate": "粤B67890", "time": before + 3600})
    assert row["state"] == "pending"
    assert row["time_source"] == "agent"
    assert before - 2 <= row["enter_timestamp"] <= int(time.time()) + 2


def test_the_same_message_twice_is_one_entry(lane: Lane) -> None:
    now = int(time.time())
    with_id = encode({"plate": "粤B11111", "event_id": "dup-1", "time": now})
    with_time = encode({"plate": "粤B22222", "time": now})
    bare = encode({"plate": "粤B33333"})
    for payload in (with_id, with_time, bare):
        lane.camera.publish(SOUTH, payload)
        lane.camera.publish(SOUTH, payload)
    lane.read({"plate": "粤B44444", "event_id": "after"})
    rows = lane.rows()
    for payload in (with_id, with_time, bare):
        mine = [r for r in rows if r["payload_sha256"] == digest(payload)]
        assert [r["state"] for r in mine] == ["pending"], mine  # one entry, and no "repeat" row either
    assert len({r["out_serial_number"] for r in rows}) == len(rows) == 4


def test_a_broker_redelivery_of_a_journaled_read_is_one_entry(lane: Lane) -> None:
    """The crash-between-commit-and-ack case, made deterministic: the journal is busy while the read
    arrives, the broker restarts, then the commit goes through on the old connection, where it can no
    longer be acknowledged; the broker redelivers it (QoS 1 dup) and the journal must absorb it."""
    payload = encode({"plate": "粤B77777", "event_id": "redelivered", "time": int(time.time())})
    blocker = sqlite3.connect(lane.config.parent / "state" / "journal.sqlite3", isolation_level=None, timeout=10)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # e.g. a slow disk: the agent cannot commit for now
        lane.camera.publish(SOUTH, payload)
        eventually(lambda: "journal_write_failed" in lane.agent.log.read_text(), timeout=20, what="commit refused")
        lane.camera.close()
        lane.broker.restart()  # SIGTERM: Mosquitto keeps the unacknowledged read for our session
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_connected(lane.config, lane.agent, timeout=40)
    lane.camera = Publisher(lane.broker.port, client_id="camera-sim-2")
    lane.read({"plate": "粤B88888", "event_id": "after"})

    mine = [r for r in lane.rows() if r["payload_sha256"] == digest(payload)]
    assert [r["state"] for r in mine] == ["pending"]

    def duplicates_absorbed() -> int:
        # The redelivery did happen and was absorbed: the daemon's own counter, from its heartbeat file.
        heartbeat = json.loads((lane.config.parent / "state" / "daemon.json").read_text())
        return int(heartbeat["intake"]["duplicates"])

    eventually(duplicates_absorbed, timeout=15, what="the redelivered read counted as a duplicate")
    assert lane.agent.kill(signal.SIGTERM) == 0
    assert leftovers_for_session(lane.broker, lane.camera) == []


def test_a_repeated_read_is_one_entry(lane: Lane) -> None:
    now = int(time.time())
    first = lane.read({"plate": "粤B12345", "event_id": "r1", "time": now - 20})
    second = lane.read({"plate": "粤B·12345", "event_id": "r2", "time": now - 10})  # the camera read it again
    assert first["state"] == "pending"
    assert (second["state"], second["reason"]) == ("rejected", "repeat")
    assert f"#{first['id']}" in second["detail"]
    assert [r["id"] for r in lane.rows("pending")] == [first["id"]]


# -- bad input -----------------------------------------------------------------------------------------

BAD_INPUT: list[tuple[str, str, bytes | Callable[[], bytes], str, str]] = [
    # (case, topic, payload, reason, words in the detail)
    ("malformed-json", SOUTH, b'{"plate": "\xe7\xb2\xa4B12345", ', "malformed_payload", "invalid JSON"),
    ("json-array", SOUTH, b'[{"plate": "\xe7\xb2\xa4B12345"}]', "malformed_payload", "got array"),
    ("not-utf8", SOUTH, b'{"plate": "\xd4\xc1B12345"}', "not_utf8", "not UTF-8"),  # GBK bytes
    (
        "three-megabytes",
        SOUTH,
        b'{"plate": "x", "image": "' + b"A" * (3 * 1024 * 1024) + b'"}',
        "payload_too_large",
        "max_payload_bytes",
    ),
    ("sql-in-plate", SOUTH, encode({"plate": "ABC'; DROP TABLE x;--"}), "invalid_plate", "not a mainland plate"),
    ("missing-plate", SOUTH, encode({"color": "blue", "lane": 1}), "bad_field", "plate: missing"),
    ("unknown-lane", NORTH, encode({"plate": "粤B12345", "lane": 2}), "unmapped_lane", "lane '2'"),
    ("no-plate", SOUTH, encode({"plate": "无牌"}), "no_plate", "no plate"),
]


def test_bad_input_is_rejected_acknowledged_and_survived(lane: Lane) -> None:
    sent: dict[str, tuple[bytes, str, str]] = {}
    for case, topic, payload_or_maker, reason, words in BAD_INPUT:
        payload = payload_or_maker() if callable(payload_or_maker) else payload_or_maker
        info = lane.camera.publish(topic, payload)
        assert info.is_published(), case
        sent[case] = (payload, reason, words)
    after = lane.read({"plate": "粤B00001", "event_id": "after-bad-input"})
    assert after["state"] == "pending"  # the agent is still taking reads
    assert lane.agent.alive()

    rejected = {row["payload_sha256"]: row for row in lane.rows("rejected")}
    for case, (payload, reason, words) in sent.items():
        row = rejected.get(digest(payload))
        assert row is not None, f"{case}: no rejected row"
        assert row["reason"] == reason, case
        assert words in row["detail"], (case, row["detail"])
        assert row["payload_size"] == len(payload)
    assert len(rejected) == len(BAD_INPUT)
    assert [r["id"] for r in lane.rows("pending")] == [after["id"]]

    code, view = status(lane.config)
    assert code in (0, 1), view["problems"]
    assert view["queue"]["rejected"] == len(BAD_INPUT)
    assert view["daemon"]["running"] and view["mqtt"]["connected"]
    assert view["state"] != "down", view["problems"]  # bad camera input is not an agent failure

    # Every message was acknowledged: after the agent stops, the broker holds nothing for its session.
    assert lane.agent.kill(signal.SIGTERM) == 0
    assert leftovers_for_session(lane.broker, lane.camera) == []


def test_events_lists_rejected_reads_for_a_technician(lane: Lane) -> None:
    lane.read({"plate": "粤B12345", "lane": 9}, NORTH)
    result = run_cli("events", "--config", str(lane.config), "--state", "rejected")
    assert result.returncode == 0
    [line] = result.stdout.splitlines()
    assert "rejected" in line and "north-1:9" in line
    assert "unmapped_lane: camera 'north-1' lane '9' maps to no [[entrances]]" in line


# -- the agent or the broker is down ---------------------------------------------------------------------


def test_reads_published_while_the_agent_is_down_arrive_when_it_is_back(lane: Lane) -> None:
    lane.read({"plate": "粤B00001", "event_id": "before"})
    assert lane.agent.kill(signal.SIGTERM) == 0
    payloads = [encode({"plate": f"粤B1000{i}", "event_id": f"down-{i}"}) for i in range(5)]
    for payload in payloads:
        assert lane.camera.publish(SOUTH, payload).is_published()  # the broker has it, the agent does not
    assert len(lane.rows()) == 1

    lane.agent.start()
    for payload in payloads:
        assert lane.wait_for(payload)["state"] == "pending"
    assert len(lane.rows("pending")) == 6


def test_a_killed_agent_loses_nothing_it_was_given(lane: Lane) -> None:
    lane.read({"plate": "粤B00001", "event_id": "first"})
    assert lane.agent.kill(signal.SIGKILL) == -signal.SIGKILL
    payloads = [encode({"plate": f"粤B2000{i}", "event_id": f"k-{i}"}) for i in range(3)]
    for payload in payloads:
        lane.camera.publish(SOUTH, payload)
    lane.agent.start()
    wait_connected(lane.config, lane.agent)
    for payload in payloads:
        lane.wait_for(payload)
    assert len(lane.rows("pending")) == 4


def test_broker_restart_while_running_reconnects_and_keeps_reading(lane: Lane) -> None:
    lane.read({"plate": "粤B00001", "event_id": "before-restart"})
    lane.camera.close()
    lane.broker.restart()
    wait_connected(lane.config, lane.agent, timeout=40)
    lane.camera = Publisher(lane.broker.port, client_id="camera-sim-2")
    row = lane.read({"plate": "粤B00002", "event_id": "after-restart"})
    assert row["state"] == "pending"
    assert lane.agent.alive()


# -- status -----------------------------------------------------------------------------------------------


def test_status_reports_connected_counts_and_cameras(lane: Lane) -> None:
    entry = lane.read({"plate": "粤B12345", "event_id": "s1"})
    rejected = lane.read({"plate": "粤B12346", "lane": 5}, NORTH)

    def settled() -> tuple[int, dict[str, Any]] | None:
        code, view = status(lane.config)
        return (code, view) if view["mqtt"]["last_message_at"] is not None else None

    found = eventually(settled, what="heartbeat with the last message time")
    assert found is not None
    code, view = found
    assert code == 0
    assert view["state"] == "ok"
    assert view["problems"] == []
    assert isinstance(view["version"], str) and view["version"]
    assert view["daemon"]["running"] is True
    assert lane.agent.proc is not None and view["daemon"]["pid"] == lane.agent.proc.pid
    assert view["daemon"]["since"].endswith("Z")
    assert view["mqtt"]["connected"] is True
    assert set(view["uplink"]) >= {"last_success_at", "last_error", "base_url_in_use"}
    assert view["clock"]["synchronized"] is True  # EDGEAGENT_CLOCK_SYNCED=1 in the tests
    assert "offset_s" in view["clock"]
    queue = view["queue"]
    assert (queue["pending"], queue["dead"], queue["rejected"], queue["sent_24h"]) == (1, 0, 1, 0)
    assert isinstance(queue["oldest_pending_age_s"], int | float)
    cameras = {c["id"]: c for c in view["cameras"]}
    assert list(cameras) == ["south-1", "north-1"]
    assert cameras["south-1"]["last_read_at"] == entry["received_at"]
    assert cameras["north-1"]["last_read_at"] == rejected["received_at"]  # a rejected read is still a read
    assert cameras["south-1"]["reads_24h"] == cameras["north-1"]["reads_24h"] == 1

    text = run_cli("status", "--config", str(lane.config))
    assert text.returncode == 0
    assert text.stdout.startswith("edgeagent ") and ": OK" in text.stdout.splitlines()[0]
    assert "south-1" in text.stdout and "1 pending" in text.stdout


def test_status_after_the_agent_stops_says_down(lane: Lane) -> None:
    lane.read({"plate": "粤B12345", "event_id": "s1"})
    assert lane.agent.kill(signal.SIGKILL) == -signal.SIGKILL  # leaves its last heartbeat behind
    code, view = status(lane.config)
    assert code == 2
    assert view["state"] == "down"
    assert view["daemon"] == {"running": False, "pid": None, "since": None}
    assert view["mqtt"]["connected"] is False  # not the dead process's last word
    assert "daemon not running" in view["problems"][0]
    assert view["queue"]["pending"] == 1  # the journal is still readable
    text = run_cli("status", "--config", str(lane.config))
    assert text.returncode == 2
    assert "NOT RUNNING" in text.stdout


def test_status_and_events_before_the_first_run(tmp_path: Path, keys: Keys) -> None:
    config = write_config(tmp_path / "edgeagent.toml", keys=keys, state_dir=tmp_path / "state", mqtt_port=1)
    code, view = status(config)
    assert code == 2
    assert view["state"] == "down"
    assert view["daemon"]["running"] is False
    assert view["problems"][0].startswith("daemon not running")
    assert [c["id"] for c in view["cameras"]] == ["south-1", "north-1"]

    result = run_cli("events", "--config", str(config))
    assert result.returncode == 2
    assert "no journal yet" in result.stderr and "edgeagent run" in result.stderr
    as_json = run_cli("events", "--config", str(config), "--json")
    assert as_json.returncode == 2
    assert json.loads(as_json.stdout) == []
    assert not (tmp_path / "state").exists()  # reading never creates the journal
