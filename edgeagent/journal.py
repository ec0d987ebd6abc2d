"""The journal: SQLite in WAL mode with synchronous=FULL, the only state that matters (SPEC §6).

One table, `events`, holds entries (`pending` → `sent` | `dead`) and rejected reads side by side, so
one id space serves `events`, `retry` and the tests. A UNIQUE `dedup_key` makes every redelivery a
no-op: the vendor record id where there is one, else the capture time, else the payload digest.

Who writes: the ingest thread records batches (one transaction, one fsync per batch); the delivery
loop marks outcomes on its own connection. `status` and `events` open the file read-only.
The only module with SQL. sqlite3 errors are translated into `JournalError` here.
"""

from __future__ import annotations

import secrets
import sqlite3
import string
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.errors import JournalError
from edgeagent.model import Entry, EntryState, Reason, Rejection

RETENTION_S = 30 * 86400  # SPEC §6: sent and rejected rows are pruned after 30 days
MAX_REJECTED_ROWS = 100_000  # bound on inspection rows, whatever their age
REJECTED_PAYLOAD_CAP = 4096  # bytes of a rejected payload kept for inspection
SERIAL_DIGITS = 10
# SQLite's own page cache per connection (the daemon holds three). Its default, 2 MB each, mostly
# duplicates the kernel's page cache: intake appends at the right edge of each index and delivery
# reads the head of the pending one, so a few dozen pages do. Bench (issue 6): -4 MB VmRSS after a
# 20,000-read burst, the same intake rate.
CACHE_KIB = 256

MIGRATIONS: tuple[str, ...] = (
    # 1: the events table and its indexes.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: ids mint out_serial_numbers
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead', 'rejected')),
        dedup_key TEXT NOT NULL UNIQUE,
        camera TEXT,
        lane TEXT,
        topic TEXT,
        received_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        reason TEXT,
        detail TEXT,
        out_serial_number TEXT UNIQUE,
        plate_number TEXT,
        plate_color TEXT,
        vehicle_type TEXT,
        car_type TEXT,
        entrance_number TEXT,
        entrance_name TEXT,
        enter_timestamp INTEGER,
        time_source TEXT,
        clock_synced INTEGER,
        confidence REAL,
        body BLOB,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_error TEXT,
        serial_number TEXT,
        sent_at REAL,
        payload_sha256 TEXT,
        payload_size INTEGER,
        payload BLOB
    );
    CREATE INDEX events_pending ON events (id) WHERE state = 'pending';
    CREATE INDEX events_plate ON events (plate_number, enter_timestamp) WHERE state != 'rejected';
    CREATE INDEX events_camera ON events (camera, received_at);
    CREATE INDEX events_state ON events (state, id);
    """,
    # 2: clock safety (issue 5). Entries timed by an unsynchronised agent clock keep the monotonic time
    # of receipt and the boot they happened in, so their time can be corrected once the API's clock is
    # known in the same boot.
    """
    ALTER TABLE events ADD COLUMN received_mono REAL;
    ALTER TABLE events ADD COLUMN boot_id TEXT;
    ALTER TABLE events ADD COLUMN time_corrected INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: a re-queued entry gets a fresh max_entry_age_s from the moment it was re-queued; counted from
    # its receipt, `edgeagent retry` of expired entries would see them expire again within a minute.
    """
    ALTER TABLE events ADD COLUMN requeued_at REAL;
    """,
)

ENTRY_COLUMNS = (
    "id, state, camera, lane, received_at, updated_at, reason, detail, out_serial_number, plate_number, "
    "plate_color, vehicle_type, car_type, entrance_number, entrance_name, enter_timestamp, time_source, "
    "clock_synced, attempts, next_attempt_at, last_error, serial_number, sent_at, topic, payload_sha256, "
    "payload_size, time_corrected"
)


@dataclass(frozen=True, slots=True)
class Inbound:
    """What the journal keeps about the message a record came from."""

    topic: str
    received_at: float
    payload_sha256: str
    payload_size: int
    payload_excerpt: bytes  # already redacted and capped; stored for rejected rows only
    received_mono: float | None = None  # time.monotonic() at receipt, meaningful within `boot_id` only


