"""Exits and parking sessions end to end (SPEC §10): a real Mosquitto, `edgeagent run`, the HTTPS sandbox.

Every exit is sent once, after its entry was accepted, under the entry's number, plate and colour; an
exit read that matches no session is kept and shown, never sent under an invented number.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.sandbox import Sandbox
from tests.conftest import Agent, Broker, eventually, run_cli
from tests.integration.delivery_helpers import Gate, status

EXIT_TOPIC = "anpr/exit-1/plate"
TWO_WAY_TOPIC = "anpr/both-1/plate"
LOT = (
    '[[cameras]]\nid = "south-1"\ntopic = "anpr/south-1/plate"\nformat = "generic"\n\n'
    '[[cameras]]\nid = "exit-1"\ntopic = "anpr/exit-1/plate"\nformat = "generic"\n\n'
    '[[cameras]]\nid = "both-1"\ntopic = "anpr/both-1/plate"\nformat = "generic"\n\n'
    '[[entrances]]\nnumber = "A01"\nname = "南门入口"\nsources = ["south-1", "both-1"]\n\n'
    '[[exits]]\nnumber = "X01"\nname = "南门出口"\nsources = ["exit-1", "both-1"]\n\n'
    "[sessions]\nexit_hold_s = 3\n"
)


@pytest.fixture
def gate(tmp_path: Path, broker: Broker, agent_factory: Callable[[Path], Agent]) -> Iterator[Gate]:
    sandbox = Sandbox(tmp_path / "sandbox", port=0).start()
    g = Gate(tmp_path, broker, sandbox, agent_factory)
    yield g
    if g.camera is not None:
        g.camera.close()
    g.sandbox.stop()


def sessions(gate: Gate, *args: str) -> list[dict[str, Any]]:
    result = run_cli("sessions", "--json", *args, "--config", str(gate.config))
    assert result.returncode == 0, result.stderr
    import json  # noqa: PLC0415

    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def exit_requests(gate: Gate) -> list[dict[str, Any]]:
    return [r for r in gate.sandbox.requests() if r["path"] == "/v3/parking/reminders/exit"]


def test_a_car_in_and_out_is_one_session_and_the_exit_goes_out_under_the_entrys_number(gate: Gate) -> None:
    gate.start(cameras=LOT)
    gate.publish(plate="粤B12345", color="blue")
    [entry] = gate.wait_state("sent", 1)
    gate.publish(EXIT_TOPIC, plate="粤B12345", color="blue")

    [exit_] = eventually(gate.sandbox.exits, timeout=20, what="the exit accepted")
    assert exit_["out_serial_number"] == entry["out_serial_number"]
    assert (exit_["plate_number"], exit_["plate_color"]) == ("粤B12345", "PLATE_COLOR_BLUE")
    assert exit_["exit_timestamp"] >= entry["enter_timestamp"]
    [closed] = eventually(lambda: sessions(gate, "--closed"), timeout=10, what="the session closed")
    assert (closed["state"], closed["match"], closed["exit_number"]) == ("closed", "exact", "X01")
    assert closed["out_serial_number"] == entry["out_serial_number"]
    assert len(exit_requests(gate)) == 1


def test_a_misread_at_the_exit_matches_fuzzy_and_is_sent_with_the_entrys_plate(gate: Gate) -> None:
    gate.start(cameras=LOT)
    gate.publish(plate="粤B0D123")
    gate.wait_state("sent", 1)
    gate.publish(EXIT_TOPIC, plate="粤BDD123")  # 0 read as D
    [exit_] = eventually(gate.sandbox.exits, timeout=20, what="the exit accepted")
    assert exit_["plate_number"] == "粤B0D123"
    [closed] = eventually(lambda: sessions(gate, "--closed"), timeout=10, what="the session closed")
    assert (closed["match"], closed["exit_plate_read"]) == ("fuzzy", "粤BDD123")


def test_an_exit_for_a_car_never_seen_is_an_orphan_until_attached(gate: Gate) -> None:
    gate.start(cameras=LOT)
    gate.publish(EXIT_TOPIC, plate="粤C77777")
    [orphan] = eventually(lambda: sessions(gate, "--orphans"), timeout=20, what="an orphan after exit_hold_s")
    assert orphan["state"] == "orphan" and orphan["out_serial_number"] is None
    code, view = gate.wait_status(lambda v: v["sessions"]["orphans"] == 1)
    assert code == 1 and view["state"] == "degraded"
    assert exit_requests(gate) == []  # never sent under an invented number

    gate.publish(plate="粤C77778")  # another car; the technician knows the orphan was its exit
    [entry] = gate.wait_state("sent", 1)
    attached = run_cli("attach", str(orphan["exit_id"]), entry["out_serial_number"], "--config", str(gate.config))
    assert attached.returncode == 0, attached.stderr
    [exit_] = eventually(gate.sandbox.exits, timeout=20, what="the attached exit accepted")
    assert (exit_["out_serial_number"], exit_["plate_number"]) == (entry["out_serial_number"], "粤C77778")
    assert sessions(gate, "--orphans") == []


def test_an_exit_read_before_its_entry_was_journaled_is_matched_within_the_hold(gate: Gate) -> None:
    gate.start(cameras=LOT)
    gate.publish(EXIT_TOPIC, plate="粤D12121")
    gate.publish(plate="粤D12121")  # the entry arrives late (camera clocks, MQTT ordering)
    [exit_] = eventually(gate.sandbox.exits, timeout=20, what="the exit accepted")
    [accepted] = gate.sandbox.accepted()
    assert exit_["out_serial_number"] == accepted["out_serial_number"]


def test_reentry_closes_the_previous_session_first(gate: Gate) -> None:
    gate.start(cameras=LOT)
    now = int(time.time())
    gate.publish(plate="粤E10001", time=now - 200)
    [first] = gate.wait_state("sent", 1)
    gate.publish(plate="粤E10001", time=now - 10)  # in again without a seen exit
    eventually(lambda: len(gate.sandbox.accepted()) == 2, timeout=20, what="the second entry")
    [exit_] = gate.sandbox.exits()
    assert exit_["out_serial_number"] == first["out_serial_number"]
    order = [r["kind"] for r in gate.sandbox.requests() if r["kind"] in ("entry", "exit")]
    assert order == ["entry", "exit", "entry"]  # the inferred exit goes before the new entry
    rows = sessions(gate)
    assert {r["state"] for r in rows} == {"open", "closed"}
    assert [r["match"] for r in rows if r["state"] == "closed"] == ["inferred"]


def test_a_two_way_lane_goes_by_the_reads_direction(gate: Gate) -> None:
    gate.start(cameras=LOT)
    gate.publish(TWO_WAY_TOPIC, plate="粤F20002", direction="in")
    gate.wait_state("sent", 1)
    gate.publish(TWO_WAY_TOPIC, plate="粤F20002", direction="out")
    eventually(gate.sandbox.exits, timeout=20, what="the exit accepted")
    gate.publish(TWO_WAY_TOPIC, plate="粤F20003")  # no direction on a two-way lane: never guessed
    rejected = eventually(lambda: gate.rows("rejected"), timeout=10, what="the read rejected")
    assert rejected[0]["reason"] == "no_direction"


def test_an_exit_during_an_outage_goes_out_after_its_entry(gate: Gate) -> None:
    gate.sandbox.set(fail_status=503)
    gate.start(cameras=LOT)
    gate.publish(plate="粤G30003")
    gate.publish(EXIT_TOPIC, plate="粤G30003")
    eventually(lambda: len(gate.rows("pending")) == 2, timeout=20, what="entry and exit pending")
    gate.sandbox.set(fail_status=0)
    [exit_] = eventually(gate.sandbox.exits, timeout=40, what="the exit accepted after the outage")
    accepted = [r for r in gate.sandbox.requests() if r["status"] in (200, 204)]
    assert [r["kind"] for r in accepted if r["kind"] in ("entry", "exit")] == ["entry", "exit"]
    assert exit_["out_serial_number"] == gate.sandbox.accepted()[0]["out_serial_number"]
    _, view = status(gate.config)
    assert view["sessions"]["open"] == 0
