"""The delivery loop stepped by hand (issue 9; STYLE 9, Litestream's `MonitorInterval = 0`).

A real journal file, the product's policy, signing and verification; only time (a `FakeClock` moved by
the test), the worker pool (attempts run at once, or held on the wire until the test lets them finish)
and the API (scripted, correctly signed answers) are stand-ins. What is asserted is what a user would
see: which requests reach the API and when, and what the journal and `status` say afterwards.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeagent import delivery, policy
from edgeagent.delivery import DeliveryLoop
from edgeagent.journal import Due, Journal, Marked
from edgeagent.policy import Answer
from edgeagent.requests import Kind
from tests.unit.outbox_fakes import (
    T0,
    Call,
    FakeApi,
    FakeClock,
    HeldExecutor,
    InlineExecutor,
    error_body,
    gate_config,
    merchant_key,
    platform_keys,
    record_entries,
    signed,
)

Script = Callable[[Call, int], Answer | Any]


class RecordingJournal(Journal):
    """The real journal, remembering each `mark_outcomes` batch and each `due()` query."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.marks: list[list[Marked]] = []
        self.due_queries = 0

    def mark_outcomes(self, marks: Sequence[Marked], now: float) -> None:
        super().mark_outcomes(marks, now)
        self.marks.append(list(marks))

    def due(self, now: float, limit: int, exclude: Sequence[int] = ()) -> list[Due]:
        self.due_queries += 1
        return super().due(now, limit, exclude)


@dataclass
class Rig:
    clock: FakeClock
    journal: RecordingJournal
    api: FakeApi
    loop: DeliveryLoop
    executor: Executor
    ids: list[int]

    def row(self, row_id: int) -> dict[str, Any]:
        found = self.journal.get(row_id)
        assert found is not None
        return found

    def rows(self) -> list[dict[str, Any]]:
        return [self.row(i) for i in self.ids]

    def run_for(self, seconds: float, *, until: Callable[[], bool] | None = None) -> None:
        """Step as `run()` would, sleeping on the fake clock for what `step()` returns."""
        end = self.clock.monotonic() + seconds
        for _ in range(200_000):
            if self.clock.monotonic() >= end or (until is not None and until()):
                return
            wait = self.loop.step()
            self.clock.advance(min(max(wait, 0.001), max(end - self.clock.monotonic(), 0.0)))
        raise AssertionError("the loop never slept")

    def step_at(self, dt: float = 0.0) -> float:
        self.clock.advance(dt)
        return self.loop.step()

    @property
    def held(self) -> HeldExecutor:
        assert isinstance(self.executor, HeldExecutor)
        return self.executor


def make_rig(
    tmp_path: Path,
    script: Script,
    *,
    entries: int = 1,
    held: bool = False,
    max_in_flight: int = 4,
    max_rate_per_s: float = 1000.0,
) -> Rig:
    config = gate_config(tmp_path, max_in_flight=max_in_flight, max_rate_per_s=max_rate_per_s)
    clock = FakeClock()
    journal = RecordingJournal(config.journal_path)
    ids = [r.id for r in record_entries(journal, range(1, entries + 1), clock.system())]
    api = FakeApi(clock, script)
    executor: Executor = HeldExecutor() if held else InlineExecutor()
    loop = DeliveryLoop(
        config, journal, api, platform_keys(config, clock), merchant_key(), clock, executor=executor, seed=7
    )
    return Rig(clock, journal, api, loop, executor, ids)


# -- scripted answers ---------------------------------------------------------------------------------


def accepted(call: Call, n: int) -> Answer:
    return signed(200, {"serial_number": f"WX{n:04d}"}, timestamp=call.at_now, at=call.at_system)


def status(code: int, err: str, message: str, **headers: str) -> Script:
    def answer(call: Call, n: int) -> Answer:
        return signed(code, error_body(err, message), timestamp=call.at_now, at=call.at_system, headers=headers)

    return answer


