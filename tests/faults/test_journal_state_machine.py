"""A property-based test of the journal state machine (issue 6, item 9).

Hypothesis drives any interleaving of: record a batch (new reads, redeliveries of acknowledged and
unacknowledged reads, repeats of a plate), claim due entries, record outcomes (sent, sent as a duplicate
number, retry, uncertain retry, dead, pause), late answers for rows already sent, re-queue dead entries,
`retry --all --rebuild`, revive, expire, prune, a crash in the middle of a transaction, and a restart
(a new connection on the same file). Each example's temporary directory is removed in teardown.
After every step the invariants a user relies on must hold:

- every read that was acknowledged (its batch committed) is in the journal, unless pruned as a sent
  or rejected row past retention; an entry never disappears while pending or dead;
- one dedup key, one row; one entry, one out_serial_number, never reused (even after pruning);
- a sent entry stays sent with its serial_number; nothing is sent without one, unless accepted as a
  duplicate number (acceptance "duplicate"); a rejected read stays a rejected read;
- PRAGMA integrity_check is "ok".

Sessions (issue 10): exit reads (matching exactly, fuzzily, ambiguously or nothing; read before or after
their entry; redelivered), re-entries, rematch with time passing the hold, attach, dismiss, close, and
delivery outcomes for exits (delivery honours `due()`). Invariants: no number has two exits, and a
session at most one; an exit that is pending, dead or sent depends on an entry with its number (while
that entry is kept) and stays with it; an exit is never sent unless its entry is sent; an exit read
with no session (held, orphan, dismissed) has no number and no body.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgeagent import policy, requests
from edgeagent.exits import ExitRules
from edgeagent.journal import RETENTION_S, Journal, Marked, Recorded
from edgeagent.model import (
    CarType,
    Entry,
    ExitRead,
    Inbound,
    MatchMode,
    PlateColor,
    Reason,
    ReentryMode,
    Rejection,
    TimeSource,
    VehicleType,
)
from edgeagent.requests import Kind
from edgeagent.screening import repeat_of

pytestmark = pytest.mark.slow

PREFIX = "HY1"
PLATES = [f"粤B{n:05d}" for n in range(12)] + ["粤B0000Q"]
# Exit reads: entered plates (exact), 粤B0000D (one confusable character from 粤B00000 and 粤B0000Q:
# fuzzy when one of them is open, ambiguous when both are), 苏B00001 (a province misread), and plates
# that never entered.
EXIT_PLATES = [*PLATES[:5], "粤B0000Q", "粤B0000D", "苏B00001", "琼Z99999", "琼Z99998"]
HOLD_S = 30.0
EXIT_RULES = ExitRules(MatchMode.CONFUSABLE, ReentryMode.CLOSE_PREVIOUS, HOLD_S, repeat_window_s=60)


def body(entry: Entry, serial: str) -> bytes:
    return requests.entry_body(entry, serial)  # a real body: an exit's body is built from it


def make_entry(key: str, plate: str, when: int) -> Entry:
    return Entry(
        camera="cam",
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
        entrance_name="南门",
        parking_id="WXPARK001",
    )


def repeat_rule(entry: Entry, recent: Callable[[str, float, float], int | None]) -> Rejection | None:
    return repeat_of(entry, recent, 60)


def inbound(now: float) -> Inbound:
    return Inbound("anpr/cam/plate", now, "0" * 64, 10, b"{}")


def make_exit(key: str, plate: str, when: int, exit_number: str) -> ExitRead:
    return ExitRead(
        camera="exit-cam",
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


class JournalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir: Path | None = None
        self.journal: Journal | None = None
        self.now = 1_800_000_000.0
        self.next_read = 0
        self.acked: dict[str, float] = {}  # dedup key → time its batch committed
        self.unacked: list[str] = []  # keys of reads whose batch never committed (redelivered later)
        self.serials_seen: dict[str, int] = {}  # out_serial_number → row id, over the whole run
        self.sent: dict[int, str | None] = {}  # row id → serial_number (None: accepted as a duplicate number)
        self.pruned_ids: set[int] = set()
        self.last_states: dict[str, str] = {}  # dedup key → state after the previous step
        self.unacked_exits: dict[str, ExitRead] = {}  # exit reads whose batch never committed
        self.exit_of: dict[int, int] = {}  # exit row id → the entry row it was matched to (never changes)

    @initialize()
    def open(self) -> None:
        # One directory per example, removed in teardown (issue 9: examples used to leave them behind).
        self.dir = Path(tempfile.mkdtemp(prefix="journal-sm-"))
        self.journal = Journal(self.dir / "journal.sqlite3")

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def j(self) -> Journal:
        assert self.journal is not None
        return self.journal

    def _items(self, keys: list[tuple[str, str, bool]]) -> list[tuple[Entry | Rejection, Inbound]]:
        items: list[tuple[Entry | Rejection, Inbound]] = []
        for key, plate, reject in keys:
            if reject:
                items.append((Rejection("cam", None, key, Reason.NO_PLATE, "no plate"), inbound(self.now)))
            else:
                items.append((make_entry(key, plate, int(self.now)), inbound(self.now)))
        return items

    # -- rules -----------------------------------------------------------------------------------

    @rule(
        new=st.lists(st.tuples(st.sampled_from(PLATES), st.booleans()), min_size=0, max_size=6),
        redeliver=st.integers(min_value=0, max_value=3),
        commit=st.booleans(),
    )
    def record_batch(self, new: list[tuple[str, bool]], redeliver: int, commit: bool) -> None:
        keys = []
        for plate, reject in new:
            self.next_read += 1
            keys.append((f"cam|id|r{self.next_read}", plate, reject))
        # Redeliveries: unacknowledged reads come back, and so do some acknowledged ones (crash
        # between COMMIT and PUBACK, QoS 1 dup).
        for key in (self.unacked + list(self.acked))[:redeliver]:
            keys.append((key, PLATES[0], key.endswith("x")))
        items = self._items(keys)
        if not commit:
            self._crash_during(items)
            self.unacked.extend(k for k, _, _ in keys if k not in self.acked and k not in self.unacked)
            return
        results = self.j.record_batch(
            items, serial_prefix=PREFIX, build_body=body, repeat_rule=repeat_rule, now=self.now, exits=EXIT_RULES
        )
        assert len(results) == len(items)
        for i, ((key, _, _), result) in enumerate(zip(keys, results, strict=True)):
            if result.outcome == "duplicate":  # only a read already committed, or earlier in this batch
                assert key in self.acked or key in {k for k, _, _ in keys[:i]}
            if result.outcome is Recorded.ENTRY:
                assert result.out_serial_number is not None
                assert result.out_serial_number not in self.serials_seen, "out_serial_number reused"
                self.serials_seen[result.out_serial_number] = result.id
            self.acked.setdefault(key, self.now)
            if key in self.unacked:
                self.unacked.remove(key)
        self.now += 1

    def _crash_during(self, items: Sequence[tuple[Entry | ExitRead | Rejection, Inbound]]) -> None:
        """A kill -9 in the middle of the batch's transaction: the connection dies before COMMIT."""
        assert self.dir is not None
        db = sqlite3.connect(self.dir / "journal.sqlite3", isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO events (kind, state, dedup_key, received_at, updated_at, reason) "
            "VALUES ('rejected', 'rejected', 'half-written', ?, ?, 'no_plate')",
            (self.now, self.now),
        )
        db.close()  # no COMMIT: SQLite rolls it back, as after a real crash

    @rule(
        limit=st.integers(min_value=1, max_value=5),
        outcome=st.sampled_from(["sent", "duplicate", "retry", "uncertain", "dead", "pause"]),
    )
    def deliver(self, limit: int, outcome: str) -> None:
        due = self.j.due(self.now, limit)
        marks: list[Marked] = []
        for entry in due:
            assert entry.body.startswith(b'{"out_serial_number":"' + entry.out_serial_number.encode())
            row = self.j.get(entry.id)
            assert row is not None and row["kind"] == entry.kind.value
            if row["depends_on"] is not None:  # an exit (or an entry behind an inferred exit): after it
                first = self.j.get(row["depends_on"])
                assert first is not None and first["state"] == "sent", "due before its prerequisite was sent"
            if entry.kind is Kind.EXIT:
                assert requests.parse_exit_body(entry.body).out_serial_number == entry.out_serial_number
            if outcome == "sent" and entry.kind is Kind.EXIT:
                marks.append(Marked(entry.id, policy.Sent(None), self.now))  # 204: no serial_number
            elif outcome == "sent":
                marks.append(Marked(entry.id, policy.Sent(f"WX{entry.id}"), self.now))
            elif outcome == "duplicate":
                marks.append(Marked(entry.id, policy.Sent(None, duplicate=True)))
            elif outcome == "dead":
                marks.append(Marked(entry.id, policy.Dead("PARAM_ERROR", "bad", "", "HTTP 400 PARAM_ERROR")))
            elif outcome == "pause":
                marks.append(Marked(entry.id, policy.Pause(policy.Scope.ALL, "HTTP 401 SIGN_ERROR")))
            else:
                retry = policy.Retry(self.now + 5, "HTTP 503")
                marks.append(Marked(entry.id, retry, None, uncertain=outcome == "uncertain"))
        self.j.mark_outcomes(marks, self.now)
        for mark in marks:
            if isinstance(mark.outcome, policy.Sent):
                self.sent[mark.id] = mark.outcome.serial_number
        self.now += 1

    @precondition(lambda self: bool(self.sent))
    @rule(outcome=st.sampled_from(["retry", "dead", "pause"]))
    def late_answers(self, outcome: str) -> None:
        """Answers journaled late, for rows already sent: the transition table only lets an outcome change a
        row in a state its event may leave, so a sent row stays sent."""
        late: dict[str, policy.Outcome] = {
            "retry": policy.Retry(self.now + 5, "late"),
            "dead": policy.Dead("PARAM_ERROR", "late", "", "HTTP 400"),
            "pause": policy.Pause(policy.Scope.ALL, "late"),
        }
        self.j.mark_outcomes([Marked(row_id, late[outcome]) for row_id in self.sent], self.now)

    @rule()
    def requeue_all_dead(self) -> None:
        self.j.requeue_dead(None, self.now)

    @rule()
    def requeue_all_with_rebuild(self) -> None:
        """`edgeagent retry --all --rebuild`: the bodies are rebuilt, the numbers kept."""
        self.j.requeue(None, self.now, include_pending=True, rebuild=lambda kind, old, camera, lane: old + b" ")

    @rule(data=st.data())
    def revive_some(self, data: st.DataObject) -> None:
        ids = [r["id"] for r in self.j.events(limit=1_000_000)]
        if ids:
            self.j.revive(data.draw(st.lists(st.sampled_from(ids), max_size=4)), self.now)

    @rule(days=st.integers(min_value=0, max_value=40))
    def time_passes_and_prune(self, days: int) -> None:
        self.now += days * 86400
        before = {r["id"] for r in self.j.events(limit=1_000_000)}
        self.j.prune(self.now)
        after = {r["id"] for r in self.j.events(limit=1_000_000)}
        self.pruned_ids |= before - after

    @rule()
    def expire(self) -> None:
        self.j.expire(self.now, max_age_s=30 * 86400)

    @precondition(lambda self: self.journal is not None)
    @rule()
    def restart(self) -> None:
        self.j.close()
        self.journal = Journal(self.j.path)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def journal_is_consistent(self) -> None:
        if self.journal is None:
            return
        rows = self.j.events(limit=1_000_000)
        by_key_count: dict[str, int] = {}
        ids = {r["id"] for r in rows}
        serials = [r["out_serial_number"] for r in rows if r["kind"] == "entry"]
        assert len(serials) == len(set(serials)), "two entries share an out_serial_number"
        for r in rows:
            if r["kind"] == "entry":
                assert self.serials_seen.get(r["out_serial_number"]) == r["id"]
            assert (r["kind"] == "rejected") == (r["state"] == "rejected"), "a read changed kind"
            if r["state"] == "sent" and r["kind"] == "exit":
                assert r["serial_number"] is None and r["acceptance"] in ("verified", "duplicate")
            elif r["state"] == "sent":
                assert r["serial_number"] == self.sent[r["id"]]
                assert r["acceptance"] == ("duplicate" if r["serial_number"] is None else "verified")
            else:
                assert r.get("serial_number") is None
        for row_id, serial in self.sent.items():
            if row_id in ids:
                row = next(r for r in rows if r["id"] == row_id)
                assert row["state"] == "sent" and row["serial_number"] == serial, "a sent entry changed state"
            else:
                assert row_id in self.pruned_ids
        # Every acknowledged read is still there, or was pruned as sent/rejected past retention.
        with sqlite3.connect(self.j.path) as db:
            keys = dict(db.execute("SELECT dedup_key, id FROM events").fetchall())
            states = dict(db.execute("SELECT dedup_key, state FROM events").fetchall())
            for key, count in db.execute("SELECT dedup_key, count(*) FROM events GROUP BY dedup_key"):
                by_key_count[key] = count
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert all(count == 1 for count in by_key_count.values())
        assert "half-written" not in keys, "a crashed transaction left a row behind"
        for key, acked_at in self.acked.items():
            if key not in keys:
                assert self.now - acked_at >= RETENTION_S, f"acknowledged read {key} lost"
                # Only sent and rejected rows are ever pruned; pending and dead entries stay (SPEC §6).
                assert self.last_states.get(key) in ("sent", "rejected", None), (
                    f"{self.last_states.get(key)} row {key} vanished"
                )
        self.last_states = {k: v for k, v in states.items()}

    # -- sessions (issue 10) ---------------------------------------------------------------------

    @rule(
        reads=st.lists(
            st.tuples(
                st.sampled_from(EXIT_PLATES), st.integers(min_value=-90, max_value=5), st.sampled_from(["X01", "X02"])
            ),
            min_size=1,
            max_size=4,
        ),
        redeliver=st.integers(min_value=0, max_value=2),
        commit=st.booleans(),
    )
    def record_exits(self, reads: list[tuple[str, int, str]], redeliver: int, commit: bool) -> None:
        """Exit reads, timed before or after now (camera clocks), some redelivered; or a crash mid-batch."""
        batch: list[ExitRead] = []
        for plate, offset, exit_number in reads:
            self.next_read += 1
            batch.append(make_exit(f"exit-cam|id|r{self.next_read}", plate, int(self.now) + offset, exit_number))
        batch += list(self.unacked_exits.values())[:redeliver]
        items: list[tuple[Entry | ExitRead | Rejection, Inbound]] = [(read, inbound(self.now)) for read in batch]
        if not commit:
            self._crash_during(items)
            for read in batch:
                if read.dedup_key not in self.acked:
                    self.unacked_exits[read.dedup_key] = read
            return
        results = self.j.record_batch(
            items, serial_prefix=PREFIX, build_body=body, repeat_rule=repeat_rule, now=self.now, exits=EXIT_RULES
        )
        for read, result in zip(batch, results, strict=True):
            if result.outcome is Recorded.EXIT:  # matched at once: the session's number, after its entry
                assert result.depends_on is not None
                entry = self.j.get(result.depends_on)
                assert entry is not None and entry["kind"] == "entry"
                assert entry["out_serial_number"] == result.out_serial_number
            elif result.outcome is Recorded.HELD:
                assert result.out_serial_number is None
            self.acked.setdefault(read.dedup_key, self.now)
            self.unacked_exits.pop(read.dedup_key, None)
        self.now += 1

    @rule(data=st.data(), misread=st.booleans(), offset=st.integers(min_value=-5, max_value=5), commit=st.booleans())
    def a_parked_car_leaves(self, data: st.DataObject, misread: bool, offset: int, commit: bool) -> None:
        """An exit read of a car that is in: its plate, or one confusable or province character off."""
        parked = [s["plate_number"] for s in self.j.sessions("open", limit=1_000_000)]
        if not parked:
            return
        plate = data.draw(st.sampled_from(parked))
        if misread:
            plate = data.draw(st.sampled_from(EXIT_RULES.lookup_plates(plate)[1:]))
        self.record_exits([(plate, offset, "X03")], redeliver=0, commit=commit)

    @rule(plate=st.sampled_from(PLATES))
    def read_leaving_before_its_entry_arrives(self, plate: str) -> None:
        """Camera clocks, MQTT order: the exit read is journaled first (held), its entry a batch later."""
        self.record_exits([(plate, 0, "X04")], redeliver=0, commit=True)
        self.record_batch([(plate, False)], redeliver=0, commit=True)

    @rule(seconds=st.sampled_from([0, 1, 10, HOLD_S - 1, HOLD_S, 120, 3600]))
    def time_passes_and_rematch(self, seconds: float) -> None:
        self.now += seconds
        before = {r["id"]: r["state"] for r in self.j.events(limit=1_000_000) if r["kind"] == "exit"}
        matched, orphaned = self.j.rematch(EXIT_RULES, self.now, self.now)
        assert not set(matched) & set(orphaned)
        for row_id in matched:
            assert before[row_id] in ("held", "orphan")
            row = self.j.get(row_id)
            assert row is not None and row["state"] == "pending" and row["match"] in ("exact", "fuzzy")
        for row_id in orphaned:
            assert before[row_id] == "held"
            row = self.j.get(row_id)
            assert row is not None and row["state"] == "orphan" and row["hold_until"] <= self.now

    def _ids(self, kind: str, states: tuple[str, ...] = ()) -> list[int]:
        return [
            r["id"]
            for r in self.j.events(limit=1_000_000)
            if r["kind"] == kind and (not states or r["state"] in states)
        ]

    @rule(data=st.data())
    def attach(self, data: st.DataObject) -> None:
        """`edgeagent attach`: mostly an orphan to an open session, sometimes anything to anything."""
        exits = self._ids("exit", ("held", "orphan")) if data.draw(st.booleans()) else self._ids("exit")
        serials = [r["out_serial_number"] for r in self.j.events(limit=1_000_000) if r["kind"] == "entry"]
        if not exits or not serials:
            return
        exit_id = data.draw(st.sampled_from(exits))
        serial = data.draw(st.sampled_from([*serials, "HY1NOSUCH"]))
        before = self.j.get(exit_id)
        problem = self.j.attach(exit_id, serial, EXIT_RULES, self.now)
        after = self.j.get(exit_id)
        assert before is not None and after is not None
        if problem is None:
            assert before["state"] in ("held", "orphan")
            assert (after["state"], after["match"], after["out_serial_number"]) == ("pending", "manual", serial)
        else:
            assert after == before, f"a refused attach changed the row: {problem}"

    @rule(data=st.data())
    def dismiss(self, data: st.DataObject) -> None:
        ids = self._ids("exit") + self._ids("entry")[:2]
        if not ids:
            return
        row_id = data.draw(st.sampled_from(ids))
        before = self.j.get(row_id)
        problem = self.j.dismiss(row_id, self.now)
        after = self.j.get(row_id)
        assert before is not None and after is not None
        if problem is None:
            assert before["state"] in ("held", "orphan") and after["state"] == "dismissed"
        else:
            assert after == before

    @rule(data=st.data(), earlier=st.integers(min_value=0, max_value=7200))
    def close(self, data: st.DataObject, earlier: int) -> None:
        """`edgeagent close OUT_SERIAL --at`: a manual exit, clamped to entry + 1, or a refusal."""
        entries = [r for r in self.j.events(limit=1_000_000) if r["kind"] == "entry"]
        if not entries:
            return
        entry = data.draw(st.sampled_from(entries))
        result = self.j.close_session(entry["out_serial_number"], self.now - earlier, EXIT_RULES, self.now)
        if isinstance(result, int):
            row = self.j.get(result)
            assert row is not None and (row["match"], row["depends_on"]) == ("manual", entry["id"])
            assert row["exit_timestamp"] >= entry["enter_timestamp"] + 1

    @invariant()
    def sessions_are_consistent(self) -> None:
        if self.journal is None:
            return
        rows = self.j.events(limit=1_000_000)
        by_id = {r["id"]: r for r in rows}
        exits = [r for r in rows if r["kind"] == "exit"]
        numbered = [r["out_serial_number"] for r in exits if r["out_serial_number"] is not None]
        assert len(numbered) == len(set(numbered)), "a number with two exits"
        sessions = [r["depends_on"] for r in exits if r["depends_on"] is not None]
        assert len(sessions) == len(set(sessions)), "a session with two exits"
        for x in exits:
            if x["state"] in ("held", "orphan", "dismissed"):
                assert x["out_serial_number"] is None and x["depends_on"] is None, f"unmatched exit numbered: {x}"
                assert self.j.body_of(x["id"]) is None
                continue
            assert x["state"] in ("pending", "sent", "dead"), x
            assert x["depends_on"] is not None
            if x["id"] in self.exit_of:
                assert self.exit_of[x["id"]] == x["depends_on"], "an exit moved to another session"
            self.exit_of[x["id"]] = x["depends_on"]
            entry = by_id.get(x["depends_on"])
            if entry is None:  # pruned: only once sent, and then the exit is sent too
                assert x["state"] == "sent", f"an unsent exit lost its entry: {x}"
                continue
            assert entry["kind"] == "entry" and entry["out_serial_number"] == x["out_serial_number"]
            if x["state"] == "sent":
                assert entry["state"] == "sent", "an exit sent before its entry"
            exit_body = self.j.body_of(x["id"])
            assert exit_body is not None
            sent_as = requests.parse_exit_body(exit_body)
            assert (sent_as.out_serial_number, sent_as.plate_number) == (
                entry["out_serial_number"],
                entry["plate_number"],
            )
            assert sent_as.exit_timestamp >= entry["enter_timestamp"] + (1 if x["clamped"] else 0)
        for r in rows:  # an entry behind an inferred exit: that exit closes an earlier stay of the same plate
            closing = by_id.get(r["depends_on"]) if r["kind"] == "entry" and r["depends_on"] is not None else None
            if closing is not None:
                assert closing["kind"] == "exit" and closing["match"] == "inferred"
                if r["state"] == "sent":
                    assert closing["state"] == "sent", "a re-entry sent before the inferred exit of the previous stay"

    def teardown(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


JournalMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_journal_state_machine = JournalMachine.TestCase
