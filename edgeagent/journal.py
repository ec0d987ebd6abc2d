"""The journal: SQLite in WAL mode with synchronous=FULL, the only state that matters (SPEC §6).

One table, `events`, is the outbox: requests of every kind (`entry`, `exit`; `pending` → `sent` |
`dead`, per `policy.TRANSITIONS`) and rejected reads side by side, so one id space serves `events`,
`retry` and the tests. A UNIQUE `dedup_key` makes every redelivery a no-op: the vendor record id
where there is one, else the capture time, else the payload digest. UNIQUE (kind, out_serial_number)
lets an exit share its entry's number and never lets a number have two requests of one kind.

Who writes: the ingest thread records batches (one transaction, one fsync per batch); the delivery
loop marks outcomes on its own connection. `status` and `events` open the file read-only.
This module stores and queries; what a row means (the repeat rule, bodies, outcomes, presentation)
is decided by its owners. The only module with SQL; sqlite3 errors become `JournalError` here.
"""

from __future__ import annotations

import enum
import json
import secrets
import sqlite3
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random

from edgeagent import policy, sessions
from edgeagent.errors import JournalError
from edgeagent.exits import ExitRules
from edgeagent.model import REJECTED_PAYLOAD_CAP, Entry, EntryState, ExitRead, Inbound, Reason, Rejection
from edgeagent.requests import Kind

RETENTION_S = 30 * 86400  # SPEC §6: sent and rejected rows are pruned after 30 days
MAX_REJECTED_ROWS = 100_000  # bound on inspection rows, whatever their age
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
    # 4: one outbox for every kind of request (issue 9). Each row names its `kind`; a number is unique per
    # kind, so an entry and its exit share the entry's out_serial_number and no number gets two exits.
    # SQLite cannot change a UNIQUE constraint in place: the table is rebuilt, and its AUTOINCREMENT
    # sequence carried over (ids mint numbers: it must never go back to the highest id still present).
    # `depends_on`: the request that must be sent first (an exit names its entry). `uncertain`: an
    # attempt ended without a verified answer in a way the API may have accepted (timeout, dropped
    # connection, unverified 2xx, 5xx): `retry --rebuild` leaves such a body as it is. `acceptance`:
    # how a sent row was confirmed ("verified", or "duplicate" = refused as an already used number).
    # `answered_at`: when the verified answer arrived, on the API's clock (our clock + the learnt offset):
    # latency in status is measured as WeChat sees it, from the camera's read (enter/exit timestamp).
    # Exits (issue 10): an exit row shares its entry's number and `depends_on` it; `plate_number` is the
    # plate as read at the exit, the body the session's. `match`: exact | fuzzy | manual | inferred |
    # none; `clamped`: exit_timestamp raised to entry + 1; `candidates`: the sessions that fitted when
    # none was chosen (JSON). An exit read with no session yet is `held` until `hold_until`, then an
    # `orphan` (never sent) until it is matched, attached or `dismissed`.
    """
    INSERT OR REPLACE INTO meta (key, value)
        SELECT 'migration4_seq', seq FROM sqlite_sequence WHERE name = 'events';
    CREATE TABLE events_v4 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('entry', 'exit', 'rejected')),
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead', 'rejected', 'held', 'orphan', 'dismissed')),
        dedup_key TEXT NOT NULL UNIQUE,
        camera TEXT,
        lane TEXT,
        topic TEXT,
        received_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        reason TEXT,
        detail TEXT,
        out_serial_number TEXT,
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
        payload BLOB,
        received_mono REAL,
        boot_id TEXT,
        time_corrected INTEGER NOT NULL DEFAULT 0,
        requeued_at REAL,
        depends_on INTEGER,
        uncertain INTEGER NOT NULL DEFAULT 0,
        acceptance TEXT,
        answered_at REAL,
        exit_number TEXT,
        exit_timestamp INTEGER,
        match TEXT,
        clamped INTEGER NOT NULL DEFAULT 0,
        candidates TEXT,
        hold_until REAL,
        UNIQUE (kind, out_serial_number)
    );
    INSERT INTO events_v4 (
        id, kind, state, dedup_key, camera, lane, topic, received_at, updated_at, reason, detail,
        out_serial_number, plate_number, plate_color, vehicle_type, car_type, entrance_number, entrance_name,
        enter_timestamp, time_source, clock_synced, confidence, body, attempts, next_attempt_at, last_error,
        serial_number, sent_at, payload_sha256, payload_size, payload, received_mono, boot_id, time_corrected,
        requeued_at, acceptance, answered_at)
    SELECT
        id, CASE WHEN state = 'rejected' THEN 'rejected' ELSE 'entry' END, state, dedup_key, camera, lane, topic,
        received_at, updated_at, reason, detail, out_serial_number, plate_number, plate_color, vehicle_type,
        car_type, entrance_number, entrance_name, enter_timestamp, time_source, clock_synced, confidence, body,
        attempts, next_attempt_at, last_error, serial_number, sent_at, payload_sha256, payload_size, payload,
        received_mono, boot_id, time_corrected, requeued_at,
        CASE WHEN state = 'sent' THEN 'verified' END, CASE WHEN state = 'sent' THEN sent_at END
    FROM events;
    DROP TABLE events;
    ALTER TABLE events_v4 RENAME TO events;
    UPDATE sqlite_sequence SET seq = max(seq, coalesce((SELECT CAST(value AS INTEGER) FROM meta
        WHERE key = 'migration4_seq'), 0)) WHERE name = 'events';
    INSERT INTO sqlite_sequence (name, seq) SELECT 'events', CAST(value AS INTEGER) FROM meta
        WHERE key = 'migration4_seq' AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'events');
    DELETE FROM meta WHERE key = 'migration4_seq';
    CREATE INDEX events_pending ON events (id) WHERE state = 'pending';
    CREATE INDEX events_plate ON events (plate_number, enter_timestamp) WHERE state != 'rejected';
    CREATE INDEX events_camera ON events (camera, received_at);
    CREATE INDEX events_state ON events (state, id);
    CREATE INDEX events_answered ON events (kind, answered_at) WHERE answered_at IS NOT NULL;
    CREATE INDEX events_serial ON events (serial_number) WHERE serial_number IS NOT NULL;
    CREATE INDEX events_depends ON events (depends_on) WHERE depends_on IS NOT NULL;
    CREATE INDEX events_unmatched ON events (id) WHERE state IN ('held', 'orphan');
    """,
)