def first(count: int, script: Script, then: Script = accepted) -> Script:
    """`script` for the first `count` calls, `then` afterwards."""
    return lambda call, n: script(call, n) if n <= count else then(call, n)


unavailable = status(503, "SYSTEM_ERROR", "系统繁忙")
sign_error = status(401, "SIGN_ERROR", "签名错误")


# -- order, concurrency, pacing -----------------------------------------------------------------------


def test_oldest_first_and_never_more_than_max_in_flight(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, accepted, entries=7, held=True, max_in_flight=3)
    rig.run_for(2.0)
    assert [d.id for d in rig.held.submitted] == rig.ids[:3]  # the three oldest, and no more
    assert len(rig.held.held) == 3
    rig.held.finish(1)
    rig.run_for(0.5)
    assert [d.id for d in rig.held.submitted] == rig.ids[:4]  # one answer freed one slot
    assert len(rig.held.held) == 3
    while len(rig.api.calls) < 7:
        rig.held.finish()
        rig.run_for(0.5)
        assert len(rig.held.held) <= 3
    rig.run_for(0.5)
    assert [d.id for d in rig.held.submitted] == rig.ids
    assert rig.api.numbers() == [r["out_serial_number"] for r in rig.rows()]
    assert [r["state"] for r in rig.rows()] == ["sent"] * 7


def test_dispatches_are_paced_at_max_rate_per_s(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, accepted, entries=12, max_in_flight=4, max_rate_per_s=5)
    rig.run_for(5.0)
    times = [c.at_mono for c in rig.api.calls]
    assert len(times) >= 10  # paced, not starved
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1 / 5 - 1e-9
    assert max(sum(1 for t in times if start <= t < start + 1.0) for start in times) <= 5


def test_a_retry_is_due_again_only_after_its_backoff(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, first(5, unavailable), entries=1)
    rig.run_for(60.0, until=lambda: rig.row(rig.ids[0])["state"] == "sent")
    calls = rig.api.calls
    assert len(calls) == 6
    retries = [m.outcome for batch in rig.journal.marks for m in batch if isinstance(m.outcome, policy.Retry)]
    assert len(retries) == 5
    for attempt, (call, retry, later) in enumerate(zip(calls, retries, calls[1:], strict=False)):
        gap = later.at_mono - call.at_mono
        assert later.at_now >= retry.at, "sent again before its backoff ran out"
        assert 0.5 <= gap <= 2**attempt + 0.1, (attempt, gap)
    row = rig.row(rig.ids[0])
    assert (row["attempts"], row["serial_number"]) == (6, "WX0006")


def test_retry_after_holds_the_request_and_everything_else(tmp_path: Path) -> None:
    too_many = status(429, "FREQUENCY_LIMITED", "频率超限", **{"Retry-After": "30"})
    rig = make_rig(tmp_path, first(1, too_many), entries=3)
    rig.run_for(29.0)
    assert len(rig.api.calls) == 1
    assert rig.loop.runtime_status()["last_error_code"] == "FREQUENCY_LIMITED"
    rig.run_for(2.0)
    assert len(rig.api.calls) >= 2
    assert rig.api.calls[1].at_mono >= rig.api.calls[0].at_mono + 30
    rig.run_for(5.0)
    assert [r["state"] for r in rig.rows()] == ["sent"] * 3


def test_three_failures_in_a_row_hold_the_whole_loop(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, unavailable, entries=6, max_rate_per_s=10)
    rig.run_for(3.0)
    t = [c.at_mono for c in rig.api.calls]
    assert len(t) >= 5
    # The first round (max_in_flight = 4) goes out paced only, even past the third failure: our own hold
    # delays the next round, it does not recall requests already taken for this one.
    assert all(b - a < 0.5 for a, b in itertools.pairwise(t[:4]))
    assert t[4] - t[3] >= 0.5  # the next round: held (backoff from 1 s)


# -- pauses --------------------------------------------------------------------------------------------


