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
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgeagent import policy
from edgeagent.journal import RETENTION_S, Journal, Marked
from edgeagent.model import CarType, Entry, Inbound, PlateColor, Reason, Rejection, TimeSource, VehicleType
from edgeagent.screening import repeat_of

pytestmark = pytest.mark.slow

PREFIX = "HY1"
PLATES = [f"粤B{n:05d}" for n in range(12)]


def body(entry: Entry, serial: str) -> bytes:
    return f'{{"out_serial_number":"{serial}","plate_number":"{entry.plate_number}"}}'.encode()


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
            items, serial_prefix=PREFIX, build_body=body, repeat_rule=repeat_rule, now=self.now
        )
        assert len(results) == len(items)
        for i, ((key, _, _), result) in enumerate(zip(keys, results, strict=True)):
            if result.outcome == "duplicate":  # only a read already committed, or earlier in this batch
                assert key in self.acked or key in {k for k, _, _ in keys[:i]}
            if result.out_serial_number is not None:
                assert result.out_serial_number not in self.serials_seen, "out_serial_number reused"
                self.serials_seen[result.out_serial_number] = result.id
            self.acked.setdefault(key, self.now)
            if key in self.unacked:
                self.unacked.remove(key)
        self.now += 1

    def _crash_during(self, items: list[tuple[Entry | Rejection, Inbound]]) -> None:
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
            if outcome == "sent":
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
        serials = [r["out_serial_number"] for r in rows if r["state"] != "rejected"]
        assert len(serials) == len(set(serials)), "two entries share an out_serial_number"
        for r in rows:
            if r["state"] != "rejected":
                assert self.serials_seen.get(r["out_serial_number"]) == r["id"]
            assert (r["kind"] == "rejected") == (r["state"] == "rejected"), "a read changed kind"
            if r["state"] == "sent":
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

    def teardown(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


JournalMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_journal_state_machine = JournalMachine.TestCase
