"""The journal against a real SQLite file (SPEC §6): durability settings, one entry per read, one
number per entry, pruning, dead letters, and readers that never block the writer."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent import policy
from edgeagent.errors import JournalError
from edgeagent.journal import MIGRATIONS, RETENTION_S, Journal, Marked, RecentLookup, Record, Recorded
from edgeagent.model import (
    REJECTED_PAYLOAD_CAP,
    CarType,
    Entry,
    Inbound,
    PlateColor,
    Reason,
    Rejection,
    TimeSource,
    VehicleType,
)
from edgeagent.requests import entry_body
from edgeagent.screening import repeat_of
from edgeagent.status import event_view

T0 = 1_720_078_200.0
DAY = 86400.0
PREFIX = "P1G1"


def make_entry(plate: str = "粤B12345", key: str | None = None, ts: float = T0, camera: str = "south-1") -> Entry:
    return Entry(
        camera=camera,
        lane="1",
        dedup_key=key or f"{camera}|id|{plate}-{ts}",
        plate_number=plate,
        plate_color=PlateColor.BLUE,
        vehicle_type=VehicleType.SMALL,
        car_type=CarType.TEMPORARY,
        enter_timestamp=int(ts),
        time_source=TimeSource.CAMERA,
        clock_synced=True,
        entrance_number="A01",
        entrance_name="南门入口",
        parking_id="WXPARK001",
        discount_template_id=(1001,),
        confidence=0.97,
    )


def make_rejection(key: str, reason: Reason = Reason.MALFORMED, camera: str = "south-1") -> Rejection:
    return Rejection(camera, None, key, reason, "invalid JSON at line 1 column 2")


def inbound(payload: bytes = b'{"plate": "x"}', received_at: float = T0) -> Inbound:
    return Inbound("anpr/south-1/plate", received_at, f"sha-{len(payload)}", len(payload), payload)


def window_rule(window: float) -> Any:
    """The repeat rule the daemon gives the journal, for a window of `window` seconds."""

    def rule(entry: Entry, recent: RecentLookup) -> Rejection | None:
        return repeat_of(entry, recent, window)

    return rule


def mark(journal: Journal, outcomes: list[tuple[int, str, dict[str, Any]]], now: float) -> None:
    """Journal outcomes written the short way: (id, "sent" | "retry" | "dead", fields)."""
    marks = []
    for row_id, kind, data in outcomes:
        outcome: policy.Outcome
        if kind == "sent":
            outcome = policy.Sent(data["serial_number"])
        elif kind == "retry":
            outcome = policy.Retry(data["next_at"], data["error"])
        else:
            outcome = policy.Dead("", "", "", data["error"])
        marks.append(Marked(row_id, outcome))
    journal.mark_outcomes(marks, now)


class Writer:
    """The journal as the ingest loop uses it, with the real request-body builder."""

    def __init__(self, path: Path) -> None:
        self.journal = Journal(path)

    def record(self, *items: Entry | Rejection, now: float = T0, window: float = 120) -> list[Record]:
        return self.journal.record_batch(
            [(item, inbound(received_at=now)) for item in items],
            serial_prefix=PREFIX,
            build_body=entry_body,
            repeat_rule=window_rule(window),
            now=now,
        )

    def state(self, row_id: int) -> str:
        row = self.journal.get(row_id)
        assert row is not None
        return str(row["state"])


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


@pytest.fixture
def writer(path: Path) -> Iterator[Writer]:
    w = Writer(path)
    yield w
    w.journal.close()


def test_wal_and_full_sync_are_really_set(writer: Writer, path: Path) -> None:
    assert writer.journal._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL, on the writing connection
    other = sqlite3.connect(path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file itself
        assert other.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        other.close()
    assert writer.journal.integrity_check() == "ok"


def test_an_entry_is_journaled_with_its_number_and_body(writer: Writer) -> None:
    [result] = writer.record(make_entry())
    assert result.outcome == "entry"
    assert result.out_serial_number is not None
    row = writer.journal.get(result.id)
    assert row is not None
    assert row["state"] == "pending"
    assert row["out_serial_number"] == result.out_serial_number
    assert (row["plate_number"], row["plate_color"], row["vehicle_type"]) == (
        "粤B12345",
        "PLATE_COLOR_BLUE",
        "VEHICLE_TYPE_SMALL",
    )
    assert (row["entrance_number"], row["enter_timestamp"], row["attempts"]) == ("A01", int(T0), 0)
    assert row["serial_number"] is None and row["last_error"] is None
    body = writer.journal.body_of(result.id)
    assert body is not None
    # The exact bytes to send are built once, with the entry's number, and kept.
    assert body == entry_body(make_entry(), result.out_serial_number)
    assert json.loads(body)["out_serial_number"] == result.out_serial_number


def test_rows_survive_closing_and_reopening(writer: Writer, path: Path) -> None:
    [first] = writer.record(make_entry())
    writer.journal.close()
    again = Writer(path)
    try:
        assert again.journal.get(first.id) is not None
        [second] = again.record(make_entry("京A00599"))
        assert second.id == first.id + 1
        assert first.out_serial_number is not None and second.out_serial_number is not None
        assert second.out_serial_number[:-10] == first.out_serial_number[:-10]  # same journal epoch
    finally:
        again.journal.close()


def test_a_redelivered_read_is_a_no_op(writer: Writer) -> None:
    [first] = writer.record(make_entry(key="south-1|id|e1"))
    [again] = writer.record(make_entry(key="south-1|id|e1"))
    assert again == Record(Recorded.DUPLICATE, first.id)
    # Within one batch too (the broker can hand over a redelivery right behind the original).
    results = writer.record(make_entry("京A00599", key="k2"), make_entry("京A00599", key="k2"))
    assert [r.outcome for r in results] == ["entry", "duplicate"]
    assert writer.journal.counts() == {"pending": 2, "sent": 0, "dead": 0, "rejected": 0}
    # A rejected read redelivered is a no-op as well.
    [rej] = writer.record(make_rejection("south-1|rej|abc"))
    assert writer.record(make_rejection("south-1|rej|abc")) == [Record(Recorded.DUPLICATE, rej.id)]
    assert writer.journal.counts()["rejected"] == 1


def test_a_repeated_read_within_the_window_is_not_a_second_entry(writer: Writer) -> None:
    [first] = writer.record(make_entry(key="e1", ts=T0))
    [repeat] = writer.record(make_entry(key="e2", ts=T0 + 60))
    assert repeat.outcome == "repeat"
    row = writer.journal.get(repeat.id)
    assert row is not None
    assert (row["state"], row["reason"], row["plate_number"]) == ("rejected", "repeat", "粤B12345")
    assert f"entry #{first.id}" in row["detail"]
    assert row["out_serial_number"] is None  # a repeat never gets a number
    # The repeat's own redelivery is a no-op, not a second repeat row.
    assert writer.record(make_entry(key="e2", ts=T0 + 60)) == [Record(Recorded.DUPLICATE, repeat.id)]
    # Outside the window it is a new visit; earlier reads count too (a camera re-sending late).
    assert writer.record(make_entry(key="e3", ts=T0 + 121))[0].outcome == "entry"
    assert writer.record(make_entry(key="e4", ts=T0 - 100))[0].outcome == "repeat"
    assert writer.journal.counts() == {"pending": 2, "sent": 0, "dead": 0, "rejected": 2}


def test_repeat_window_counts_sent_and_dead_entries_but_not_rejected_rows(writer: Writer) -> None:
    [sent] = writer.record(make_entry("京A00599", key="a1"))
    [dead] = writer.record(make_entry("沪A88888", key="b1"))
    mark(writer.journal, [(sent.id, "sent", {"serial_number": "WX1"}), (dead.id, "dead", {"error": "x"})], T0)
    assert writer.record(make_entry("京A00599", key="a2", ts=T0 + 5))[0].outcome == "repeat"
    assert writer.record(make_entry("沪A88888", key="b2", ts=T0 + 5))[0].outcome == "repeat"
    writer.journal.record_batch(
        [(Rejection("south-1", None, "r1", Reason.LOW_CONFIDENCE, "low", plate_number="粤C11111"), inbound())],
        serial_prefix=PREFIX,
        repeat_rule=window_rule(120),
        build_body=entry_body,
        now=T0,
    )
    assert writer.record(make_entry("粤C11111", key="c1"))[0].outcome == "entry"


def test_out_serial_numbers_are_short_alphanumeric_and_unique(writer: Writer, tmp_path: Path) -> None:
    results = writer.record(*(make_entry(f"粤B{i:05d}") for i in range(200)))
    serials = [r.out_serial_number for r in results]
    assert all(s is not None and re.fullmatch(r"[A-Za-z0-9]{1,32}", s) and s.startswith(PREFIX) for s in serials)
    assert len(set(serials)) == 200
    # The longest allowed prefix still fits the API's limit for this project (≤ 32).
    assert len(writer.journal.serial_for("ABCDEFGHIJKL", 9_999_999_999)) <= 32
    # Another journal file (a re-installed agent) starts its ids at 1 again but never repeats a number.
    other = Writer(tmp_path / "other" / "journal.sqlite3")
    try:
        [again] = other.record(make_entry("粤B00000"))
        assert again.id == results[0].id
        assert again.out_serial_number != results[0].out_serial_number
    finally:
        other.journal.close()


def test_numbers_are_never_reused_after_pruning(writer: Writer) -> None:
    old = writer.record(make_entry("粤B00001"), make_rejection("r1"), make_entry("粤B00002"))
    mark(writer.journal, [(r.id, "sent", {"serial_number": f"WX{r.id}"}) for r in old], T0)
    assert writer.journal.prune(T0 + RETENTION_S + 1) == 3
    assert writer.journal.counts() == {"pending": 0, "sent": 0, "dead": 0, "rejected": 0}
    [new] = writer.record(make_entry("粤B00003"), now=T0 + RETENTION_S + 2)
    assert new.id > max(r.id for r in old)
    assert new.out_serial_number not in {r.out_serial_number for r in old}


def test_rejected_reads_keep_a_capped_payload(writer: Writer) -> None:
    big = b"{" + b'"x": "' + b"y" * 20_000 + b'"}'
    [result] = writer.journal.record_batch(
        [(Rejection("south-1", "2", "r-big", Reason.UNMAPPED_LANE, "d" * 2000), inbound(big))],
        serial_prefix=PREFIX,
        repeat_rule=window_rule(120),
        build_body=entry_body,
        now=T0,
    )
    kept = writer.journal.payload_of(result.id)
    assert kept is not None
    assert kept == big[:REJECTED_PAYLOAD_CAP]
    row = writer.journal.get(result.id)
    assert row is not None
    assert (row["reason"], row["lane"], row["payload_size"]) == ("unmapped_lane", "2", len(big))
    assert len(row["detail"]) == 500
    # Entries keep the request body, never the raw payload.
    [entry] = writer.record(make_entry())
    assert writer.journal.payload_of(entry.id) is None


def test_an_entry_the_api_would_refuse_is_rejected_not_lost(writer: Writer) -> None:
    def refuse(entry: Entry, serial: str) -> bytes:
        raise ValueError("entrance_name: contains a control character")

    [result] = writer.journal.record_batch(
        [(make_entry(), inbound())], serial_prefix=PREFIX, repeat_rule=window_rule(120), build_body=refuse, now=T0
    )
    assert result.outcome == "rejected"
    row = writer.journal.get(result.id)
    assert row is not None
    assert (row["state"], row["reason"], row["plate_number"]) == ("rejected", "bad_field", "粤B12345")
    assert row["detail"] == "entrance_name: contains a control character"


def test_prune_rules(writer: Writer) -> None:
    pending, sent, dead, recent = writer.record(
        make_entry("粤B00001"), make_entry("粤B00002"), make_entry("粤B00003"), make_entry("粤B00004")
    )
    [rejected] = writer.record(make_rejection("r1"))
    mark(writer.journal, [(sent.id, "sent", {"serial_number": "WX1"}), (dead.id, "dead", {"error": "PARAM_ERROR"})], T0)
    mark(writer.journal, [(recent.id, "sent", {"serial_number": "WX2"})], T0 + 10 * DAY)

    assert writer.journal.prune(T0 + 29 * DAY) == 0
    assert writer.journal.prune(T0 + 31 * DAY) == 2  # the old sent entry and the old rejected read
    assert writer.journal.get(sent.id) is None
    assert writer.journal.get(rejected.id) is None
    assert writer.state(pending.id) == "pending"  # never pruned: it is not delivered yet
    assert writer.state(dead.id) == "dead"  # kept for a technician to act on
    assert writer.state(recent.id) == "sent"
    assert writer.journal.prune(T0 + 400 * DAY) == 1
    assert {writer.state(pending.id), writer.state(dead.id)} == {"pending", "dead"}


def test_old_pending_entries_expire_into_dead_letters(writer: Writer) -> None:
    [old] = writer.record(make_entry("粤B00001"), now=T0)
    [new] = writer.record(make_entry("粤B00002"), now=T0 + 6 * DAY)
    assert writer.journal.expire(T0 + 7 * DAY + 1, 7 * DAY) == 1
    row = writer.journal.get(old.id)
    assert row is not None
    assert row["state"] == "dead"
    assert row["last_error"].startswith("expired")
    assert writer.state(new.id) == "pending"


def test_a_requeued_expired_entry_gets_a_fresh_age(writer: Writer) -> None:
    [old] = writer.record(make_entry("粤B00001"), now=T0)
    assert writer.journal.expire(T0 + 8 * DAY, 7 * DAY) == 1
    # The technician fixes the uplink and re-queues it a day later: it must not expire again at once,
    # only when it has waited max_entry_age_s since the re-queue.
    assert writer.journal.requeue_dead(None, T0 + 9 * DAY) == [old.id]
    assert writer.journal.expire(T0 + 9 * DAY + 60, 7 * DAY) == 0
    assert writer.state(old.id) == "pending"
    assert writer.journal.expire(T0 + 16 * DAY + 1, 7 * DAY) == 1
    assert writer.state(old.id) == "dead"


def test_requeue_dead_keeps_the_number(writer: Writer) -> None:
    a, b, c = writer.record(make_entry("粤B00001"), make_entry("粤B00002"), make_entry("粤B00003"))
    mark(
        writer.journal,
        [(a.id, "dead", {"error": "PARAM_ERROR: bad"}), (b.id, "dead", {"error": "PARAM_ERROR: bad"})],
        T0,
    )
    body_before = writer.journal.body_of(a.id)

    assert writer.journal.requeue_dead([a.id, c.id, 999], T0 + 60) == [a.id]  # c is not dead, 999 does not exist
    row = writer.journal.get(a.id)
    assert row is not None
    assert (row["state"], row["out_serial_number"]) == ("pending", a.out_serial_number)
    assert writer.journal.body_of(a.id) == body_before
    assert [p.id for p in writer.journal.due(T0 + 60, 10)] == [a.id, c.id]
    assert writer.journal.requeue_dead(None, T0 + 60) == [b.id]
    assert writer.journal.counts()["dead"] == 0


def test_mark_outcomes_only_changes_pending_rows(writer: Writer) -> None:
    a, b, c = writer.record(make_entry("粤B00001"), make_entry("粤B00002"), make_entry("粤B00003"))
    mark(writer.journal, [(a.id, "sent", {"serial_number": "WX-A"}), (b.id, "dead", {"error": "E"})], T0)
    # Late outcomes from a second attempt must not undo a confirmed delivery or a dead letter.
    mark(
        writer.journal,
        [
            (a.id, "retry", {"next_at": T0 + 5, "error": "timeout"}),
            (a.id, "dead", {"error": "PARAM_ERROR"}),
            (b.id, "sent", {"serial_number": "WX-B"}),
            (c.id, "retry", {"next_at": T0 + 5, "error": "HTTP 503"}),
        ],
        T0 + 1,
    )
    row_a, row_b, row_c = (writer.journal.get(i) for i in (a.id, b.id, c.id))
    assert row_a is not None and row_b is not None and row_c is not None
    assert (row_a["state"], row_a["serial_number"], row_a["attempts"], row_a["last_error"]) == ("sent", "WX-A", 1, None)
    assert (row_b["state"], row_b["serial_number"]) == ("dead", None)
    assert (row_c["state"], row_c["attempts"], row_c["last_error"]) == ("pending", 1, "HTTP 503")
    assert writer.journal.due(T0 + 4, 10) == []
    assert [p.id for p in writer.journal.due(T0 + 5, 10)] == [c.id]


def test_mark_outcomes_is_all_or_nothing(writer: Writer) -> None:
    a, b = writer.record(make_entry("粤B00001"), make_entry("粤B00002"))
    broken = Marked(b.id, policy.Retry(T0, None))  # type: ignore[arg-type]  # fails inside the batch
    with pytest.raises(TypeError):
        writer.journal.mark_outcomes([Marked(a.id, policy.Sent("WX")), broken], T0)
    assert writer.state(a.id) == "pending"


def test_due_is_oldest_first_and_skips_entries_in_flight(writer: Writer) -> None:
    rows = writer.record(*(make_entry(f"粤B{i:05d}") for i in range(5)))
    ids = [r.id for r in rows]
    due = writer.journal.due(T0, 3, exclude=[ids[0]])
    assert [p.id for p in due] == ids[1:4]
    assert due[0].out_serial_number == rows[1].out_serial_number
    assert due[0].body == writer.journal.body_of(ids[1])
    assert writer.journal.next_due_at() == T0


def test_summaries_for_status(writer: Writer) -> None:
    a, _ = writer.record(make_entry("粤B00001"), make_entry("粤B00002", camera="north-1"), now=T0)
    writer.record(make_rejection("r1"), now=T0 + 30)
    mark(writer.journal, [(a.id, "sent", {"serial_number": "WX"})], T0 + 40)
    queue = writer.journal.queue_summary(T0 + 100)
    assert queue == {"pending": 1, "oldest_pending_age_s": 100.0, "dead": 0, "rejected": 1, "sent_24h": 1}
    cameras = writer.journal.camera_summary(T0 + 100)
    assert cameras == {"south-1": (T0 + 30, 2), "north-1": (T0, 1)}
    assert writer.journal.camera_summary(T0 + 2 * DAY)["south-1"] == (T0 + 30, 0)


def test_events_rows_have_the_cli_fields(writer: Writer) -> None:
    writer.record(make_entry("粤B00001"), make_rejection("r1"), make_entry("粤B00002"))
    rows = [event_view(row) for row in writer.journal.events()]  # as `edgeagent events --json` shows them
    assert [r["state"] for r in rows] == ["pending", "rejected", "pending"]  # newest first
    entry, rejected = rows[0], rows[1]
    entry_fields = ("id", "state", "camera", "lane", "received_at", "out_serial_number", "plate_number",
                    "plate_color", "vehicle_type", "entrance_number", "enter_timestamp", "attempts", "last_error",
                    "serial_number")  # fmt: skip
    for key in entry_fields:
        assert key in entry, key
    assert entry["received_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0))
    assert "reason" not in entry
    assert (rejected["reason"], rejected["camera"]) == ("malformed_payload", "south-1")
    assert "out_serial_number" not in rejected
    assert [r["state"] for r in writer.journal.events("rejected")] == ["rejected"]
    assert len(writer.journal.events(limit=1)) == 1


# -- readers ------------------------------------------------------------------------------------------


def test_reader_is_not_blocked_by_an_open_write_transaction(writer: Writer, path: Path) -> None:
    writer.record(make_entry("粤B00001"))
    other_writer = sqlite3.connect(path, isolation_level=None)
    try:
        other_writer.execute("BEGIN IMMEDIATE")  # holds the write lock, as the ingest thread does mid-batch
        other_writer.execute("UPDATE events SET plate_number = 'uncommitted'")
        started = time.monotonic()
        reader = Journal(path, readonly=True)
        try:
            rows = reader.events()
            assert time.monotonic() - started < 2  # the busy timeout is 5 s: no waiting happened
            assert [r["plate_number"] for r in rows] == ["粤B00001"]  # only committed data
            assert reader.queue_summary(T0)["pending"] == 1
        finally:
            reader.close()
        other_writer.execute("ROLLBACK")
    finally:
        other_writer.close()


def test_writer_is_not_blocked_by_a_reader_holding_a_snapshot(writer: Writer, path: Path) -> None:
    writer.record(make_entry("粤B00001"))
    reader = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 1
        started = time.monotonic()
        [result] = writer.record(make_entry("粤B00002"))
        assert result.outcome == "entry"
        assert time.monotonic() - started < 2
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 1  # its snapshot
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 2
    finally:
        reader.close()


def test_read_only_connection_cannot_write(writer: Writer, path: Path) -> None:
    [a] = writer.record(make_entry())
    mark(writer.journal, [(a.id, "dead", {"error": "E"})], T0)
    reader = Journal(path, readonly=True)
    try:
        with pytest.raises(JournalError):
            reader.requeue_dead(None, T0)
    finally:
        reader.close()
    assert writer.state(a.id) == "dead"


def test_read_only_open_of_a_missing_journal_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "state" / "journal.sqlite3"
    with pytest.raises(JournalError, match="journal not found"):
        Journal(missing, readonly=True)
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("directory", ["gate #1", "what?", "100%", "南门 state"])
def test_read_only_open_works_for_any_directory_name(tmp_path: Path, directory: str) -> None:
    path = tmp_path / directory / "journal.sqlite3"
    w = Writer(path)
    try:
        w.record(make_entry())
        reader = Journal(path, readonly=True)
        try:
            assert reader.counts()["pending"] == 1
        finally:
            reader.close()
    finally:
        w.journal.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory]  # no stray database files


# -- faults ---------------------------------------------------------------------------------------------


class CommitFails:
    """Wraps the real connection; the next COMMIT fails the way SQLITE_BUSY does: transaction left open."""

    def __init__(self, db: sqlite3.Connection, times: int = 1) -> None:
        self.db = db
        self.left = times

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.left > 0:
            self.left -= 1
            raise sqlite3.OperationalError("database is locked")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_a_busy_commit_is_tried_again_in_process_and_records_once(writer: Writer) -> None:
    real = writer.journal._db
    writer.journal._db = CommitFails(real, times=2)  # type: ignore[assignment]
    [result] = writer.record(make_entry("粤B00001", key="k1"))
    assert result.outcome == "entry"
    assert not real.in_transaction
    assert writer.journal.counts()["pending"] == 1


def test_a_failed_commit_loses_nothing_and_the_next_batch_works(writer: Writer) -> None:
    real = writer.journal._db
    writer.journal._db = CommitFails(real, times=3)  # type: ignore[assignment]  # past the in-process retries
    with pytest.raises(JournalError, match="database is locked"):
        writer.record(make_entry("粤B00001", key="k1"))
    assert not real.in_transaction
    # The ingest loop retries the same batch: it must go in once, as an entry.
    [result] = writer.record(make_entry("粤B00001", key="k1"))
    assert result.outcome == "entry"
    assert writer.journal.counts()["pending"] == 1