def test_a_pause_stops_all_dispatching_and_escalates(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, sign_error, entries=5, max_rate_per_s=10)
    rig.run_for(0.5)
    assert len(rig.api.calls) == 1
    view = rig.loop.runtime_status()
    assert view["paused"] and "SIGN_ERROR" in view["pause_cause"]
    rig.run_for(20.0)
    t = [c.at_mono for c in rig.api.calls]
    assert len(t) == 3
    assert 4.0 <= t[1] - t[0] <= 5.1  # 5 s (jittered down to 80 %)
    assert 8.0 <= t[2] - t[1] <= 10.1  # then 10 s
    for row in rig.rows():  # not the requests' fault: all pending, no attempt counted
        assert (row["state"], row["attempts"]) == ("pending", 0)
    assert "SIGN_ERROR" in rig.row(rig.ids[0])["last_error"]


def test_a_requeue_after_the_pause_began_lifts_it_at_once(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, first(1, sign_error), entries=2)
    rig.run_for(0.3)
    assert rig.loop.runtime_status()["paused"]
    technician = Journal(rig.journal.path)  # `edgeagent retry --all` after fixing the key
    requeued, _ = technician.requeue(None, rig.clock.system(), include_pending=True)
    technician.close()
    assert requeued == rig.ids
    at = rig.clock.monotonic()
    rig.run_for(1.5)
    assert len(rig.api.calls) >= 2
    assert rig.api.calls[1].at_mono - at <= delivery.REQUEUE_LOOK_EVERY_S + 0.05  # not the 4-5 s of the pause
    assert not rig.loop.runtime_status()["paused"]


def test_a_requeue_from_before_the_pause_does_not_lift_it(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, first(1, sign_error), entries=2)
    technician = Journal(rig.journal.path)
    technician.requeue(None, rig.clock.system() - 60, include_pending=True)
    technician.close()
    rig.run_for(3.0)
    assert len(rig.api.calls) == 1
    assert rig.loop.runtime_status()["paused"]


def test_a_clock_correction_by_a_verified_answer_lifts_the_pause(tmp_path: Path) -> None:
    """A 401, then (from a request already on the wire) a verified answer whose signed timestamp shows the
    API's clock 100 s from ours: the clock was the trouble, so sending resumes at once, with corrected time."""

    def script(call: Call, n: int) -> Answer:
        if n == 1:
            return sign_error(call, n)
        return signed(503, error_body("SYSTEM_ERROR", "系统繁忙"), timestamp=call.at_system + 100, at=call.at_system)

    rig = make_rig(tmp_path, script, entries=3, held=True, max_in_flight=2)
    rig.step_at()
    rig.step_at(0.01)
    assert len(rig.held.held) == 2
    rig.held.finish(1)
    rig.step_at(0.01)
    assert rig.loop.runtime_status()["paused"]
    rig.held.finish(1)
    rig.step_at(0.01)
    assert rig.clock.offset == pytest.approx(100, abs=1)
    assert not rig.loop.runtime_status()["paused"]
    assert [d.id for d in rig.held.submitted] == rig.ids  # the third went out at once
    rig.held.finish()
    auth = rig.api.calls[-1].headers["Authorization"]
    assert f'timestamp="{int(rig.clock.now())}"' in auth
    assert rig.clock.now() - rig.clock.system() > 99


def test_a_clock_correction_by_the_refusals_themselves_lifts_the_pause(tmp_path: Path) -> None:
    """The usual case: our clock 10 min behind, so the API refuses our signatures (401) and its signed
    refusals are stale; a second one with a different timestamp corroborates the offset (SPEC §5). The
    requests were refused for our clock, now corrected: sending resumes at once, not after a longer pause."""

    def script(call: Call, n: int) -> Answer:
        return signed(
            401, error_body("SIGN_ERROR", "签名错误"), timestamp=call.at_system + 600, at=call.at_system
        ) if n <= 2 else accepted(call, n)  # fmt: skip

    rig = make_rig(tmp_path, script, entries=3, held=True, max_in_flight=2)
    rig.step_at()
    rig.step_at(0.01)
    rig.held.finish(1)
    rig.clock.advance(1.0)
    rig.held.finish(1)
    rig.step_at(0.01)
    assert rig.clock.offset == pytest.approx(600, abs=1)
    assert not rig.loop.runtime_status()["paused"]