COLUMNS = (
    "id, kind, state, camera, lane, received_at, updated_at, reason, detail, out_serial_number, plate_number, "
    "plate_color, vehicle_type, car_type, entrance_number, entrance_name, enter_timestamp, time_source, "
    "clock_synced, attempts, next_attempt_at, last_error, serial_number, sent_at, topic, payload_sha256, "
    "payload_size, time_corrected, depends_on, uncertain, acceptance, answered_at, exit_number, exit_timestamp, "
    "match, clamped, candidates, hold_until"
)


class Recorded(enum.StrEnum):
    """What recording one item did."""

    ENTRY = "entry"
    EXIT = "exit"  # an exit read matched to its session: an exit request, pending
    HELD = "held"  # an exit read with no session yet: waits exit_hold_s, then an orphan
    REJECTED = "rejected"
    REPEAT = "repeat"  # rejected as a repeat of an earlier entry
    DUPLICATE = "duplicate"  # a redelivery of something already journaled: nothing written


@dataclass(frozen=True, slots=True)
class Record:
    """Result of recording one item: what happened and the row it concerns."""

    outcome: Recorded
    id: int
    out_serial_number: str | None = None
    body: bytes | None = None  # the request body of a new entry, for the hand-over to delivery
    depends_on: int | None = None  # a request that must be sent first (an inferred exit, an entry)


@dataclass(frozen=True, slots=True)
class SessionRow:
    """An open session as matching needs it: the entry's row (exits.SessionLike)."""

    id: int
    out_serial_number: str
    plate_number: str
    plate_color: str
    enter_timestamp: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Due:
    """A pending request as the delivery loop needs it."""

    id: int
    kind: Kind
    out_serial_number: str
    body: bytes
    attempts: int
    received_at: float


@dataclass(frozen=True, slots=True)
class Marked:
    """One delivery outcome to journal; `answered_at`: when the answer arrived, on the API's clock."""

    id: int
    outcome: policy.Outcome
    answered_at: float | None = None
    uncertain: bool = False  # the attempt may have been accepted without our knowing


BodyBuilder = Callable[[Entry, str], bytes]
Rebuild = Callable[[Kind, bytes, str | None, str | None], bytes]  # (kind, body, camera, lane) → new body
# The repeat rule (screening's): given an entry and a lookup of the newest entry of a plate within a time
# range, the rejection to record instead, or None.
RecentLookup = Callable[[str, float, float], int | None]
RepeatRule = Callable[[Entry, RecentLookup], Rejection | None]


def session_state(row: dict[str, Any]) -> str:
    """A `sessions` row's state (SPEC §2): open | exit_pending | closed | orphan | dismissed."""
    if row["entry_id"] is None:  # an exit read with no session
        return {"held": "exit_pending", "orphan": "orphan", "dismissed": "dismissed"}[row["exit_state"]]
    if row["exit_id"] is None:
        return "open"
    return "closed" if row["exit_state"] == "sent" else "exit_pending"


_VIEWS = {"open": ("open",), "closed": ("closed",), "orphans": ("orphan",)}


