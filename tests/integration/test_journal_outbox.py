"""The journal as an outbox (issue 9), on real SQLite files: migration 4 from a schema-3 journal, one number
per kind, re-queueing with rebuilt bodies, reviving, and the latency shown in `status` (SPEC §1, §5, §6, §7).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgeagent import policy, requests
from edgeagent.config import EntranceConfig
from edgeagent.journal import MIGRATIONS, Journal, Marked, Rebuild
from edgeagent.model import Inbound, Reason, Rejection
from edgeagent.requests import Kind
from tests.unit.outbox_fakes import T0, make_entry, no_repeats, record_entries

EPOCH = "EPOCH1"
PREFIX = "P1G1"


def serial(row_id: int) -> str:
    return f"{PREFIX}{EPOCH}{row_id:010d}"


def v3_journal(path: Path, rows: list[tuple[int, str]], pruned: list[int]) -> None:
    """A journal as schema version 3 left it: `rows` (id, state), then `pruned` ids written and deleted."""
    db = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:3], start=1):
        db.execute("BEGIN")
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
        if number == 1:
            db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (EPOCH,))
        db.execute(f"PRAGMA user_version = {number}")
        db.execute("COMMIT")
    for row_id, state in sorted([*rows, *((i, "sent") for i in pruned)]):
        if state == "rejected":
            db.execute(
                "INSERT INTO events (id, state, dedup_key, camera, received_at, updated_at, reason) "
                "VALUES (?, 'rejected', ?, 'south-1', ?, ?, 'no_plate')",
                (row_id, f"south-1|rej|{row_id}", T0, T0),
            )
            continue
        body = requests.entry_body(make_entry(row_id), serial(row_id))
        sent = state == "sent"
        db.execute(
            "INSERT INTO events (id, state, dedup_key, camera, lane, received_at, updated_at, out_serial_number, "
            "plate_number, enter_timestamp, body, attempts, serial_number, sent_at, time_source, clock_synced) "
            "VALUES (?, ?, ?, 'south-1', '1', ?, ?, ?, ?, ?, ?, ?, ?, ?, 'camera', 1)",
            (
                row_id,
                state,
                f"south-1|id|old{row_id}",
                T0,
                T0,
                serial(row_id),
                f"粤B{row_id:05d}",
                int(T0),
                body,
                1 if state != "pending" else 0,
                f"WX{row_id}" if sent else None,
                T0 + 7 if sent else None,
            ),
        )
    db.execute(f"DELETE FROM events WHERE id IN ({','.join('?' * len(pruned))})", pruned)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    db.close()


def rows_of(journal: Journal) -> dict[int, dict[str, object]]:
    return {int(r["id"]): r for r in journal.events(limit=1000)}


# -- migration 4 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "pruned", "next_id"),
    [
        ([(1, "sent"), (2, "pending"), (3, "rejected"), (4, "dead")], [5, 6, 7], 8),
        ([], [1, 2, 3], 4),  # every row pruned: the table is empty, only the sequence remembers
        ([(1, "pending")], [], 2),
    ],
    ids=["highest-pruned", "all-pruned", "nothing-pruned"],
)
def test_migration_4_never_reuses_an_id_or_a_number(
    tmp_path: Path, rows: list[tuple[int, str]], pruned: list[int], next_id: int
) -> None:
    path = tmp_path / "journal.sqlite3"
    v3_journal(path, rows, pruned)
    journal = Journal(path)
    new = record_entries(journal, [900], T0 + 60)
    assert [r.id for r in new] == [next_id]
    assert new[0].out_serial_number == serial(next_id)  # same epoch, next id: never one handed out before
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    journal.close()


def test_migration_4_keeps_every_row_and_labels_it(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    v3_journal(path, [(1, "sent"), (2, "pending"), (3, "rejected"), (4, "dead")], [5])
    journal = Journal(path)
    rows = rows_of(journal)
    assert {i: (r["kind"], r["state"]) for i, r in rows.items()} == {
        1: ("entry", "sent"),
        2: ("entry", "pending"),
        3: ("rejected", "rejected"),
        4: ("entry", "dead"),
    }
    assert (rows[1]["acceptance"], rows[1]["answered_at"], rows[1]["serial_number"]) == ("verified", T0 + 7, "WX1")
    assert all(rows[i]["acceptance"] is None for i in (2, 3, 4))
    assert [rows[i]["out_serial_number"] for i in (1, 2, 4)] == [serial(1), serial(2), serial(4)]
    assert journal.body_of(2) == requests.entry_body(make_entry(2), serial(2))
    assert [d.id for d in journal.due(T0 + 60, 10)] == [2]  # the pending entry is still to be delivered
    journal.close()
    again = Journal(path)  # reopening does not migrate twice
    assert rows_of(again) == rows
    again.close()


# -- one number per kind ----------------------------------------------------------------------------------


def insert_exit(db: sqlite3.Connection, key: str, number: str, depends_on: int) -> None:
    db.execute(
        "INSERT INTO events (kind, state, dedup_key, received_at, updated_at, out_serial_number, body, depends_on) "
        "VALUES ('exit', 'pending', ?, ?, ?, ?, ?, ?)",
        (key, T0, T0, number, b"{}", depends_on),
    )


def test_an_exit_shares_its_entrys_number_but_a_number_has_one_exit(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    entry = record_entries(journal, [1], T0)[0]
    number = entry.out_serial_number
    assert number is not None
    journal.close()
    with sqlite3.connect(tmp_path / "journal.sqlite3") as db:
        insert_exit(db, "south-2|id|x1", number, entry.id)
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            insert_exit(db, "south-2|id|x2", number, entry.id)
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            db.execute(
                "INSERT INTO events (kind, state, dedup_key, received_at, updated_at, out_serial_number) "
                "VALUES ('entry', 'pending', 'south-1|id|again', ?, ?, ?)",
                (T0, T0, number),
            )
        kinds = db.execute("SELECT kind FROM events WHERE out_serial_number = ? ORDER BY id", (number,)).fetchall()
    assert kinds == [("entry",), ("exit",)]


# -- re-queueing -------------------------------------------------------------------------------------------


def marked(journal: Journal, *marks: Marked) -> None:
    journal.mark_outcomes(list(marks), T0 + 10)


def dead(row_id: int) -> Marked:
    return Marked(row_id, policy.Dead("PARAM_ERROR", "停车场不存在", '{"field":"parking_id"}', "HTTP 400"))


def rebuild_for(parking_id: str) -> Rebuild:
    def rebuild(kind: Kind, body: bytes, camera: str | None, lane: str | None) -> bytes:
        assert kind is Kind.ENTRY and camera == "south-1"
        entrance = EntranceConfig("A02", "新入口", ("south-1",), None, ())
        return requests.rebuild_entry_body(body, parking_id, entrance)

    return rebuild


def test_requeue_rebuild_rebuilds_bodies_but_keeps_the_uncertain(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    ids = [r.id for r in record_entries(journal, [1, 2, 3, 4], T0)]
    numbers = {r["id"]: r["out_serial_number"] for r in journal.events(limit=10)}
    old = {i: journal.body_of(i) for i in ids}
    # 1: refused at once. 2: timed out first (the API may have accepted it), then refused. 3: pending.
    marked(journal, dead(ids[0]))
    marked(journal, Marked(ids[1], policy.Retry(T0 + 11, "timed out"), None, uncertain=True))
    marked(journal, dead(ids[1]))
    marked(journal, Marked(ids[3], policy.Sent("WX4"), T0 + 10))

    requeued, kept = journal.requeue(None, T0 + 20, include_pending=True, rebuild=rebuild_for("WXPARK002"))
    assert (requeued, kept) == (ids[:3], [ids[1]])
    for i in (ids[0], ids[2]):
        doc = requests.parse_entry_body(journal.body_of(i) or b"")
        assert (doc.parking_id, doc.entrance_number, doc.out_serial_number) == ("WXPARK002", "A02", numbers[i])
    assert journal.body_of(ids[1]) == old[ids[1]]  # may already be accepted under its old body: left as it is
    assert journal.body_of(ids[3]) == old[ids[3]]  # sent: never re-queued
    rows = rows_of(journal)
    assert [rows[i]["state"] for i in ids] == ["pending", "pending", "pending", "sent"]
    assert [d.id for d in journal.due(T0 - 1000, 10)] == ids[:3]  # due at once, whatever the clock says
    assert journal.requeued_since(T0 + 20)
    journal.close()


def test_requeue_without_include_pending_takes_only_the_dead(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    ids = [r.id for r in record_entries(journal, [1, 2], T0)]
    marked(journal, dead(ids[0]))
    assert journal.requeue(None, T0 + 20) == ([ids[0]], [])
    assert journal.requeue_dead([ids[1]], T0 + 20) == []
    journal.close()


def test_rejected_rows_are_never_requeued(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    inbound = Inbound("anpr/south-1/plate", T0, "0" * 64, 10, b"{}")
    rejected = journal.record_batch(
        [(Rejection("south-1", "1", "south-1|rej|x", Reason.NO_PLATE, "no plate"), inbound)],
        serial_prefix=PREFIX,
        build_body=requests.entry_body,
        repeat_rule=no_repeats,
        now=T0,
    )[0]
    assert journal.requeue([rejected.id], T0 + 20, include_pending=True) == ([], [])
    assert journal.requeue(None, T0 + 20, include_pending=True) == ([], [])
    row = rows_of(journal)[rejected.id]
    assert (row["kind"], row["state"]) == ("rejected", "rejected")
    journal.close()


def test_revive_brings_back_the_dead_of_a_run_without_counting_as_a_requeue(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    ids = [r.id for r in record_entries(journal, [1, 2, 3], T0)]
    marked(journal, dead(ids[0]), dead(ids[1]), Marked(ids[2], policy.Sent("WX3"), T0 + 10))
    assert journal.revive([*ids, 999], T0 + 30) == ids[:2]
    rows = rows_of(journal)
    assert [rows[i]["state"] for i in ids] == ["pending", "pending", "sent"]
    assert [d.id for d in journal.due(T0 + 30, 10)] == ids[:2]
    assert not journal.requeued_since(T0)  # not a technician's retry: it does not lift a pause
    assert journal.revive([], T0) == []
    journal.close()


# -- latency ------------------------------------------------------------------------------------------------


def test_latency_counts_from_the_cameras_read_not_our_receipt(tmp_path: Path) -> None:
    # A read the camera kept a minute (offline re-send, a slow link) is a minute late for WeChat too.
    journal = Journal(tmp_path / "journal.sqlite3")
    [late] = record_entries(journal, [7], T0, when=int(T0) - 60)
    marked(journal, Marked(late.id, policy.Sent("WX7"), T0 + 1))
    assert journal.latencies(Kind.ENTRY, T0) == [61.0]


def test_latencies_are_camera_read_to_verified_answer(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    ids = [r.id for r in record_entries(journal, [1, 2, 3, 4], T0)]
    marked(
        journal,
        Marked(ids[0], policy.Sent("WX1"), T0 + 5),
        Marked(ids[1], policy.Sent("WX2"), T0 + 2),
        Marked(ids[2], policy.Sent(None, duplicate=True), T0 + 1),  # no verified answer: not a latency
        Marked(ids[3], policy.Retry(T0 + 20, "HTTP 503"), T0 + 3),
    )
    assert journal.latencies(Kind.ENTRY, T0) == [2.0, 5.0]
    assert journal.latencies(Kind.ENTRY, T0 + 3) == [5.0]
    assert journal.latencies(Kind.EXIT, T0) == []
    rows = rows_of(journal)
    assert [rows[i]["acceptance"] for i in ids] == ["verified", "verified", "duplicate", None]
    journal.close()


def test_an_entry_body_is_built_once_and_kept(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    record = record_entries(journal, [1], T0)[0]
    body = journal.body_of(record.id)
    assert body == record.body == requests.entry_body(make_entry(1), record.out_serial_number or "")
    marked(journal, Marked(record.id, policy.Retry(T0 + 11, "HTTP 503"), None, uncertain=True))
    assert journal.body_of(record.id) == body
    journal.close()