def test_a_wrong_parking_id_leaves_everything_pending_and_names_the_field(tmp_path: Path) -> None:
    def script(call: Call, n: int) -> Answer:
        body = error_body("PARAM_ERROR", "参数错误", {"field": "/parking_id", "issue": "停车场不存在"})
        return signed(400, body, timestamp=call.at_now, at=call.at_system)

    rig = make_rig(tmp_path, script, entries=4, held=True, max_in_flight=3)
    rig.run_for(0.1)
    assert len(rig.held.held) == 3
    rig.held.finish()
    rig.run_for(3.0)
    assert [(r["state"], r["attempts"]) for r in rig.rows()] == [("pending", 0)] * 4  # none dead
    assert len(rig.api.calls) == 3  # the fourth waits out the pause
    view = rig.loop.runtime_status()
    assert view["paused"]
    assert view["pause_field"] == "parking_id"
    assert "parking_id" in view["pause_cause"] and "retry --rebuild" in view["pause_cause"]


def test_the_same_refusal_on_three_requests_in_flight_kills_none(tmp_path: Path) -> None:
    """Three requests on the wire together, all refused with the same 400: not their fault (SPEC §5).
    The first two were dead-lettered before the third made it a pause; they must come back to pending."""

    script = status(400, "INVALID_REQUEST", "商户号未开通该权限")
    rig = make_rig(tmp_path, script, entries=3, held=True, max_in_flight=3)
    rig.run_for(0.1)
    rig.held.finish()
    rig.run_for(0.5)
    assert [r["state"] for r in rig.rows()] == ["pending"] * 3
    assert rig.loop.runtime_status()["paused"]


def test_the_same_refusal_one_after_another_revives_the_dead(tmp_path: Path) -> None:
    script = status(400, "INVALID_REQUEST", "商户号未开通该权限")
    rig = make_rig(tmp_path, script, entries=3, max_rate_per_s=10)
    rig.run_for(0.5)
    assert len(rig.api.calls) == 3
    assert [r["state"] for r in rig.rows()] == ["pending"] * 3
    assert rig.loop.runtime_status()["paused"]


# -- marking answers in batches -----------------------------------------------------------------------


def test_answers_are_journaled_together_once_nothing_is_in_flight_or_after_the_window(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, accepted, entries=3, held=True, max_in_flight=3)
    for _ in range(3):
        rig.step_at(0.002)
    assert len(rig.held.held) == 3
    rig.held.finish(1)
    rig.step_at(0.001)
    assert rig.journal.marks == []  # two still on the wire: wait for company
    assert rig.row(rig.ids[0])["state"] == "pending"
    rig.step_at(delivery.MARK_WINDOW_S / 2)
    assert rig.journal.marks == []
    rig.step_at(delivery.MARK_WINDOW_S / 2 + 0.001)
    assert [[m.id for m in batch] for batch in rig.journal.marks] == [rig.ids[:1]]  # the window ran out
    assert rig.row(rig.ids[0])["state"] == "sent"
    rig.held.finish()
    rig.step_at(0.001)
    assert [[m.id for m in batch] for batch in rig.journal.marks] == [rig.ids[:1], rig.ids[1:]]  # one transaction
    assert [r["state"] for r in rig.rows()] == ["sent"] * 3


def test_the_step_sleeps_no_longer_than_the_mark_window(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, accepted, entries=2, held=True, max_in_flight=2)
    rig.step_at()
    rig.step_at(0.01)
    rig.held.finish(1)
    assert rig.step_at(0.001) <= delivery.MARK_WINDOW_S


# -- fresh entries ------------------------------------------------------------------------------------


