"""The lot topic's wire format (SPEC §11): session snapshots and exit records as typed values.

Pure code: bytes and strings in, values out; no paho, no journal, no clock. The `lot` adapter (the
engine) publishes what `encode` returns and hands every message it hears to `decode`.

Topics, under `[lot] topic` (`lots/WXPARK001/sessions`, say):

    <lot.topic>/<out_serial_number>         the session's snapshot, written by its owner only
    <lot.topic>/<out_serial_number>/exit    the exit record of a box that read the exit of a session
                                            another box owns

Both are retained, QoS 1, compact JSON objects with exactly the fields of SPEC §11 (`null` where a
field has no value yet). An empty retained payload clears a topic (`Cleared`). Anything else on the
lot topic is `Rejected` with a reason: the receiver logs it and moves on, it never becomes an entry.

Revisions: `rev` is the writer's own counter for the topic, 1 and up. Receivers keep, per topic and
writing box, the message with the highest `rev` and drop the rest (`newer`): a bridge may hand the same
retained message over several times (on every reconnect, and once per bridge hop). A writer that hears
its own topic with a higher `rev` than it holds (a journal restored from a backup, a box re-installed
with the same `serial_prefix`) continues above it (`next_rev`), so its next message wins again.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final, TypeVar

from edgeagent import plates
from edgeagent.model import EntryState, PlateColor
from edgeagent.sessions import TRANSITIONS, Row, SessionState

E = TypeVar("E", bound=enum.StrEnum)
T = TypeVar("T")

__all__ = [
    "EXIT_SUFFIX",
    "MAX_PAYLOAD_BYTES",
    "MAX_REV",
    "Cleared",
    "ExitRecord",
    "ExitState",
    "Message",
    "Reason",
    "Rejected",
    "Snapshot",
    "decode",
    "encode",
    "epoch_of",
    "exit_topic_for",
    "newer",
    "next_rev",
    "parse_topic",
    "prefix_of",
    "topic_for",
]

EXIT_SUFFIX: Final = "exit"

# A snapshot is ~400 bytes (a 16-character plate is 48 bytes of UTF-8, an entrance number at most 128).
# 4 KiB is ten times that and small enough that no nesting or number in it costs anything to parse.
MAX_PAYLOAD_BYTES: Final = 4096

# SQLite's INTEGER, where the journal keeps revisions; a bigger one is junk, not a newer message.
MAX_REV: Final = 2**63 - 1

# Unix seconds: from 2001 (10 digits) to 2100. Cameras without a clock send 0 or 1970; those reads never
# become entries (SPEC §5), so no honest snapshot carries one.
MIN_TIMESTAMP: Final = 1_000_000_000
MAX_TIMESTAMP: Final = 4_102_444_800

# `Journal.serial_for`: serial_prefix (1-12 of [A-Za-z0-9], SPEC §3) + the journal's epoch (6 of
# [A-Z0-9], random per journal file) + the row id in 10 digits. Epoch and id have fixed widths, so the
# prefix is everything before the last 16 characters: the number names the box that minted it.
_EPOCH_LEN: Final = 6
_ID_DIGITS: Final = 10
_SERIAL = re.compile(r"[A-Za-z0-9]{1,12}[A-Z0-9]{6}[0-9]{10}")
_PREFIX = re.compile(r"[A-Za-z0-9]{1,12}")
_NUMBER = re.compile(r"[A-Za-z0-9]{1,128}")  # entrance_number, and [[exits]].number (SPEC §3)


# A session row's states (sessions.TRANSITIONS); orphan and dismissed belong to local exit rows.
_SESSION_STATES: Final = frozenset(SessionState(s) for s in TRANSITIONS[Row.SESSION])
_ENTRY_STATES: Final = frozenset({EntryState.PENDING, EntryState.SENT, EntryState.DEAD})


class ExitState(enum.StrEnum):
    """`exit_state` of an exit record: where the exit box's request for the owner's session stands."""

    WAITING = "waiting"  # matched; waits until the owner's snapshot shows the entry accepted (SPEC §11)
    PENDING = "pending"  # queued for WeChat Pay under the owner's number
    SENT = "sent"  # verified 204: the owner marks the session closed when it hears this
    DEAD = "dead"  # refused for good; waits for `edgeagent retry`, as a local exit would (SPEC §10)


class Reason(enum.StrEnum):
    """Why a message on the lot topic was not taken (logged with its detail, counted in status)."""

    FOREIGN_TOPIC = "foreign_topic"  # not <lot.topic>/<out_serial_number>[/exit]
    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"  # not UTF-8, not JSON, NaN, duplicate keys, nested too deep
    NOT_OBJECT = "not_object"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_VALUE = "bad_value"  # out of range, not one of the enum's values, not a valid plate
    WRONG_BOX = "wrong_box"  # a snapshot not from the number's owner, or an exit record from it
    INCONSISTENT = "inconsistent"  # fields that contradict each other (an open session with an exit)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A session as its owner publishes it at `<lot.topic>/<serial>` (SPEC §11). `serial` is the topic's."""

    serial: str
    box: str
    rev: int
    state: SessionState
    plate_number: str
    plate_color: PlateColor
    enter_timestamp: int
    entrance_number: str
    entry_state: EntryState
    exit_timestamp: int | None = None
    exit_box: str | None = None


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """An exit another box read for the session `serial`, at `<lot.topic>/<serial>/exit` (SPEC §11)."""

    serial: str
    box: str
    rev: int
    exit_number: str
    exit_timestamp: int
    exit_state: ExitState