def boot_id() -> str:
    """This boot's id (Linux): monotonic times are comparable only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


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

    @retry(retry=retry_if_exception(_busy), stop=stop_after_attempt(3), wait=wait_random(0.05, 0.25), reraise=True)
    def _attempt(self, work: Callable[[], Any]) -> Any:
        with self._transaction():
            return work()

    def _write(self, work: Callable[[], Any]) -> Any:
        """Run `work` in one IMMEDIATE transaction. SQLITE_BUSY past the 5 s busy timeout (a reader's
        checkpoint, a `retry` command) is tried twice more in process before it becomes a JournalError."""
        try:
            return self._attempt(work)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def serial_for(self, prefix: str, row_id: int) -> str:
        """`out_serial_number` of row `row_id`: prefix + journal epoch + zero-padded id (≤ 28 chars)."""
        return f"{prefix}{self._epoch}{row_id:0{SERIAL_DIGITS}d}"

    # -- intake -------------------------------------------------------------------------------

    def record_batch(
        self,
        items: Sequence[tuple[Entry | ExitRead | Rejection, Inbound]],
        *,
        serial_prefix: str,
        build_body: BodyBuilder,
        repeat_rule: RepeatRule,
        now: float,
        exits: ExitRules | None = None,
    ) -> list[Record]:
        """Record every item in one transaction (one fsync). Redeliveries are no-ops (DUPLICATE).

        With `exits`, an entry first closes an open session of its plate (re-entry, SPEC §10) and an
        exit read is matched to its session; without, sessions are not tracked (exit reads refused).
        """
        return list(
            self._write(
                lambda: [
                    self._record(item, inbound, serial_prefix, build_body, repeat_rule, now, exits)
                    for item, inbound in items
                ]
            )
        )

    def _existing(self, dedup_key: str) -> int | None:
        row = self._db.execute("SELECT id FROM events WHERE dedup_key = ?", (dedup_key,)).fetchone()
        return None if row is None else int(row[0])

    def recent_entry(self, plate_number: str, low: float, high: float) -> int | None:
        """The newest entry of `plate_number` timed within [low, high], if any."""
        row = self._db.execute(
            # `state != 'rejected'` lets SQLite use the partial index events_plate (kind alone does not).
            "SELECT id FROM events WHERE kind = 'entry' AND state != 'rejected' AND plate_number = ? "
            "AND enter_timestamp BETWEEN ? AND ? ORDER BY id DESC LIMIT 1",
            (plate_number, low, high),
        ).fetchone()
        return None if row is None else int(row[0])

    def _record(
        self,
        item: Entry | ExitRead | Rejection,
        inbound: Inbound,
        serial_prefix: str,
        build_body: BodyBuilder,
        repeat_rule: RepeatRule,
        now: float,
        exits: ExitRules | None,
    ) -> Record:
        existing = self._existing(item.dedup_key)
        if existing is not None:
            return Record(Recorded.DUPLICATE, existing)
        if isinstance(item, Entry):
            repeat = repeat_rule(item, self.recent_entry)
            if repeat is not None:
                return self._reject(repeat, inbound, now, Recorded.REPEAT)
            first = None
            if exits is not None:
                first = self._close_previous(item, inbound, exits, now)
            return self._insert_entry(item, inbound, serial_prefix, build_body, now, first)
        if isinstance(item, ExitRead):
            if exits is None:
                detail = "exit reads need session tracking ([sessions])"
                return self._reject(
                    Rejection(item.camera, item.lane, item.dedup_key, Reason.UNMAPPED_LANE, detail), inbound, now
                )
            return self._record_exit(item, inbound, exits, now)
        return self._reject(item, inbound, now)

    def _insert_entry(
        self,
        entry: Entry,
        inbound: Inbound,
        serial_prefix: str,
        build_body: BodyBuilder,
        now: float,
        depends_on: int | None = None,
    ) -> Record:
        # AUTOINCREMENT's sequence never goes back, even after pruning, so neither does the serial.
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        row_id = (int(seq[0]) if seq else 0) + 1
        serial = self.serial_for(serial_prefix, row_id)
        try:
            body = build_body(entry, serial)
        except ValueError as exc:
            rejection = Rejection(
                entry.camera, entry.lane, entry.dedup_key, Reason.BAD_FIELD, str(exc), plate_number=entry.plate_number
            )
            return self._reject(rejection, inbound, now)
        self._db.execute(
            "INSERT INTO events (id, kind, state, dedup_key, camera, lane, topic, received_at, updated_at, "
            "out_serial_number, plate_number, plate_color, vehicle_type, car_type, entrance_number, "
            "entrance_name, enter_timestamp, time_source, clock_synced, confidence, body, next_attempt_at, "
            "payload_sha256, payload_size, received_mono, boot_id, depends_on) VALUES (?, 'entry', 'pending', ?, ?, "
            "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                depends_on,
            ),
        )
        return Record(Recorded.ENTRY, row_id, serial, body, depends_on)

    # -- sessions (SPEC §10) -------------------------------------------------------------------

    def open_sessions(self, plates: Sequence[str]) -> list[SessionRow]:
        """Entries of these plates with no exit row yet (open sessions), oldest first."""
        if not plates:
            return []
        marks = ",".join("?" * len(plates))
        rows = self._db.execute(
            "SELECT id, out_serial_number, plate_number, plate_color, enter_timestamp, body FROM events AS e "
            f"WHERE kind = 'entry' AND state != 'rejected' AND plate_number IN ({marks}) AND NOT EXISTS "
            "(SELECT 1 FROM events AS x WHERE x.kind = 'exit' AND x.depends_on = e.id) ORDER BY id",
            tuple(plates),
        ).fetchall()
        return [SessionRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows]

    def _close_previous(self, entry: Entry, inbound: Inbound, exits: ExitRules, now: float) -> int | None:
        """Re-entry (SPEC §10): an open session of the same plate is closed by an inferred exit at the new
        entry's time, sent before the new entry (which depends on it). Returns the last such exit's id."""
        plan = exits.reentry(entry.plate_number, entry.enter_timestamp, self.open_sessions([entry.plate_number]))
        last = None
        for inferred in plan.close:
            session = inferred.session
            last = self._insert_exit(
                session,
                camera=entry.camera,
                lane=entry.lane,
                dedup_key=f"{entry.dedup_key}|closes|{session.out_serial_number}",
                inbound=inbound,
                plate_as_read=entry.plate_number,
                exit_number="",
                exit_timestamp=inferred.exit.timestamp,
                clamped=inferred.exit.clamped,
                match="inferred",
                body=exits.body(session, inferred.exit.timestamp),
                now=now,
            )
        return last

    def _insert_exit(
        self,
        session: SessionRow,
        *,
        camera: str | None,
        lane: str | None,
        dedup_key: str,
        inbound: Inbound | None,
        plate_as_read: str,
        exit_number: str,
        exit_timestamp: int,
        clamped: bool,
        match: str,
        body: bytes,
        now: float,
        received_at: float | None = None,
    ) -> int:
        cur = self._db.execute(
            "INSERT INTO events (kind, state, dedup_key, camera, lane, topic, received_at, updated_at, "
            "out_serial_number, plate_number, plate_color, exit_number, exit_timestamp, match, clamped, body, "
            "depends_on, next_attempt_at, payload_sha256, payload_size, received_mono, boot_id) "
            "VALUES ('exit', 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                dedup_key,
                camera,
                lane,
                inbound.topic if inbound else None,
                received_at if received_at is not None else (inbound.received_at if inbound else now),
                now,
                session.out_serial_number,
                plate_as_read,
                session.plate_color,
                exit_number,
                exit_timestamp,
                match,
                int(clamped),
                body,
                session.id,
                now,
                inbound.payload_sha256 if inbound else None,
                inbound.payload_size if inbound else None,
                inbound.received_mono if inbound else None,
                self._boot_id,
            ),
        )
        return int(cur.lastrowid or 0)

    def _recent_exit(self, read: ExitRead, window_s: float) -> int | None:
        """An exit read of the same plate at the same exit within the window (SPEC §10: one exit)."""
        # The same car as read before, or as its session knows it: a car that left by a fuzzy match
        # (8 read for B) and is then read right at the same barrier is still the one car.
        # Two indexed lookups (plate, then the plate's session numbers), not one OR that scans the table.
        low, high = read.read_at - window_s, read.read_at + window_s
        row = self._db.execute(
            "SELECT id FROM events WHERE kind = 'exit' AND state != 'rejected' AND plate_number = ? "
            "AND exit_number = ? AND exit_timestamp BETWEEN ? AND ? ORDER BY id DESC LIMIT 1",
            (read.plate_number, read.exit_number, low, high),
        ).fetchone()
        if row is None:
            row = self._db.execute(
                "SELECT x.id FROM events AS e JOIN events AS x ON x.kind = 'exit' "
                "AND x.out_serial_number = e.out_serial_number WHERE e.kind = 'entry' AND e.state != 'rejected' "
                "AND e.plate_number = ? AND x.exit_number = ? AND x.exit_timestamp BETWEEN ? AND ? "
                "ORDER BY x.id DESC LIMIT 1",
                (read.plate_number, read.exit_number, low, high),
            ).fetchone()
        return None if row is None else int(row[0])

    def _record_exit(self, read: ExitRead, inbound: Inbound, exits: ExitRules, now: float) -> Record:
        if exits.repeat_window_s > 0 and (earlier := self._recent_exit(read, exits.repeat_window_s)) is not None:
            detail = f"same plate at exit {read.exit_number} as #{earlier} within {exits.repeat_window_s:g} s"
            rejection = Rejection(
                read.camera, read.lane, read.dedup_key, Reason.REPEAT, detail, read.plate_number, earlier
            )
            return self._reject(rejection, inbound, now, Recorded.REPEAT)
        found = exits.match(read.plate_number, read.read_at, self.open_sessions(exits.lookup_plates(read.plate_number)))
        # Only an exact match is taken at once. A fuzzy one waits out exit_hold_s like an unmatched read:
        # the car's own entry may still be on its way (camera clocks, MQTT order), and closing a parked
        # neighbour one confusable character away would send an exit for a car that has not left.
        if found.session is not None and found.kind is sessions.MatchKind.EXACT:
            when = sessions.exit_timestamp(read.read_at, found.session.enter_timestamp)
            exit_id = self._insert_exit(
                found.session,
                camera=read.camera,
                lane=read.lane,
                dedup_key=read.dedup_key,
                inbound=inbound,
                plate_as_read=read.plate_number,
                exit_number=read.exit_number,
                exit_timestamp=when.timestamp,
                clamped=when.clamped,
                match=found.kind.value,
                body=exits.body(found.session, when.timestamp),
                now=now,
            )
            return Record(Recorded.EXIT, exit_id, found.session.out_serial_number, depends_on=found.session.id)
        waiting = found.candidates or ((found.session,) if found.session is not None else ())
        candidates = json.dumps([c.out_serial_number for c in waiting]) if waiting else None
        cur = self._db.execute(
            "INSERT INTO events (kind, state, dedup_key, camera, lane, topic, received_at, updated_at, plate_number, "
            "plate_color, exit_number, exit_timestamp, match, candidates, hold_until, time_source, clock_synced, "
            "confidence, payload_sha256, payload_size, received_mono, boot_id) "
            "VALUES ('exit', 'held', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'none', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                read.dedup_key,
                read.camera,
                read.lane,
                inbound.topic,
                inbound.received_at,
                now,
                read.plate_number,
                read.plate_color.value,
                read.exit_number,
                read.read_at,
                candidates,
                sessions.hold_deadline(inbound.received_at, exits.exit_hold_s),
                read.time_source.value,
                int(read.clock_synced),
                read.confidence,
                inbound.payload_sha256,
                inbound.payload_size,
                inbound.received_mono,
                self._boot_id,
            ),
        )
        return Record(Recorded.HELD, int(cur.lastrowid or 0))

    def rematch(self, exits: ExitRules, now: float, system_now: float) -> tuple[list[int], list[int]]:
        """Held and orphan exit reads tried again against the open sessions (their entry may have been
        journaled since); held ones past `hold_until` (system clock) become orphans. Returns (matched,
        orphaned) ids."""

        def apply() -> tuple[list[int], list[int]]:
            matched: list[int] = []
            orphaned: list[int] = []
            rows = self._db.execute(
                "SELECT id, plate_number, exit_timestamp, state, hold_until FROM events "
                "WHERE state IN ('held', 'orphan') ORDER BY id"
            ).fetchall()
            for row_id, plate, read_at, state, hold_until in rows:
                found = exits.match(plate, read_at, self.open_sessions(exits.lookup_plates(plate)))
                expired = hold_until is not None and hold_until <= system_now
                # Exact at once; fuzzy only once the hold is over (see _record_exit).
                if found.session is not None and (
                    found.kind is sessions.MatchKind.EXACT or state == "orphan" or expired
                ):
                    self._match_row(int(row_id), found.session, found.kind.value, int(read_at), exits, now)
                    matched.append(int(row_id))
                    continue
                waiting = found.candidates or ((found.session,) if found.session is not None else ())
                if waiting:
                    candidates = json.dumps([c.out_serial_number for c in waiting])
                    self._db.execute("UPDATE events SET candidates = ? WHERE id = ?", (candidates, row_id))
                if state == "held" and expired:
                    self._db.execute(
                        "UPDATE events SET state = 'orphan', updated_at = ? WHERE id = ? AND state = 'held'",
                        (now, row_id),
                    )
                    orphaned.append(int(row_id))
            return matched, orphaned

        if not self._query("SELECT 1 FROM events WHERE state IN ('held', 'orphan') LIMIT 1"):
            return [], []
        result: tuple[list[int], list[int]] = self._write(apply)
        return result

    def _match_row(
        self, row_id: int, session: SessionRow, match: str, read_at: int, exits: ExitRules, now: float
    ) -> None:
        when = sessions.exit_timestamp(read_at, session.enter_timestamp)
        self._db.execute(
            "UPDATE events SET state = 'pending', out_serial_number = ?, plate_color = ?, exit_timestamp = ?, "
            "match = ?, clamped = ?, body = ?, depends_on = ?, next_attempt_at = ?, updated_at = ?, candidates = NULL "
            "WHERE id = ? AND state IN ('held', 'orphan')",
            (
                session.out_serial_number,
                session.plate_color,
                when.timestamp,
                match,
                int(when.clamped),
                exits.body(session, when.timestamp),
                session.id,
                now,
                now,
                row_id,
            ),
        )

    def attach(self, exit_id: int, out_serial_number: str, exits: ExitRules, now: float) -> str | None:
        """`edgeagent attach`: join an orphan (or held) exit read to the open session `out_serial_number`;
        its exit is then sent, flagged manual. Returns None, or why it cannot be done."""

        def apply() -> str | None:
            row = self._db.execute(
                "SELECT state, exit_timestamp FROM events WHERE id = ? AND kind = 'exit'", (exit_id,)
            ).fetchone()
            if row is None:
                return f"#{exit_id} is not an exit read"
            if row[0] not in ("held", "orphan"):
                return f"exit #{exit_id} is {row[0]}, not an orphan"
            session = self._open_session(out_serial_number)
            if session is None:
                return f"no open session {out_serial_number} (unknown, or its car has left already)"
            self._match_row(exit_id, session, "manual", int(row[1]), exits, now)
            return None

        problem: str | None = self._write(apply)
        return problem

    def _open_session(self, out_serial_number: str) -> SessionRow | None:
        row = self._db.execute(
            "SELECT id, out_serial_number, plate_number, plate_color, enter_timestamp, body FROM events AS e "
            "WHERE kind = 'entry' AND out_serial_number = ? AND NOT EXISTS "
            "(SELECT 1 FROM events AS x WHERE x.kind = 'exit' AND x.depends_on = e.id)",
            (out_serial_number,),
        ).fetchone()
        return None if row is None else SessionRow(row[0], row[1], row[2], row[3], row[4], bytes(row[5]))

    def dismiss(self, exit_id: int, now: float) -> str | None:
        """`edgeagent dismiss`: an orphan (or held) exit read handled without sending anything (kept)."""

        def apply() -> str | None:
            row = self._db.execute("SELECT state FROM events WHERE id = ? AND kind = 'exit'", (exit_id,)).fetchone()
            if row is None:
                return f"#{exit_id} is not an exit read"
            if row[0] not in ("held", "orphan"):
                return f"exit #{exit_id} is {row[0]}, not an orphan"
            self._db.execute("UPDATE events SET state = 'dismissed', updated_at = ? WHERE id = ?", (now, exit_id))
            return None

        problem: str | None = self._write(apply)
        return problem

    def close_session(self, out_serial_number: str, at: float, exits: ExitRules, now: float) -> int | str:
        """`edgeagent close`: a session whose car left unseen gets an exit at `at`, flagged manual.
        Returns the exit row's id, or why it cannot be done."""

        def apply() -> int | str:
            session = self._open_session(out_serial_number)
            if session is None:
                return f"no open session {out_serial_number} (unknown, or already closed)"
            when = sessions.exit_timestamp(at, session.enter_timestamp)
            return self._insert_exit(
                session,
                camera=None,
                lane=None,
                dedup_key=f"close|{out_serial_number}",
                inbound=None,
                plate_as_read=session.plate_number,
                exit_number="",
                exit_timestamp=when.timestamp,
                clamped=when.clamped,
                match="manual",
                body=exits.body(session, when.timestamp),
                now=now,
                received_at=now,
            )

        result: int | str = self._write(apply)
        return result

    def sessions(self, view: str | None = None, plate: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Sessions, newest first (SPEC §2 `sessions`): each entry with its exit (if any), and every exit
        read that has no session (held, orphan, dismissed). `view`: open | closed | orphans | None (all)."""
        rows = self._query(
            "SELECT e.id AS entry_id, e.out_serial_number, e.plate_number, e.entrance_number, e.enter_timestamp, "
            "e.state AS entry_state, e.received_at, x.id AS exit_id, x.exit_number, x.exit_timestamp, "
            "x.state AS exit_state, x.match, x.clamped, x.plate_number AS exit_plate_read, x.candidates "
            "FROM events AS e LEFT JOIN events AS x ON x.kind = 'exit' AND x.depends_on = e.id "
            "WHERE e.kind = 'entry' AND (? IS NULL OR e.plate_number = ? OR x.plate_number = ?) "
            "UNION ALL "
            "SELECT NULL, NULL, NULL, NULL, NULL, NULL, x.received_at, x.id, x.exit_number, x.exit_timestamp, "
            "x.state, x.match, x.clamped, x.plate_number, x.candidates FROM events AS x "
            "WHERE x.kind = 'exit' AND x.state IN ('held', 'orphan', 'dismissed') "
            "AND (? IS NULL OR x.plate_number = ?) "
            "ORDER BY received_at DESC LIMIT ?",
            (plate, plate, plate, plate, plate, limit if view is None else 1_000_000),
        )
        found = [{key: row[key] for key in row.keys()} for row in rows]  # noqa: SIM118
        if view is not None:
            found = [r for r in found if session_state(r) in _VIEWS[view]][:limit]
        return found

    def session_counts(self, now: float) -> dict[str, Any]:
        """The `sessions` part of `status` (SPEC §7)."""
        open_row = self._query(
            "SELECT count(*), min(e.received_at) FROM events AS e WHERE e.kind = 'entry' AND NOT EXISTS "
            "(SELECT 1 FROM events AS x WHERE x.kind = 'exit' AND x.depends_on = e.id)"
        )[0]
        pending = self._query("SELECT count(*) FROM events WHERE kind = 'exit' AND state IN ('pending', 'dead')")[0][0]
        orphans = self._query("SELECT count(*) FROM events WHERE kind = 'exit' AND state = 'orphan'")[0][0]
        held = self._query("SELECT count(*) FROM events WHERE kind = 'exit' AND state = 'held'")[0][0]
        fuzzy = self._query(
            "SELECT count(*) FROM events WHERE kind = 'exit' AND match = 'fuzzy' AND received_at >= ?", (now - 86400,)
        )[0][0]
        return {
            "open": int(open_row[0]),
            "oldest_open_age_s": None if open_row[1] is None else round(max(0.0, now - float(open_row[1])), 1),
            "exits_pending": int(pending) + int(held),
            "orphans": int(orphans),
            "fuzzy_24h": int(fuzzy),
        }

    def _reject(self, rej: Rejection, inbound: Inbound, now: float, outcome: Recorded = Recorded.REJECTED) -> Record:
        cur = self._db.execute(
            "INSERT INTO events (kind, state, dedup_key, camera, lane, topic, received_at, updated_at, reason, "
            "detail, plate_number, payload_sha256, payload_size, payload) "
            "VALUES ('rejected', 'rejected', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        return Record(outcome, int(cur.lastrowid or 0))

    # -- delivery -----------------------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: Sequence[int] = ()) -> list[Due]:
        """Pending requests whose next attempt is due, oldest first, skipping ids already in flight and
        requests whose prerequisite (`depends_on`: an exit's entry) is not sent yet.
        A NULL next attempt (a re-queued request) is due at once."""
        skip = set(exclude)
        rows = self._query(
            "SELECT id, kind, out_serial_number, body, attempts, received_at FROM events AS r "
            "WHERE state = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
            "AND (depends_on IS NULL OR EXISTS (SELECT 1 FROM events AS p WHERE p.id = r.depends_on "
            "AND p.state = 'sent')) ORDER BY id LIMIT ?",
            (now, limit + len(skip)),
        )
        due = [Due(r[0], Kind(r[1]), r[2], bytes(r[3]), r[4], r[5]) for r in rows if r[0] not in skip]
        return due[:limit]

    def oldest(self, exclude: Sequence[int] = ()) -> list[Due]:
        """The oldest pending request whose prerequisite is sent, due or not: the probe after an outage."""
        skip = set(exclude)
        rows = self._query(
            "SELECT id, kind, out_serial_number, body, attempts, received_at FROM events AS r "
            "WHERE state = 'pending' AND (depends_on IS NULL OR EXISTS (SELECT 1 FROM events AS p "
            "WHERE p.id = r.depends_on AND p.state = 'sent')) ORDER BY id LIMIT ?",
            (1 + len(skip),),
        )
        due = [Due(r[0], Kind(r[1]), r[2], bytes(r[3]), r[4], r[5]) for r in rows if r[0] not in skip]
        return due[:1]

    def wake_backlog(self, now: float) -> int:
        """Every pending request waiting out a backoff is due now (the uplink is back: drain in order)."""

        def apply() -> int:
            cur = self._db.execute(
                "UPDATE events SET next_attempt_at = NULL WHERE state = 'pending' AND next_attempt_at > ?", (now,)
            )
            return int(cur.rowcount)

        woken: int = self._write(apply)
        return woken

    def pending(self, row_id: int) -> Due | None:
        """Row `row_id` if it is pending (a freshly journaled entry handed straight to delivery)."""
        rows = self._query(
            "SELECT id, kind, out_serial_number, body, attempts, received_at FROM events "
            "WHERE id = ? AND state = 'pending'",
            (row_id,),
        )
        return None if not rows else Due(rows[0][0], Kind(rows[0][1]), rows[0][2], bytes(rows[0][3]), *rows[0][4:6])

    def serial_owner(self, serial_number: str) -> int | None:
        """The row already holding WeChat's `serial_number`, if any (one serial_number, one request)."""
        rows = self._query("SELECT id FROM events WHERE serial_number = ? LIMIT 1", (serial_number,))
        return None if not rows else int(rows[0][0])

    def next_due_at(self) -> float | None:
        """When the earliest pending request becomes due, or None when nothing is pending."""
        row = self._query("SELECT min(coalesce(next_attempt_at, 0)) FROM events WHERE state = 'pending'")[0]
        return None if row[0] is None else float(row[0])

    def mark_outcomes(self, marks: Sequence[Marked], now: float) -> None:
        """Apply delivery outcomes in one transaction, each by its transition in `policy.TRANSITIONS`:
        only rows in a state the event may leave change (a row sent meanwhile stays sent)."""

        def where(event: policy.Event) -> str:
            return "WHERE id = ? AND state IN ({})".format(",".join(f"'{s}'" for s in policy.sources(event)))

        def apply() -> None:
            for mark in marks:
                outcome, event = mark.outcome, policy.outcome_event(mark.outcome)
                target = policy.transition(policy.State.IN_FLIGHT, event).value
                uncertain = int(mark.uncertain)
                if isinstance(outcome, policy.Sent):
                    self._db.execute(
                        "UPDATE events SET state = ?, serial_number = ?, sent_at = ?, updated_at = ?, "
                        "attempts = attempts + 1, last_error = NULL, next_attempt_at = NULL, acceptance = ?, "
                        f"answered_at = ? {where(event)}",
                        (
                            target,
                            outcome.serial_number,
                            now,
                            now,
                            "duplicate" if outcome.duplicate else "verified",
                            mark.answered_at,
                            mark.id,
                        ),
                    )
                elif isinstance(outcome, policy.Dead):
                    self._db.execute(
                        "UPDATE events SET state = ?, attempts = attempts + 1, last_error = ?, "
                        f"next_attempt_at = NULL, updated_at = ? {where(event)}",
                        (target, policy.dead_reason(outcome)[:500], now, mark.id),
                    )
                elif isinstance(outcome, policy.Retry):
                    self._db.execute(
                        "UPDATE events SET state = ?, attempts = attempts + 1, next_attempt_at = ?, last_error = ?, "
                        f"uncertain = max(uncertain, ?), updated_at = ? {where(event)}",
                        (target, outcome.at, outcome.reason[:500], uncertain, now, mark.id),
                    )
                else:  # Pause: not the request's fault, no attempt counted, due again at once
                    self._db.execute(
                        "UPDATE events SET state = ?, next_attempt_at = ?, last_error = ?, updated_at = ? "
                        f"{where(event)}",
                        (target, now, outcome.reason[:500], now, mark.id),
                    )

        self._write(apply)

    def requeue(
        self,
        ids: Sequence[int] | None,
        now: float,
        *,
        include_pending: bool = False,
        rebuild: Rebuild | None = None,
    ) -> tuple[list[int], list[int]]:
        """Move dead requests (all when `ids` is None; with `include_pending`, pending ones too) back to
        pending, due at once, keeping their out_serial_number; returns (re-queued ids, kept-body ids).

        `rebuild(kind, body, camera, lane)` gives each a body built from the current config; a request that may
        already have been accepted under its old body (`uncertain`) keeps it (SPEC §5). Due at once
        (next attempt NULL), not at `now`: `edgeagent retry` reads the system clock while the daemon
        schedules on the API-corrected one, which may be far behind it.
        """
        states = policy.sources(policy.Event.REQUEUE) if include_pending else (policy.State.DEAD.value,)
        marks = ",".join("?" * len(states))

        def apply() -> tuple[list[int], list[int]]:
            sql = "SELECT id, kind, body, uncertain, camera, lane FROM events WHERE kind != 'rejected' "
            sql += f"AND state IN ({marks})"
            args: list[Any] = list(states)
            if ids is not None:
                sql += f" AND id IN ({','.join('?' * len(ids))})"
                args += list(ids)
            rows = self._db.execute(sql, args).fetchall()
            kept: list[int] = []
            for row in rows:
                body = bytes(row[2])
                if rebuild is not None:
                    if row[3]:
                        kept.append(int(row[0]))
                    else:
                        body = rebuild(Kind(row[1]), body, row[4], row[5])
                self._db.execute(
                    "UPDATE events SET state = 'pending', next_attempt_at = NULL, updated_at = ?, requeued_at = ?, "
                    "body = ? WHERE id = ?",
                    (now, now, body, row[0]),
                )
            return [int(r[0]) for r in rows], kept

        result: tuple[list[int], list[int]] = self._write(apply)
        return result

    def requeue_dead(self, ids: Sequence[int] | None, now: float) -> list[int]:
        """Dead requests back to pending, keeping number and body (`requeue` without its options)."""
        return self.requeue(ids, now)[0]

    def revive(self, ids: Sequence[int], now: float) -> list[int]:
        """Dead members of a refusal run that turned into a pause: pending again, due at once, no age reset."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        states = ",".join(f"'{s}'" for s in policy.sources(policy.Event.REVIVE))

        def apply() -> list[int]:
            rows = self._db.execute(
                f"SELECT id FROM events WHERE id IN ({marks}) AND state IN ({states})", tuple(ids)
            ).fetchall()
            self._db.executemany(
                "UPDATE events SET state = 'pending', next_attempt_at = NULL, updated_at = ? WHERE id = ?",
                [(now, r[0]) for r in rows],
            )
            return [int(r[0]) for r in rows]

        revived: list[int] = self._write(apply)
        return revived

    def requeued_since(self, since: float) -> bool:
        """Whether a technician re-queued anything at or after `since` (system clock)."""
        return bool(self._query("SELECT 1 FROM events WHERE requeued_at >= ? LIMIT 1", (since,)))

    def expire(self, now: float, max_age_s: float) -> int:
        """Dead-letter pending requests journaled (or re-queued) more than `max_age_s` ago, as "expired"."""
        states = ",".join(f"'{s}'" for s in policy.sources(policy.Event.EXPIRE))

        def apply() -> int:
            cur = self._db.execute(
                f"UPDATE events SET state = 'dead', last_error = ?, next_attempt_at = NULL, updated_at = ? "
                f"WHERE state IN ({states}) AND coalesce(requeued_at, received_at) < ?",
                (f"expired: not delivered within max_entry_age_s={max_age_s:g}", now, now - max_age_s),
            )
            return int(cur.rowcount)

        expired: int = self._write(apply)
        return expired

    def prune(self, now: float) -> int:
        """Delete sent and rejected rows older than 30 days, and the oldest rejected rows over the cap.

        A sent row that an unsent request still depends on (an exit's entry, a re-entry's inferred exit)
        stays: `due()` sends a request only while its prerequisite row is there and `sent`."""

        def apply() -> int:
            cur = self._db.execute(
                "DELETE FROM events WHERE state IN ('sent', 'rejected') AND updated_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM events AS d WHERE d.depends_on = events.id AND d.state != 'sent')",
                (now - RETENTION_S,),
            )
            removed = cur.rowcount
            cur = self._db.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE state = 'rejected' "
                "ORDER BY id DESC LIMIT -1 OFFSET ?)",
                (MAX_REJECTED_ROWS,),
            )
            return int(removed + cur.rowcount)

        removed: int = self._write(apply)
        return removed

    def uncorrected_agent_times(self) -> list[dict[str, Any]]:
        """Pending, never-attempted entries timed by an unsynchronised agent clock in this boot."""
        rows = self._query(
            "SELECT id, out_serial_number, received_mono, enter_timestamp, body FROM events "
            "WHERE state = 'pending' AND kind = 'entry' AND time_source = 'agent' AND clock_synced = 0 "
            "AND time_corrected = 0 AND attempts = 0 AND boot_id = ? AND received_mono IS NOT NULL",
            (self._boot_id,),
        )
        return [{key: row[key] for key in row.keys()} for row in rows]  # noqa: SIM118

    def correct_time(self, row_id: int, enter_timestamp: int, body: bytes, now: float) -> bool:
        """Replace an uncorrected entry's time and body; False if it was attempted meanwhile."""

        def apply() -> bool:
            cur = self._db.execute(
                "UPDATE events SET enter_timestamp = ?, body = ?, time_corrected = 1, updated_at = ? "
                "WHERE id = ? AND state = 'pending' AND attempts = 0 AND time_corrected = 0",
                (enter_timestamp, body, now, row_id),
            )
            return cur.rowcount == 1

        done: bool = self._write(apply)
        return done

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
        sent_24h = self._query("SELECT count(*) FROM events WHERE state = 'sent' AND sent_at >= ?", (now - 86400,))
        return {
            "pending": counts["pending"],
            "oldest_pending_age_s": None if oldest is None else round(max(0.0, now - oldest), 1),
            "dead": counts["dead"],
            "rejected": counts["rejected"],
            "sent_24h": int(sent_24h[0][0]),
        }

    def latencies(self, kind: Kind, since: float) -> list[float]:
        """Seconds from the camera's read (the enter or exit timestamp we reported) to the verified answer,
        of `kind` requests answered since `since`: what WeChat sees, and rates lots by ("进场时延过高")."""
        rows = self._query(
            "SELECT answered_at - coalesce(exit_timestamp, enter_timestamp, received_at) FROM events "
            "WHERE kind = ? AND answered_at >= ? AND acceptance = 'verified' ORDER BY 1",
            (kind.value, since),
        )
        return [max(0.0, float(r[0])) for r in rows]

    def camera_summary(self, now: float) -> dict[str, tuple[float, int]]:
        """Per camera: (last read time, reads in the last 24 h), counting entries and rejected reads."""
        rows = self._query(
            "SELECT camera, max(received_at), sum(received_at >= ?) FROM events "
            "WHERE camera IS NOT NULL GROUP BY camera",
            (now - 86400,),
        )
        return {r[0]: (float(r[1]), int(r[2] or 0)) for r in rows}

    def events(self, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Journal rows, newest first, as plain dicts of their columns (presentation is the caller's)."""
        where, args = ("WHERE state = ?", [state]) if state else ("", [])
        rows = self._query(f"SELECT {COLUMNS} FROM events {where} ORDER BY id DESC LIMIT ?", [*args, limit])
        return [{key: row[key] for key in row.keys()} for row in rows]  # noqa: SIM118

    def get(self, row_id: int) -> dict[str, Any] | None:
        rows = self._query(f"SELECT {COLUMNS} FROM events WHERE id = ?", (row_id,))
        return {key: rows[0][key] for key in rows[0].keys()} if rows else None  # noqa: SIM118

    def body_of(self, row_id: int) -> bytes | None:
        rows = self._query("SELECT body FROM events WHERE id = ?", (row_id,))
        return None if not rows or rows[0][0] is None else bytes(rows[0][0])

    def payload_of(self, row_id: int) -> bytes | None:
        rows = self._query("SELECT payload FROM events WHERE id = ?", (row_id,))
        return None if not rows or rows[0][0] is None else bytes(rows[0][0])

    def integrity_check(self) -> str:
        return str(self._query("PRAGMA integrity_check")[0][0])
