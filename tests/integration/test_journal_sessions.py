"""Sessions in the journal, on real SQLite files (SPEC §2, §10): rematch of held and orphan exit reads, and
the refusals of `attach`, `dismiss` and `close` (not an orphan, session already closed, unknown number).

`Lot` is a small driver over a real `Journal` that the hypothesis state machine reuses.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeagent import policy, requests
from edgeagent.exits import ExitRules
from edgeagent.journal import RETENTION_S, Journal, Marked, Record, Recorded
from edgeagent.model import (
    CarType,
    Entry,
    ExitRead,
    Inbound,
    MatchMode,
    PlateColor,
    ReentryMode,
    Rejection,
    TimeSource,
    VehicleType,
)
from edgeagent.screening import repeat_of

T0 = 1_800_000_000.0
PREFIX = "JS1"
HOLD_S = 30.0


def entry(key: str, plate: str, when: int) -> Entry:
    return Entry(
        camera="south-1",
        lane=None,
        dedup_key=key,
        plate_number=plate,
        plate_color=PlateColor.BLUE,
        vehicle_type=VehicleType.SMALL,
        car_type=CarType.TEMPORARY,
        enter_timestamp=when,
        time_source=TimeSource.CAMERA,
        clock_synced=True,
        entrance_number="A01",
        entrance_name="南门入口",
        parking_id="WXPARK001",
    )


def exit_read(key: str, plate: str, when: int, exit_number: str = "X01") -> ExitRead:
    return ExitRead(
        camera="exit-1",
        lane=None,
        dedup_key=key,
        plate_number=plate,
        plate_color=PlateColor.BLUE,
        read_at=when,
        time_source=TimeSource.CAMERA,
        clock_synced=True,
        exit_number=exit_number,
        exit_name="南门出口",
    )


def repeat_rule(item: Entry, recent: Callable[[str, float, float], int | None]) -> Rejection | None:
    return repeat_of(item, recent, 60)


class Lot:
    """A journal driven as the ingest and delivery loops drive it, with times passed in."""

    def __init__(self, path: Path, *, mode: MatchMode = MatchMode.CONFUSABLE, repeat_window_s: float = 60) -> None:
        self.journal = Journal(path)
        self.rules = ExitRules(mode, ReentryMode.CLOSE_PREVIOUS, HOLD_S, repeat_window_s)
        self.now = T0
        self.keys = itertools.count(1)

    def record(self, item: Entry | ExitRead) -> Record:
        [result] = self.journal.record_batch(
            [(item, Inbound("anpr/x/plate", self.now, "0" * 64, 10, b"{}"))],
            serial_prefix=PREFIX,
            build_body=requests.entry_body,
            repeat_rule=repeat_rule,
            now=self.now,
            exits=self.rules,
        )
        return result

    def enter(self, plate: str, when: float | None = None) -> Record:
        return self.record(entry(f"in|{next(self.keys)}", plate, int(self.now if when is None else when)))

    def leave(self, plate: str, when: float | None = None, exit_number: str = "X01") -> Record:
        read = exit_read(f"out|{next(self.keys)}", plate, int(self.now if when is None else when), exit_number)
        return self.record(read)

    def rematch(self) -> tuple[list[int], list[int]]:
        return self.journal.rematch(self.rules, self.now, self.now)

    def deliver(self, outcome: Callable[[int], policy.Outcome] = lambda i: policy.Sent(f"WX{i}")) -> list[int]:
        """One pass of the delivery loop: everything due (honouring depends_on) gets `outcome`."""
        due = self.journal.due(self.now, 1000)
        self.journal.mark_outcomes([Marked(d.id, outcome(d.id), self.now) for d in due], self.now)
        return [d.id for d in due]

    def row(self, row_id: int) -> dict[str, Any]:
        found = self.journal.get(row_id)
        assert found is not None
        return found

    def by_state(self, state: str) -> list[int]:
        return [r["id"] for r in self.journal.sessions() if r.get("exit_state") == state]


@pytest.fixture
def lot(tmp_path: Path) -> Lot:
    return Lot(tmp_path / "journal.sqlite3")


# -- rematch ---------------------------------------------------------------------------------------------


def test_a_held_exit_is_matched_once_its_entry_is_journaled(lot: Lot) -> None:
    held = lot.leave("粤D12121")
    assert held.outcome is Recorded.HELD
    assert lot.rematch() == ([], [])  # nothing to match yet, the hold not over
    lot.now += 2
    opened = lot.enter("粤D12121", when=lot.now - 5)  # the entry arrives late, timed before the exit
    assert lot.rematch() == ([held.id], [])
    row = lot.row(held.id)
    assert (row["state"], row["depends_on"]) == ("pending", opened.id)
    assert row["out_serial_number"] == opened.out_serial_number
    assert (row["match"], row["plate_number"], row["candidates"]) == ("exact", "粤D12121", None)
    exit_body = lot.journal.body_of(held.id)
    assert exit_body is not None
    assert requests.parse_exit_body(exit_body).out_serial_number == opened.out_serial_number


def test_a_held_exit_becomes_an_orphan_after_the_hold_and_is_still_matched_later(lot: Lot) -> None:
    held = lot.leave("粤D30303")
    lot.now += HOLD_S - 1
    assert lot.rematch() == ([], [])
    lot.now += 1
    assert lot.rematch() == ([], [held.id])
    assert lot.row(held.id)["state"] == "orphan"
    assert lot.rematch() == ([], [])  # orphaned once
    # A session that fits arrives late (another box over a bridge, a long outage): matched after all.
    lot.now += 5
    opened = lot.enter("粤D30303", when=T0 - 600)
    assert lot.rematch() == ([held.id], [])
    assert lot.row(held.id)["depends_on"] == opened.id


def test_an_orphan_never_closes_a_session_that_entered_after_its_read(lot: Lot) -> None:
    orphan = lot.leave("粤D40404")
    lot.now += HOLD_S
    lot.rematch()
    lot.now += 3600  # the same plate enters an hour later: another stay, not this exit's
    later = lot.enter("粤D40404")
    assert lot.rematch() == ([], [])
    assert lot.row(orphan.id)["state"] == "orphan"
    assert lot.journal.sessions("open")[0]["entry_id"] == later.id


def test_two_fitting_sessions_are_no_guess_the_orphan_lists_both(lot: Lot) -> None:
    a = lot.enter("粤B0D123")
    b = lot.enter("粤BQD123")
    held = lot.leave("粤BDD123")  # D read for 0 or for Q: both one confusable character away
    assert held.outcome is Recorded.HELD
    assert json.loads(lot.row(held.id)["candidates"]) == [a.out_serial_number, b.out_serial_number]
    lot.now += HOLD_S
    assert lot.rematch() == ([], [held.id])
    [orphan] = lot.journal.sessions("orphans")
    assert json.loads(orphan["candidates"]) == [a.out_serial_number, b.out_serial_number]
    assert lot.deliver() == [a.id, b.id]  # only the entries go out
    assert {r["entry_state"] for r in lot.journal.sessions() if r["entry_id"]} == {"sent"}


def test_a_repeat_at_the_same_exit_within_the_window_is_one_exit(lot: Lot) -> None:
    lot.enter("粤E50505", when=T0 - 600)
    first = lot.leave("粤E50505")
    lot.now += 20
    again = lot.leave("粤E50505")
    assert (first.outcome, again.outcome) == (Recorded.EXIT, Recorded.REPEAT)
    other_exit = lot.leave("粤E50505", exit_number="X02")  # another exit: not a repeat, and no session left
    assert other_exit.outcome is Recorded.HELD


# -- attach, dismiss, close: what they refuse ----------------------------------------------------------


def test_attach_refuses_what_is_not_an_orphan_exit_read(lot: Lot) -> None:
    opened = lot.enter("粤F60606", when=T0 - 600)
    matched = lot.leave("粤F60606")
    other = lot.enter("粤F60607", when=T0 - 600)
    assert lot.journal.attach(999, other.out_serial_number or "", lot.rules, lot.now) == "#999 is not an exit read"
    assert lot.journal.attach(opened.id, other.out_serial_number or "", lot.rules, lot.now) == (
        f"#{opened.id} is not an exit read"
    )
    assert lot.journal.attach(matched.id, other.out_serial_number or "", lot.rules, lot.now) == (
        f"exit #{matched.id} is pending, not an orphan"
    )
    assert lot.row(matched.id)["depends_on"] == opened.id  # unchanged


def test_attach_refuses_an_unknown_number_and_a_session_already_closed(lot: Lot) -> None:
    closed = lot.enter("粤G70707", when=T0 - 600)
    lot.leave("粤G70707")
    orphan = lot.leave("粤C77777")
    lot.now += HOLD_S
    lot.rematch()
    unknown = lot.journal.attach(orphan.id, "JS1NOSUCH0000000001", lot.rules, lot.now)
    assert unknown is not None and "no open session JS1NOSUCH0000000001" in unknown
    already = lot.journal.attach(orphan.id, closed.out_serial_number or "", lot.rules, lot.now)
    assert already is not None and f"no open session {closed.out_serial_number}" in already
    assert lot.row(orphan.id)["state"] == "orphan"
    # and the one that works: flagged manual, under the session's number
    target = lot.enter("粤C77778", when=T0 - 600)
    assert lot.journal.attach(orphan.id, target.out_serial_number or "", lot.rules, lot.now) is None
    row = lot.row(orphan.id)
    assert (row["state"], row["match"], row["depends_on"]) == ("pending", "manual", target.id)
    again = lot.journal.attach(orphan.id, target.out_serial_number or "", lot.rules, lot.now)
    assert again == f"exit #{orphan.id} is pending, not an orphan"


def test_dismiss_refuses_anything_but_an_unmatched_exit_read(lot: Lot) -> None:
    lot.enter("粤H80808", when=T0 - 600)
    matched = lot.leave("粤H80808")
    orphan = lot.leave("粤C88888")
    assert lot.journal.dismiss(matched.id, lot.now) == f"exit #{matched.id} is pending, not an orphan"
    assert lot.journal.dismiss(12345, lot.now) == "#12345 is not an exit read"
    assert lot.journal.dismiss(orphan.id, lot.now) is None
    assert lot.journal.dismiss(orphan.id, lot.now) == f"exit #{orphan.id} is dismissed, not an orphan"
    lot.now += HOLD_S
    assert lot.rematch() == ([], [])  # a dismissed read is not tried again
    lot.enter("粤C88888", when=T0 - 5)  # ... even when its session turns up
    assert lot.rematch() == ([], [])
    assert lot.row(orphan.id)["state"] == "dismissed"
    assert lot.journal.session_counts(lot.now)["orphans"] == 0


def test_close_refuses_an_unknown_number_and_a_closed_session(lot: Lot) -> None:
    opened = lot.enter("粤J90909", when=T0 - 600)
    unknown = lot.journal.close_session("JS1NOSUCH0000000001", lot.now, lot.rules, lot.now)
    assert isinstance(unknown, str) and "no open session" in unknown
    exit_id = lot.journal.close_session(opened.out_serial_number or "", T0 - 700, lot.rules, lot.now)
    assert isinstance(exit_id, int)
    row = lot.row(exit_id)
    assert (row["match"], row["clamped"], row["exit_timestamp"]) == ("manual", 1, int(T0 - 600) + 1)
    again = lot.journal.close_session(opened.out_serial_number or "", lot.now, lot.rules, lot.now)
    assert isinstance(again, str) and "already closed" in again
    late_read = lot.leave("粤J90909")  # the car's exit read after the manual close: no second exit
    assert late_read.outcome is Recorded.HELD


def test_an_exit_behind_a_dead_entry_waits_and_goes_after_retry(lot: Lot) -> None:
    opened = lot.enter("粤K11111", when=T0 - 600)
    lot.deliver(lambda i: policy.Dead("PARAM_ERROR", "bad", "", "HTTP 400 PARAM_ERROR"))
    leaving = lot.leave("粤K11111")
    assert leaving.outcome is Recorded.EXIT
    assert lot.deliver() == []  # the exit waits with its dead entry
    assert lot.journal.requeue_dead(None, lot.now) == [opened.id]
    assert lot.deliver() == [opened.id]
    assert lot.deliver() == [leaving.id]


# -- retention -------------------------------------------------------------------------------------------


def test_pruning_never_strands_an_exit_behind_a_pruned_entry(lot: Lot) -> None:
    """An exit that is not sent yet needs its entry row: `due()` sends it only while that row is `sent`."""
    opened = lot.enter("粤L22222", when=T0 - 600)
    lot.deliver()
    leaving = lot.leave("粤L22222")
    lot.deliver(lambda i: policy.Dead("PARAM_ERROR", "bad", "", "HTTP 400 PARAM_ERROR"))
    lot.now += RETENTION_S + 86400
    lot.journal.prune(lot.now)
    lot.journal.requeue_dead(None, lot.now)  # a technician re-queues it after the fix
    assert lot.journal.get(opened.id) is not None, "the entry of an unsent exit was pruned"
    assert lot.deliver() == [leaving.id]


# -- a misread at the barrier (issue 10: found by these tests, then fixed) -------------------------------------


def test_a_second_read_of_a_car_that_left_by_a_fuzzy_match_is_a_repeat_not_an_orphan(lot: Lot) -> None:
    lot.enter("粤M8B888", when=T0 - 600)
    first = lot.leave("粤M88888")  # B read as 8: fuzzy, so it waits out the hold before it is taken
    assert first.outcome is Recorded.HELD
    lot.now += HOLD_S
    lot.rematch()
    assert (lot.row(first.id)["state"], lot.row(first.id)["match"]) == ("pending", "fuzzy")
    lot.now += 5
    again = lot.leave("粤M8B888")  # the same car, read right, at the same exit, 5 s later
    lot.now += HOLD_S
    lot.rematch()
    assert again.outcome is Recorded.REPEAT  # one car, one exit: no false orphan, status stays ok


def test_an_exit_read_before_its_own_entry_does_not_close_a_confusable_neighbour(lot: Lot) -> None:
    neighbour = lot.enter("粤A00011", when=T0 - 600)  # still parked
    early = lot.leave("粤A00017")  # 1/7 confusable; its own entry is still on its way
    own = lot.enter("粤A00017", when=T0 - 5)
    lot.now += 1
    lot.rematch()
    assert lot.row(early.id)["depends_on"] == own.id, "the exit closed the neighbour's session"
    assert neighbour.id in [r["entry_id"] for r in lot.journal.sessions("open")]