@dataclass(frozen=True, slots=True)
class Cleared:
    """An empty retained payload: the writer cleared the topic (a closed session, a day later)."""

    serial: str
    is_exit: bool


@dataclass(frozen=True, slots=True)
class Rejected:
    """Not a message of ours: never an entry, never matched against."""

    reason: Reason
    detail: str


Message = Snapshot | ExitRecord


# -- topics ---------------------------------------------------------------------------------------------


def prefix_of(serial: str) -> str:
    """The `serial_prefix` of the box that minted `serial` (`Journal.serial_for`'s layout)."""
    return serial[: -(_EPOCH_LEN + _ID_DIGITS)]


def epoch_of(serial: str) -> str:
    """The journal epoch in `serial`: a box whose journal was recreated mints numbers with a new one."""
    return serial[-(_EPOCH_LEN + _ID_DIGITS) : -_ID_DIGITS]


def topic_for(lot_topic: str, serial: str) -> str:
    """`<lot.topic>/<out_serial_number>`: the owner's snapshot."""
    if not _SERIAL.fullmatch(serial):
        raise ValueError(f"not an out_serial_number of ours: {serial!r}")
    return f"{lot_topic}/{serial}"


def exit_topic_for(lot_topic: str, serial: str) -> str:
    """`<lot.topic>/<out_serial_number>/exit`: the exit box's record."""
    return f"{topic_for(lot_topic, serial)}/{EXIT_SUFFIX}"


def parse_topic(lot_topic: str, topic: str) -> tuple[str, bool] | None:
    """`(serial, is_exit)` for a topic under `lot_topic`, or None for anything else.

    Exact, level by level: the serial must have `Journal.serial_for`'s layout, so wildcards, empty
    levels, `..`, `$` topics and longer paths are all None.
    """
    head = lot_topic + "/"
    if not lot_topic or not topic.startswith(head):
        return None
    levels = topic[len(head) :].split("/")
    if not _SERIAL.fullmatch(levels[0]):
        return None
    if len(levels) == 1:
        return levels[0], False
    if len(levels) == 2 and levels[1] == EXIT_SUFFIX:
        return levels[0], True
    return None


# -- revisions ------------------------------------------------------------------------------------------


def newer(existing_rev: int | None, incoming_rev: int) -> bool:
    """Whether a message with `incoming_rev` replaces what is kept for its topic and box.

    Strictly higher wins; an equal `rev` is a repeat (a bridge's echo, a re-publish) and a lower one a
    stale copy (a retained message handed over again after a newer one). A `rev` never goes backwards
    on purpose, so it is never taken, and nothing about epochs is needed here:
    - a snapshot's topic holds its number, and the number holds the owner's journal epoch: a box whose
      journal was recreated mints new numbers, so its counters start on new topics;
    - a writer that lost its counter but kept its name (a journal restored from a backup; an exit box's
      journal recreated while one of its exit records is still retained) hears its own retained
      message when it subscribes and continues above it (`next_rev`) before it publishes there.
    """
    return existing_rev is None or incoming_rev > existing_rev


def next_rev(own_rev: int, heard_rev: int | None = None) -> int:
    """The `rev` of a writer's next message on a topic: above its own and above any it heard there."""
    return max(own_rev, heard_rev or 0) + 1