def test_an_offered_entry_is_sent_without_waiting_for_a_poll(tmp_path: Path) -> None:
    """The real `run()` loop, idle (it would sleep up to 1 s): a freshly journaled entry is handed over by
    ingest and reaches the API at once."""
    sent = threading.Event()

    def script(call: Call, n: int) -> Answer:
        sent.set()
        return accepted(call, n)

    rig = make_rig(tmp_path, script, entries=0)
    thread = threading.Thread(target=rig.loop.run, name="delivery-test")
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while rig.journal.due_queries == 0 and time.monotonic() < deadline:  # idle: it found nothing
            time.sleep(0.005)
        assert rig.journal.due_queries > 0
        ingest = Journal(rig.journal.path)
        fresh = record_entries(ingest, [1], rig.clock.system())
        ingest.close()
        began = time.monotonic()
        rig.loop.offer([Due(r.id, Kind.ENTRY, r.out_serial_number or "", r.body or b"", 0, T0) for r in fresh])
        assert sent.wait(0.5), "the fresh entry waited for the loop's next poll"
        assert time.monotonic() - began < 0.5
    finally:
        rig.loop.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert rig.journal.get(fresh[0].id)["state"] == "sent"  # type: ignore[index]


def test_an_offered_entry_does_not_jump_ahead_of_older_ones(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, accepted, entries=2, max_rate_per_s=10)
    fresh = record_entries(rig.journal, [3], rig.clock.system())
    rig.loop.offer([Due(r.id, Kind.ENTRY, r.out_serial_number or "", r.body or b"", 0, T0) for r in fresh])
    rig.run_for(1.0)
    assert [c.out_serial_number for c in rig.api.calls] == [
        rig.row(i)["out_serial_number"] for i in [*rig.ids, fresh[0].id]
    ]


def test_an_offered_entry_goes_out_without_a_due_query_when_nothing_older_waits(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, accepted, entries=0)
    rig.step_at()
    queries = rig.journal.due_queries
    fresh = record_entries(rig.journal, [1], rig.clock.system())
    rig.loop.offer([Due(r.id, Kind.ENTRY, r.out_serial_number or "", r.body or b"", 0, T0) for r in fresh])
    rig.step_at(0.001)
    assert rig.api.numbers() == [fresh[0].out_serial_number]
    assert rig.journal.due_queries == queries


# -- what counts as sent -------------------------------------------------------------------------------


def test_a_duplicate_number_refusal_marks_the_row_sent_as_duplicate(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, status(400, "INVALID_REQUEST", "商户订单号重复"), entries=1)
    rig.run_for(0.5)
    row = rig.row(rig.ids[0])
    assert (row["state"], row["acceptance"], row["serial_number"]) == ("sent", "duplicate", None)
    view = rig.loop.runtime_status()
    assert (view["sent"], view["duplicates"]) == (1, 1)


def test_a_verified_answer_marks_the_row_sent_with_its_serial_number(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, accepted, entries=1)
    rig.run_for(0.5)
    row = rig.row(rig.ids[0])
    assert (row["state"], row["acceptance"], row["serial_number"], row["attempts"]) == ("sent", "verified", "WX0001", 1)
    assert row["answered_at"] == pytest.approx(T0, abs=1)


def test_a_replayed_stale_answer_is_not_sent_and_does_not_move_the_clock(tmp_path: Path) -> None:
    """Someone on the path replays one correctly signed answer an hour old, again and again."""
    replay = signed(200, {"serial_number": "WX-OLD"}, timestamp=T0 - 3600, at=T0)

    def script(call: Call, n: int) -> Answer:
        return Answer(replay.status, replay.headers, replay.body, replay.base_url, call.at_system, call.at_system)

    rig = make_rig(tmp_path, script, entries=2)
    rig.run_for(30.0)
    assert len(rig.api.calls) >= 3
    assert rig.clock.offset is None
    for row in rig.rows():
        assert row["state"] == "pending" and row["serial_number"] is None
    view = rig.loop.runtime_status()
    assert view["sent"] == 0
    assert view["response_unverified"] == len(rig.api.calls)
    assert rig.row(rig.ids[0])["attempts"] >= 1
