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
from tests.conftest import Agent, Broker, events, eventually, run_cli
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


def test_two_sessions_that_both_fit_a_fuzzy_read_are_no_guess_the_orphan_lists_both(gate: Gate) -> None:
    gate.start(cameras=LOT)
    gate.publish(plate="粤B0D456")
    gate.publish(plate="粤BQD456")
    entries = gate.wait_state("sent", 2)
    gate.publish(EXIT_TOPIC, plate="粤BDD456")  # D for 0, or D for Q: one confusable character from both
    [orphan] = eventually(lambda: sessions(gate, "--orphans"), timeout=20, what="an orphan after exit_hold_s")
    assert orphan["state"] == "orphan" and orphan["out_serial_number"] is None
    assert orphan["exit_plate_read"] == "粤BDD456"
    assert sorted(orphan["candidates"]) == sorted(e["out_serial_number"] for e in entries)
    assert exit_requests(gate) == []
    assert len(sessions(gate, "--open")) == 2  # neither car is closed by a guess


def test_a_dismissed_orphan_is_kept_nothing_is_sent_and_status_is_ok_again(gate: Gate) -> None:
    gate.start(cameras=LOT)
    gate.publish(EXIT_TOPIC, plate="粤C66666")
    [orphan] = eventually(lambda: sessions(gate, "--orphans"), timeout=20, what="an orphan")
    code, _ = gate.wait_status(lambda v: v["sessions"]["orphans"] == 1)
    assert code == 1
    done = run_cli("dismiss", str(orphan["exit_id"]), "--config", str(gate.config))
    assert done.returncode == 0, done.stderr
    code, view = gate.wait_status(lambda v: v["sessions"]["orphans"] == 0, what="the orphan handled")
    assert (code, view["state"]) == (0, "ok"), view["problems"]
    assert sessions(gate, "--orphans") == []
    [kept] = [r for r in sessions(gate) if r["exit_id"] == orphan["exit_id"]]
    assert (kept["state"], kept["exit_plate_read"]) == ("dismissed", "粤C66666")
    again = run_cli("dismiss", str(orphan["exit_id"]), "--config", str(gate.config))
    assert again.returncode != 0 and "not an orphan" in again.stderr
    assert exit_requests(gate) == []


def test_close_sends_a_manual_exit_clamped_to_just_after_the_entry(gate: Gate) -> None:
    gate.start(cameras=LOT)
    entered_at = int(time.time()) - 100
    gate.publish(plate="粤H45454", time=entered_at)
    [entry] = gate.wait_state("sent", 1)
    serial = entry["out_serial_number"]
    closed = run_cli("close", serial, "--at", str(entered_at - 3600), "--config", str(gate.config))
    assert closed.returncode == 0, closed.stderr
    [exit_] = eventually(gate.sandbox.exits, timeout=20, what="the manual exit accepted")
    assert (exit_["out_serial_number"], exit_["exit_timestamp"]) == (serial, entered_at + 1)
    [row] = eventually(lambda: sessions(gate, "--closed"), timeout=10, what="the session closed")
    assert (row["match"], row["clamped"], row["exit_state"]) == ("manual", True, "sent")
    twice = run_cli("close", serial, "--config", str(gate.config))
    assert twice.returncode != 0 and "already closed" in twice.stderr
    unknown = run_cli("close", "T1NOSUCHNUMBER", "--config", str(gate.config))
    assert unknown.returncode != 0 and "no open session" in unknown.stderr
    assert len(exit_requests(gate)) == 1


def test_an_exit_behind_a_dead_entry_waits_and_goes_out_after_retry(gate: Gate) -> None:
    gate.sandbox.set(fail_status=400, fail_count=1)  # the entry's own data refused once: dead-lettered
    gate.start(cameras=LOT)
    gate.publish(plate="粤J78787")
    [dead] = gate.wait_state("dead", 1)
    gate.publish(EXIT_TOPIC, plate="粤J78787")
    [waiting] = eventually(lambda: sessions(gate, "--plate", "粤J78787"), timeout=20, what="the exit matched")
    assert (waiting["state"], waiting["entry_state"], waiting["exit_state"]) == ("exit_pending", "dead", "pending")
    assert exit_requests(gate) == []
    retried = run_cli("retry", "--dead", "--config", str(gate.config))
    assert retried.returncode == 0, retried.stderr
    [exit_] = eventually(gate.sandbox.exits, timeout=30, what="the exit after retry")
    assert exit_["out_serial_number"] == dead["out_serial_number"]
    accepted = [r["kind"] for r in gate.sandbox.requests() if r["status"] in (200, 204)]
    assert [k for k in accepted if k in ("entry", "exit")] == ["entry", "exit"]


def test_a_car_read_again_at_the_same_exit_within_the_window_is_one_exit(gate: Gate) -> None:
    gate.start(cameras=LOT)
    gate.publish(plate="粤K12321")
    gate.wait_state("sent", 1)
    now = int(time.time())
    for n in range(3):  # the barrier is slow: the camera reads the waiting car again, each a new record
        gate.publish(EXIT_TOPIC, plate="粤K12321", time=now + n * 20, event_id=f"x{n}")
    eventually(lambda: len(gate.rows("rejected")) == 2, timeout=20, what="two repeats rejected")
    assert {r["reason"] for r in gate.rows("rejected")} == {"repeat"}
    eventually(gate.sandbox.exits, timeout=20, what="the exit accepted")
    assert len(exit_requests(gate)) == 1
    assert [r["state"] for r in sessions(gate)] == ["closed"]


def test_events_and_status_show_exits(gate: Gate) -> None:
    gate.start(cameras=LOT)
    gate.publish(plate="粤M8B888")
    [entry] = gate.wait_state("sent", 1)
    gate.publish(EXIT_TOPIC, plate="粤M88888")  # B read as 8: matched, flagged fuzzy
    eventually(gate.sandbox.exits, timeout=20, what="the exit accepted")
    [exit_row] = eventually(
        lambda: [r for r in events(gate.config) if r["kind"] == "exit" and r["state"] == "sent"],
        timeout=10,
        what="the exit sent in events",
    )
    assert exit_row["plate_number"] == "粤M88888"  # as read at the exit
    assert exit_row["out_serial_number"] == entry["out_serial_number"]
    assert (exit_row["exit_number"], exit_row["match"], exit_row["attempts"]) == ("X01", "fuzzy", 1)
    assert isinstance(exit_row["exit_timestamp"], int) and exit_row["exit_timestamp"] >= entry["enter_timestamp"]
    assert {"id", "camera", "lane", "received_at", "last_error"} <= exit_row.keys()
    assert "entrance_number" not in exit_row and "enter_timestamp" not in exit_row
    [entry_row] = [r for r in events(gate.config) if r["kind"] == "entry"]
    assert "exit_number" not in entry_row and "match" not in entry_row
    code, view = gate.wait_status(lambda v: v["latency"]["exit_p50_s"] is not None, what="exit latency")
    assert code == 0
    assert view["sessions"] == {"open": 0, "oldest_open_age_s": None, "exits_pending": 0, "orphans": 0,
                                "fuzzy_24h": 1}  # fmt: skip
    assert 0 <= view["latency"]["exit_p50_s"] <= view["latency"]["exit_p95_s"] < 30