# -- payloads -------------------------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _Bad(Reason.NOT_JSON, "duplicate key")  # which one wins differs between JSON parsers
    return found


def _no_constant(name: str) -> Any:
    raise _Bad(Reason.NOT_JSON, f"{name} is not JSON")


def _load(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _Bad(Reason.TOO_LARGE, f"{len(payload)} bytes (at most {MAX_PAYLOAD_BYTES})")
    try:
        value = json.loads(payload.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_no_constant)
    except _Bad:
        raise
    except UnicodeDecodeError as exc:
        raise _Bad(Reason.NOT_JSON, f"not UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise _Bad(Reason.NOT_JSON, exc.msg) from None
    except (RecursionError, ValueError) as exc:  # nesting past the recursion limit; int digits limit
        raise _Bad(Reason.NOT_JSON, type(exc).__name__) from None
    if not isinstance(value, dict):
        raise _Bad(Reason.NOT_OBJECT, f"a JSON {type(value).__name__}, not an object")
    return value


def _fields(cls: type[Snapshot] | type[ExitRecord]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name != "serial")


_SNAPSHOT_FIELDS: Final = _fields(Snapshot)
_EXIT_FIELDS: Final = _fields(ExitRecord)
_NULLABLE: Final = frozenset({"exit_timestamp", "exit_box"})


def _check_keys(obj: dict[str, Any], names: tuple[str, ...]) -> None:
    unknown = sorted(set(obj) - set(names))
    if unknown:
        raise _Bad(Reason.UNKNOWN_FIELD, ", ".join(repr(k[:40]) for k in unknown[:3]))
    missing = [n for n in names if n not in obj]
    if missing:
        raise _Bad(Reason.MISSING_FIELD, ", ".join(missing))


def _int(obj: dict[str, Any], name: str, low: int, high: int) -> int:
    value = obj[name]
    if type(value) is not int:  # bool is an int subclass, and 1.0 is not a counter
        raise _Bad(Reason.WRONG_TYPE, f"{name}: {type(value).__name__}, not an integer")
    if not low <= value <= high:
        raise _Bad(Reason.BAD_VALUE, f"{name}: out of range {low}..{high}")
    return value


def _str(obj: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = obj[name]
    if type(value) is not str:
        raise _Bad(Reason.WRONG_TYPE, f"{name}: {type(value).__name__}, not a string")
    if not pattern.fullmatch(value):
        raise _Bad(Reason.BAD_VALUE, f"{name}: {value[:40]!r} is not {pattern.pattern}")
    return value


def _enum(obj: dict[str, Any], name: str, allowed: frozenset[E] | type[E]) -> E:
    value = obj[name]
    if type(value) is not str:
        raise _Bad(Reason.WRONG_TYPE, f"{name}: {type(value).__name__}, not a string")
    for member in allowed:
        if member.value == value:
            return member
    raise _Bad(Reason.BAD_VALUE, f"{name}: {value[:40]!r} is not one of {sorted(m.value for m in allowed)}")


def _plate(obj: dict[str, Any]) -> str:
    value = obj["plate_number"]
    if type(value) is not str:
        raise _Bad(Reason.WRONG_TYPE, f"plate_number: {type(value).__name__}, not a string")
    # Only the canonical form of a valid plate: the owner journaled it normalised, and matching
    # (SPEC §10) compares exact strings, so an unnormalised one would never match a read.
    if len(value) > plates.MAX_PLATE_LENGTH or plates.normalise(value) != value:
        raise _Bad(Reason.BAD_VALUE, f"plate_number: {value[:20]!r} is not a normalised plate")
    if plates.classify(value) is not plates.PlateClass.VALID:
        raise _Bad(Reason.BAD_VALUE, f"plate_number: {value!r} is not a valid plate")
    return value


def _optional(obj: dict[str, Any], name: str, read: Callable[[dict[str, Any], str], T]) -> T | None:
    return None if obj[name] is None else read(obj, name)


def _snapshot(serial: str, obj: dict[str, Any]) -> Snapshot:
    _check_keys(obj, _SNAPSHOT_FIELDS)
    box = _str(obj, "box", _PREFIX)
    # The writer of a snapshot is the box whose serial_prefix minted the number. That box journaled the
    # entry, sends it (and, for its own exits, the exit) to WeChat Pay, and is the only one whose journal
    # can say what the session's state is (DESIGN: each box's journal is its own source of truth). The
    # rule needs no registry of boxes: serial_prefix is unique per agent of a merchant (SPEC §3) and
    # every box can read it off the number. It is the one ownership check Mosquitto's ACLs cannot make
    # (a topic level cannot be matched by its prefix: docs/deploy.md, "One lot, several boxes").
    if box != prefix_of(serial):
        raise _Bad(Reason.WRONG_BOX, f"box {box!r} did not mint {serial} (its owner is {prefix_of(serial)!r})")
    enter = _int(obj, "enter_timestamp", MIN_TIMESTAMP, MAX_TIMESTAMP)
    snapshot = Snapshot(
        serial=serial,
        box=box,
        rev=_int(obj, "rev", 1, MAX_REV),
        state=_enum(obj, "state", _SESSION_STATES),
        plate_number=_plate(obj),
        plate_color=_enum(obj, "plate_color", PlateColor),
        enter_timestamp=enter,
        entrance_number=_str(obj, "entrance_number", _NUMBER),
        entry_state=_enum(obj, "entry_state", _ENTRY_STATES),
        exit_timestamp=_optional(obj, "exit_timestamp", lambda o, n: _int(o, n, MIN_TIMESTAMP, MAX_TIMESTAMP)),
        exit_box=_optional(obj, "exit_box", lambda o, n: _str(o, n, _PREFIX)),
    )
    _consistent(snapshot)
    return snapshot


def _consistent(s: Snapshot) -> None:
    has_exit = s.exit_timestamp is not None
    if (s.state is SessionState.OPEN) == has_exit or (s.exit_box is not None) != has_exit:
        raise _Bad(
            Reason.INCONSISTENT, f"state {s.state} with exit_timestamp {s.exit_timestamp}, exit_box {s.exit_box}"
        )
    # SPEC §10 clamps every exit to at least entry + 1, so an exit at or before the entry is not ours.
    if s.exit_timestamp is not None and s.exit_timestamp <= s.enter_timestamp:
        raise _Bad(Reason.INCONSISTENT, "exit_timestamp is not after enter_timestamp")


def _exit_record(serial: str, obj: dict[str, Any]) -> ExitRecord:
    _check_keys(obj, _EXIT_FIELDS)
    box = _str(obj, "box", _PREFIX)
    # Exit records are for sessions of *other* boxes; the owner's own exits are in its snapshot.
    if box == prefix_of(serial):
        raise _Bad(Reason.WRONG_BOX, f"box {box!r} owns {serial}: its exit belongs in its snapshot")
    return ExitRecord(
        serial=serial,
        box=box,
        rev=_int(obj, "rev", 1, MAX_REV),
        exit_number=_str(obj, "exit_number", _NUMBER),
        exit_timestamp=_int(obj, "exit_timestamp", MIN_TIMESTAMP, MAX_TIMESTAMP),
        exit_state=_enum(obj, "exit_state", ExitState),
    )


def decode(lot_topic: str, topic: str, payload: bytes) -> Message | Cleared | Rejected:
    """What a message heard on `<lot.topic>/#` is: a snapshot, an exit record, a clear, or rejected."""
    where = parse_topic(lot_topic, topic)
    if where is None:
        return Rejected(Reason.FOREIGN_TOPIC, repr(topic[:200]))
    serial, is_exit = where
    if not payload:
        return Cleared(serial, is_exit)
    try:
        obj = _load(payload)
        return _exit_record(serial, obj) if is_exit else _snapshot(serial, obj)
    except _Bad as bad:
        return Rejected(bad.reason, bad.detail)


def _payload(message: Message) -> dict[str, Any]:
    names = _SNAPSHOT_FIELDS if isinstance(message, Snapshot) else _EXIT_FIELDS
    return {name: getattr(message, name) for name in names}


def encode(message: Message) -> bytes:
    """Compact JSON for `message`'s topic (`topic_for` / `exit_topic_for`), in SPEC §11's field order.

    Raises ValueError for a message `decode` would reject: a box never publishes what its peers refuse.
    """
    body = json.dumps(_payload(message), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    lot = "lot"
    topic = exit_topic_for(lot, message.serial) if isinstance(message, ExitRecord) else topic_for(lot, message.serial)
    back = decode(lot, topic, body)
    if isinstance(back, Rejected):
        raise ValueError(f"{topic}: would be rejected: {back.reason}: {back.detail}")
    return body