@dataclass(frozen=True, slots=True)
class Recorded:
    """Result of recording one item: what happened and the row it concerns."""

    outcome: str  # "entry" | "rejected" | "repeat" | "duplicate"
    id: int
    out_serial_number: str | None = None


@dataclass(frozen=True, slots=True)
class Pending:
    """A pending entry as the delivery loop needs it."""

    id: int
    out_serial_number: str
    body: bytes
    attempts: int
    received_at: float


BodyBuilder = Callable[[Entry, str], bytes]


def boot_id() -> str:
    """This boot's id (Linux): monotonic times are comparable only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _translate(exc: sqlite3.Error) -> JournalError:
    return JournalError(f"journal: {exc.__class__.__name__}: {exc}")


class Journal:
    """One connection to the journal file. Not shared between threads: give each thread its own."""

    def __init__(self, path: Path, *, readonly: bool = False, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.readonly = readonly
        try:
            if readonly:
                if not path.exists():
                    raise JournalError(f"journal not found: {path}")
                # as_uri() percent-encodes "#", "?" and "%", which SQLite would otherwise read as URI syntax.
                self._db = sqlite3.connect(
                    f"{path.absolute().as_uri()}?mode=ro",
                    uri=True,
                    timeout=busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._migrate()
            self._db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            self._db.row_factory = sqlite3.Row
            self._epoch = self._meta("epoch") or ""
            self._boot_id = boot_id()
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        except OSError as exc:
            raise JournalError(f"journal: cannot open {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    # -- schema -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self._transaction():
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                if number == 1:
                    # A random epoch per journal file keeps out_serial_numbers unique for the merchant
                    # even if the journal is ever recreated and ids start again at 1.
                    epoch = "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(6))
                    self._db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
                self._db.execute(f"PRAGMA user_version = {number}")

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # Also when COMMIT itself failed (SQLITE_BUSY leaves the transaction open): otherwise every
            # later BEGIN fails with "cannot start a transaction within a transaction" and intake stalls.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def serial_for(self, prefix: str, row_id: int) -> str:
        """`out_serial_number` of row `row_id`: prefix + journal epoch + zero-padded id (≤ 28 chars)."""
        return f"{prefix}{self._epoch}{row_id:0{SERIAL_DIGITS}d}"

    # -- intake -------------------------------------------------------------------------------

    def record_batch(
        self,
        items: Sequence[tuple[Entry | Rejection, Inbound]],
        *,
        serial_prefix: str,
        repeat_window_s: float,
        build_body: BodyBuilder,
        now: float,
    ) -> list[Recorded]:
        """Record every item in one transaction (one fsync). Redeliveries are no-ops ("duplicate")."""
        try:
            with self._transaction():
                return [
                    self._record(item, inbound, serial_prefix, repeat_window_s, build_body, now)
                    for item, inbound in items
                ]
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def _existing(self, dedup_key: str) -> int | None:
        row = self._db.execute("SELECT id FROM events WHERE dedup_key = ?", (dedup_key,)).fetchone()
        return None if row is None else int(row[0])

    def _record(
        self,
        item: Entry | Rejection,
        inbound: Inbound,
        serial_prefix: str,
        repeat_window_s: float,
        build_body: BodyBuilder,
        now: float,
    ) -> Recorded:
        existing = self._existing(item.dedup_key)
        if existing is not None:
            return Recorded("duplicate", existing)
        if isinstance(item, Entry):
            repeat = self._db.execute(
                "SELECT id FROM events WHERE plate_number = ? AND state != 'rejected' "
                "AND enter_timestamp BETWEEN ? AND ? ORDER BY id DESC LIMIT 1",
                (
                    item.plate_number,
                    item.enter_timestamp - repeat_window_s,
                    item.enter_timestamp + repeat_window_s,
                ),
            ).fetchone()
            if repeat is not None:
                return self._reject(
                    Rejection(
                        item.camera,
                        item.lane,
                        item.dedup_key,
                        Reason.REPEAT,
                        f"same plate as entry #{repeat[0]} within {repeat_window_s:g} s",
                        plate_number=item.plate_number,
                        repeat_of=int(repeat[0]),
                    ),
                    inbound,
                    now,
                    outcome="repeat",
                )
            return self._insert_entry(item, inbound, serial_prefix, build_body, now)
        return self._reject(item, inbound, now)

    def _insert_entry(
        self, entry: Entry, inbound: Inbound, serial_prefix: str, build_body: BodyBuilder, now: float
    ) -> Recorded:
        # AUTOINCREMENT's sequence never goes back, even after pruning, so neither does the serial.
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        row_id = (int(seq[0]) if seq else 0) + 1
        serial = self.serial_for(serial_prefix, row_id)
        try:
            body = build_body(entry, serial)
        except ValueError as exc:
            return self._reject(
                Rejection(
                    entry.camera,
                    entry.lane,
                    entry.dedup_key,
                    Reason.BAD_FIELD,
                    str(exc),
                    plate_number=entry.plate_number,
                ),
                inbound,
                now,
            )
        self._db.execute(
            "INSERT INTO events (id, state, dedup_key, camera, lane, topic, received_at, updated_at, "
            "out_serial_number, plate_number, plate_color, vehicle_type, car_type, entrance_number, "
            "entrance_name, enter_timestamp, time_source, clock_synced, confidence, body, next_attempt_at, "
            "payload_sha256, payload_size, received_mono, boot_id) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row_id,
                entry.dedup_key,
                entry.camera,
                entry.lane,
                inbound.topic,
                inbound.received_at,
                now,
                serial,
                entry.plate_number,
                entry.plate_color.value,
                entry.vehicle_type.value,
                entry.car_type.value,
                entry.entrance_number,
                entry.entrance_name,
                entry.enter_timestamp,
                entry.time_source.value,
                int(entry.clock_synced),
                entry.confidence,
                body,
                now,
                inbound.payload_sha256,
                inbound.payload_size,
                inbound.received_mono,
                self._boot_id,
            ),
        )
        return Recorded("entry", row_id, serial)

    def _reject(self, rej: Rejection, inbound: Inbound, now: float, outcome: str = "rejected") -> Recorded:
        cur = self._db.execute(
            "INSERT INTO events (state, dedup_key, camera, lane, topic, received_at, updated_at, reason, detail, "
            "plate_number, payload_sha256, payload_size, payload) "
            "VALUES ('rejected', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rej.dedup_key,
                rej.camera,
                rej.lane,
                inbound.topic,
                inbound.received_at,
                now,
                rej.reason.value,
                rej.detail[:500],
                rej.plate_number,
                inbound.payload_sha256,
                inbound.payload_size,
                inbound.payload_excerpt[:REJECTED_PAYLOAD_CAP],
            ),
        )
        return Recorded(outcome, int(cur.lastrowid or 0))

    # -- delivery -----------------------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: Sequence[int] = ()) -> list[Pending]:
        """Pending entries whose next attempt is due, oldest first, skipping ids already in flight.
        A NULL next attempt (a re-queued entry) is due at once."""
        skip = set(exclude)
        rows = self._query(
            "SELECT id, out_serial_number, body, attempts, received_at FROM events "
            "WHERE state = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY id LIMIT ?",
            (now, limit + len(skip)),
        )
        due = [Pending(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows if r[0] not in skip]
        return due[:limit]

    def next_due_at(self) -> float | None:
        """When the earliest pending entry becomes due, or None when nothing is pending."""
        row = self._query("SELECT min(coalesce(next_attempt_at, 0)) FROM events WHERE state = 'pending'")[0]
        return None if row[0] is None else float(row[0])

    def mark_outcomes(self, outcomes: Sequence[tuple[int, str, dict[str, Any]]], now: float) -> None:
        """Apply delivery outcomes in one transaction: ("sent", {serial_number}), ("retry", {next_at,
        error}), ("dead", {error}). Only pending rows change: a row sent meanwhile stays sent."""
        try:
            with self._transaction():
                for row_id, kind, data in outcomes:
                    if kind == "sent":
                        self._db.execute(
                            "UPDATE events SET state = 'sent', serial_number = ?, sent_at = ?, updated_at = ?, "
                            "attempts = attempts + 1, last_error = NULL, next_attempt_at = NULL "
                            "WHERE id = ? AND state = 'pending'",
                            (data["serial_number"], now, now, row_id),
                        )
                    elif kind == "retry":
                        self._db.execute(
                            "UPDATE events SET attempts = attempts + ?, next_attempt_at = ?, last_error = ?, "
                            "updated_at = ? WHERE id = ? AND state = 'pending'",
                            (int(data.get("counted", 1)), data["next_at"], data["error"][:500], now, row_id),
                        )
                    elif kind == "dead":
                        self._db.execute(
                            "UPDATE events SET state = 'dead', attempts = attempts + ?, last_error = ?, "
                            "next_attempt_at = NULL, updated_at = ? WHERE id = ? AND state = 'pending'",
                            (int(data.get("counted", 1)), data["error"][:500], now, row_id),
                        )
                    else:
                        raise ValueError(f"unknown outcome {kind!r}")
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def requeue_dead(self, ids: Sequence[int] | None, now: float) -> list[int]:
        """Move dead entries (all when `ids` is None) back to pending, keeping their out_serial_number.

        They are due at once (next attempt NULL), not at `now`: `edgeagent retry` reads the system clock
        while the daemon schedules on the API-corrected one, which may be far behind it.
        """
        try:
            with self._transaction():
                if ids is None:
                    rows = self._db.execute("SELECT id FROM events WHERE state = 'dead'").fetchall()
                else:
                    marks = ",".join("?" * len(ids))
                    rows = self._db.execute(
                        f"SELECT id FROM events WHERE state = 'dead' AND id IN ({marks})", tuple(ids)
                    ).fetchall()
                moved = [int(r[0]) for r in rows]
                self._db.executemany(
                    "UPDATE events SET state = 'pending', next_attempt_at = NULL, updated_at = ?, requeued_at = ? "
                    "WHERE id = ?",
                    [(now, now, i) for i in moved],
                )
                return moved
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def expire(self, now: float, max_age_s: float) -> int:
        """Dead-letter pending entries journaled (or re-queued) more than `max_age_s` ago, as "expired"."""
        try:
            with self._transaction():
                cur = self._db.execute(
                    "UPDATE events SET state = 'dead', last_error = ?, next_attempt_at = NULL, updated_at = ? "
                    "WHERE state = 'pending' AND coalesce(requeued_at, received_at) < ?",
                    (f"expired: not delivered within max_entry_age_s={max_age_s:g}", now, now - max_age_s),
                )
                return cur.rowcount
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def prune(self, now: float) -> int:
        """Delete sent and rejected rows older than 30 days, and the oldest rejected rows over the cap."""
        try:
            with self._transaction():
                cur = self._db.execute(
                    "DELETE FROM events WHERE state IN ('sent', 'rejected') AND updated_at < ?",
                    (now - RETENTION_S,),
                )
                removed = cur.rowcount
                cur = self._db.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE state = 'rejected' "
                    "ORDER BY id DESC LIMIT -1 OFFSET ?)",
                    (MAX_REJECTED_ROWS,),
                )
                return removed + cur.rowcount
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def uncorrected_agent_times(self) -> list[dict[str, Any]]:
        """Pending, never-attempted entries timed by an unsynchronised agent clock in this boot."""
        rows = self._query(
            "SELECT id, out_serial_number, received_mono, enter_timestamp, body FROM events "
            "WHERE state = 'pending' AND time_source = 'agent' AND clock_synced = 0 AND time_corrected = 0 "
            "AND attempts = 0 AND boot_id = ? AND received_mono IS NOT NULL",
            (self._boot_id,),
        )
        return [{key: row[key] for key in row.keys()} for row in rows]  # noqa: SIM118

    def correct_time(self, row_id: int, enter_timestamp: int, body: bytes, now: float) -> bool:
        """Replace an uncorrected entry's time and body; False if it was attempted meanwhile."""
        try:
            with self._transaction():
                cur = self._db.execute(
                    "UPDATE events SET enter_timestamp = ?, body = ?, time_corrected = 1, updated_at = ? "
                    "WHERE id = ? AND state = 'pending' AND attempts = 0 AND time_corrected = 0",
                    (enter_timestamp, body, now, row_id),
                )
                return cur.rowcount == 1
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    # -- reading (status, events, tests) -------------------------------------------------------

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return list(self._db.execute(sql, tuple(args)).fetchall())
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def counts(self) -> dict[str, int]:
        """Rows per state, every state present."""
        counts = {state.value: 0 for state in EntryState}
        for row in self._query("SELECT state, count(*) FROM events GROUP BY state"):
            counts[row[0]] = int(row[1])
        return counts

    def queue_summary(self, now: float) -> dict[str, Any]:
        """The `queue` part of `status` (SPEC §7)."""
        counts = self.counts()
        oldest = self._query("SELECT min(received_at) FROM events WHERE state = 'pending'")[0][0]
        sent_24h = self._query("SELECT count(*) FROM events WHERE state = 'sent' AND sent_at >= ?", (now - 86400,))[0][
            0
        ]
        return {
            "pending": counts["pending"],
            "oldest_pending_age_s": None if oldest is None else round(max(0.0, now - oldest), 1),
            "dead": counts["dead"],
            "rejected": counts["rejected"],
            "sent_24h": int(sent_24h),
        }

    def camera_summary(self, now: float) -> dict[str, tuple[float, int]]:
        """Per camera: (last read time, reads in the last 24 h), counting entries and rejected reads."""
        rows = self._query(
            "SELECT camera, max(received_at), sum(received_at >= ?) FROM events "
            "WHERE camera IS NOT NULL GROUP BY camera",
            (now - 86400,),
        )
        return {r[0]: (float(r[1]), int(r[2] or 0)) for r in rows}

    def last_error(self) -> dict[str, Any] | None:
        """The most recent delivery error still standing on a pending or dead entry."""
        rows = self._query(
            "SELECT id, last_error, updated_at FROM events WHERE state IN ('pending', 'dead') "
            "AND last_error IS NOT NULL ORDER BY updated_at DESC LIMIT 1"
        )
        return None if not rows else {"id": rows[0][0], "error": rows[0][1], "at": rows[0][2]}

    def events(self, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Journal rows, newest first, as dicts with the `events --json` fields (SPEC §2)."""
        where, args = ("WHERE state = ?", [state]) if state else ("", [])
        rows = self._query(f"SELECT {ENTRY_COLUMNS} FROM events {where} ORDER BY id DESC LIMIT ?", [*args, limit])
        return [_row_dict(row) for row in rows]

    def get(self, row_id: int) -> dict[str, Any] | None:
        rows = self._query(f"SELECT {ENTRY_COLUMNS} FROM events WHERE id = ?", (row_id,))
        return _row_dict(rows[0]) if rows else None

    def body_of(self, row_id: int) -> bytes | None:
        rows = self._query("SELECT body FROM events WHERE id = ?", (row_id,))
        return None if not rows or rows[0][0] is None else bytes(rows[0][0])

    def payload_of(self, row_id: int) -> bytes | None:
        rows = self._query("SELECT payload FROM events WHERE id = ?", (row_id,))
        return None if not rows or rows[0][0] is None else bytes(rows[0][0])

    def integrity_check(self) -> str:
        return str(self._query("PRAGMA integrity_check")[0][0])


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _row_dict(row: sqlite3.Row) -> dict[str, Any]:
    data = {key: row[key] for key in row.keys()}  # noqa: SIM118 - sqlite3.Row is not a Mapping
    data["received_at"] = _iso(data["received_at"])
    data["updated_at"] = _iso(data["updated_at"])
    data["sent_at"] = _iso(data["sent_at"])
    data["next_attempt_at"] = _iso(data["next_attempt_at"])
    if data["state"] == EntryState.REJECTED:
        for key in (
            "out_serial_number",
            "plate_color",
            "vehicle_type",
            "car_type",
            "entrance_number",
            "entrance_name",
            "enter_timestamp",
            "time_source",
            "clock_synced",
            "attempts",
            "next_attempt_at",
            "last_error",
            "serial_number",
            "sent_at",
            "time_corrected",
        ):
            data.pop(key, None)
    else:
        data.pop("reason", None)
        data.pop("detail", None)
        data["clock_synced"] = bool(data["clock_synced"])
        data["time_corrected"] = bool(data["time_corrected"])
    return data
