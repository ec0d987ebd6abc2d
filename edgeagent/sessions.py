"""Parking sessions, the pure domain of SPEC §10: match an exit read to an open session, re-entry,
exit-time clamp, exit hold, exit repeats, and the session state machine.

No I/O and no clock: times are passed in, sessions come in as values (anything with the attributes
of `SessionKey`, e.g. the journal's own row type) and come back as the same objects. The journal
stores sessions; these rules do not know SQLite (DESIGN "Sessions are the parking domain").

Times: `enter_timestamp` and exit times are Unix seconds from the cameras (SPEC §5 `timestamp_source`);
the exit hold runs on the agent's clock, from when the exit read was received.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from edgeagent.model import MatchMode, ReentryMode

# Characters cameras read for one another (SPEC §10; the patent in parking-sessions.md §2 lists 0/D/Q,
# B/8, 2/Z, 5/S, A/4; 1/I/7 and 6/G are SPEC's additions). Within a group every pair is confusable.
CONFUSABLE_GROUPS: tuple[str, ...] = ("0DQ", "8B", "2Z", "5S", "4A", "1I7", "6G")
_GROUP_OF: dict[str, str] = {ch: group for group in CONFUSABLE_GROUPS for ch in group}

# The 31 province abbreviations that start a mainland plate (anpr-formats.md §12.1, as in plates.py).
# A wrong province character is the other common misread ("允许错第一个汉字", parking-sessions.md §2).
PROVINCES = frozenset("京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼")

# How far a session's entry may lie *after* the exit read and still be its session. Two cameras, or
# two boxes, disagree on the time; SPEC §10 clamps such an exit to entry + 1 and flags it. One minute
# covers real camera-clock drift; a bigger gap more likely means a different passage (the car left
# before this entry, i.e. an earlier stay whose entry was missed), and closing a live session by
# mistake is worse than an orphan a person can attach. Sessions that entered before the exit always
# win over ones inside this tolerance.
CLOCK_TOLERANCE_S = 60.0


class SessionKey(Protocol):
    """What matching needs of an open session; the journal's row type can provide it as is."""

    @property
    def out_serial_number(self) -> str: ...
    @property
    def plate_number(self) -> str: ...
    @property
    def enter_timestamp(self) -> int: ...


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A plain `SessionKey`, for callers and tests without a row type of their own."""

    out_serial_number: str
    plate_number: str
    enter_timestamp: int


S = TypeVar("S", bound=SessionKey)


def confusable(a: str, b: str) -> bool:
    """True if `a` and `b` are two different characters of one confusable group (0/D/Q, 8/B, ...)."""
    return a != b and a in _GROUP_OF and _GROUP_OF[a] == _GROUP_OF.get(b)


@dataclass(frozen=True, slots=True)
class Difference:
    """The one position where an exit read differs from a session's plate, and the two characters."""

    position: int
    read: str
    session: str

    @property
    def province(self) -> bool:
        return self.position == 0 and self.read in PROVINCES and self.session in PROVINCES


def one_difference(read_plate: str, session_plate: str) -> Difference | None:
    """The single confusable (or province) difference between two plates, else None.

    Same length, exactly one differing position, and there either a confusable pair or two
    province characters at position 0 (SPEC §10). Equal plates are an exact match, not a difference.
    """
    if len(read_plate) != len(session_plate):
        return None
    diffs = [i for i, (a, b) in enumerate(zip(read_plate, session_plate, strict=True)) if a != b]
    if len(diffs) != 1:
        return None
    found = Difference(diffs[0], read_plate[diffs[0]], session_plate[diffs[0]])
    return found if found.province or confusable(found.read, found.session) else None


class MatchKind(enum.StrEnum):
    """How an exit read found its session. `exact` and `fuzzy` are the journal's `match` values."""

    EXACT = "exact"
    FUZZY = "fuzzy"
    NONE = "none"
    AMBIGUOUS = "ambiguous"  # several sessions fit one confusable character: nobody is guessed


@dataclass(frozen=True, slots=True)
class Match(Generic[S]):
    """The outcome of `match_exit`: the session (exact/fuzzy), the difference (fuzzy), and every
    session that fitted when there was more than one (the evidence the journal keeps)."""

    kind: MatchKind
    session: S | None = None
    difference: Difference | None = None
    candidates: tuple[S, ...] = ()


def _order(session: SessionKey) -> tuple[int, str]:
    return session.enter_timestamp, session.out_serial_number


def match_exit(
    plate: str,
    exit_time: float,
    open_sessions: Iterable[S],
    mode: MatchMode,
    *,
    clock_tolerance_s: float = CLOCK_TOLERANCE_S,
) -> Match[S]:
    """Match a screened exit read (normalised `plate`, camera time) to one of `open_sessions` (SPEC §10).

    A session fits when it entered at most `clock_tolerance_s` after the exit. The same plate wins;
    of several such sessions (possible with `reentry = "keep"`, or across boxes) the latest entry at
    or before the exit is taken, as older ones are stays whose exit was missed; failing that, the
    earliest within the tolerance. Then, with `MatchMode.CONFUSABLE`, a plate one confusable or
    province character away, only when exactly one session fits: two give AMBIGUOUS with both listed.
    Colour is not compared: cameras disagree on it (parking-sessions.md §4.2).
    """
    fitting = sorted((s for s in open_sessions if s.enter_timestamp <= exit_time + clock_tolerance_s), key=_order)
    exact = [s for s in fitting if s.plate_number == plate]
    if exact:
        before = [s for s in exact if s.enter_timestamp <= exit_time]
        chosen = before[-1] if before else exact[0]
        return Match(MatchKind.EXACT, chosen, candidates=tuple(exact) if len(exact) > 1 else ())
    if mode is MatchMode.EXACT:
        return Match(MatchKind.NONE)
    fuzzy = [(s, d) for s in fitting if (d := one_difference(plate, s.plate_number)) is not None]
    if len(fuzzy) == 1:
        [(session, difference)] = fuzzy
        return Match(MatchKind.FUZZY, session, difference)
    if fuzzy:
        return Match(MatchKind.AMBIGUOUS, candidates=tuple(s for s, _ in fuzzy))
    return Match(MatchKind.NONE)


@dataclass(frozen=True, slots=True)
class ExitTime:
    """`exit_timestamp` to send, and whether it was raised to entry + 1 (flagged in the journal)."""

    timestamp: int
    clamped: bool


def exit_timestamp(read_time: float, enter_timestamp: int) -> ExitTime:
    """`max(read time, enter + 1)` in whole seconds (SPEC §10): an exit never precedes its entry.

    Clocks of two cameras or boxes disagree (parking-sessions.md §3); the sandbox, like the API
    presumably, refuses an exit before the entry (SPEC §8), so the clamp keeps the exit sendable.
    """
    wanted = int(read_time)
    return ExitTime(max(wanted, enter_timestamp + 1), wanted < enter_timestamp + 1)


@dataclass(frozen=True, slots=True)
class InferredExit(Generic[S]):
    """A session to close, flagged `inferred`, with the exit time to send (SPEC §10 re-entry)."""

    session: S
    exit: ExitTime


@dataclass(frozen=True, slots=True)
class Reentry(Generic[S]):
    """What an entry of a plate does to the open sessions of the same plate.

    `close`: sessions to close first, at the new entry's time, each sent before the new entry.
    `superseded_by`: an open session of the plate that entered *after* this entry (an offline
    re-send arriving late); the new session itself is then over, and closes at that session's entry.
    """

    close: tuple[InferredExit[S], ...] = ()
    superseded_by: S | None = None


def reentry(plate: str, enter_timestamp: int, open_sessions: Iterable[S], mode: ReentryMode) -> Reentry[S]:
    """Decide re-entry for a new entry of `plate` (SPEC §10 `reentry`); `KEEP` changes nothing.

    Only the exact plate counts: a confusable guess here would close another car's session. A session
    entered in the same second is the same passage, the repeat window's business, and is left alone.
    """
    if mode is ReentryMode.KEEP:
        return Reentry()
    same = sorted((s for s in open_sessions if s.plate_number == plate), key=_order)
    older = tuple(
        InferredExit(s, exit_timestamp(enter_timestamp, s.enter_timestamp))
        for s in same
        if s.enter_timestamp < enter_timestamp
    )
    newer = [s for s in same if s.enter_timestamp > enter_timestamp]
    return Reentry(older, newer[0] if newer else None)


def hold_deadline(received_at: float, exit_hold_s: float) -> float:
    """When an unmatched exit read stops waiting for its entry and becomes an orphan (SPEC §10).

    `received_at` is the agent's time of receipt, not the camera's: the hold waits for data to
    arrive (a late entry, another box's session over a bridge), which the camera's clock cannot tell.
    """
    return received_at + exit_hold_s


def hold_expired(received_at: float, now: float, exit_hold_s: float) -> bool:
    """True once an unmatched exit read received at `received_at` is an orphan at `now`."""
    return now >= hold_deadline(received_at, exit_hold_s)


class SeenExit(Protocol):
    """An exit already accepted, as the repeat rule needs it (plate as read, normalised)."""

    @property
    def plate_number(self) -> str: ...
    @property
    def exit_number(self) -> str: ...
    @property
    def read_at(self) -> float: ...


E = TypeVar("E", bound=SeenExit)


def repeat_of(plate: str, exit_number: str, read_at: float, recent: Iterable[E], window_s: float) -> E | None:
    """The accepted exit this read repeats, else None (SPEC §10: a car waiting at the barrier is read
    many times). Same plate as read, same exit, within `window_s` either way of it, like the entry rule
    in the journal (`repeat_window_s`); of several, the nearest in time."""
    same = [e for e in recent if e.plate_number == plate and e.exit_number == exit_number]
    near = [e for e in same if abs(e.read_at - read_at) <= window_s]
    return min(near, key=lambda e: abs(e.read_at - read_at), default=None)


# -- the state machine ---------------------------------------------------------------------------------


class SessionState(enum.StrEnum):
    """`state` in `sessions --json` (SPEC §2)."""

    OPEN = "open"  # entry journaled (pending or sent), no exit yet
    EXIT_PENDING = "exit_pending"  # an exit is decided and waits: for its entry to be sent, or to be sent
    CLOSED = "closed"  # the exit was sent (verified 204) or another box closed it
    ORPHAN = "orphan"  # an exit read that matched nothing within exit_hold_s; never sent as is
    DISMISSED = "dismissed"  # an orphan a person marked handled (`edgeagent dismiss`); kept


class Row(enum.StrEnum):
    """The two kinds of row `sessions` lists, each with its own transitions (as h11 keys by role)."""

    SESSION = "session"  # an entry and, later, its exit
    EXIT = "exit"  # an exit read that matched no session (yet)


class SessionEvent(enum.StrEnum):
    EXIT_MATCHED = "exit_matched"  # an exit read matched it (exact, fuzzy, attach, late match)
    EXIT_INFERRED = "exit_inferred"  # re-entry of the same plate closes it (reentry = close_previous)
    CLOSED_MANUALLY = "closed_manually"  # `edgeagent close OUT_SERIAL`
    EXIT_SENT = "exit_sent"  # the exit got its verified 204
    CLOSED_BY_PEER = "closed_by_peer"  # another box's exit record says it sent the exit (SPEC §11)
    HOLD_EXPIRED = "hold_expired"  # exit_hold_s passed without a session
    ATTACHED = "attached"  # the exit read joined a session: `attach`, or a session that fits arrived
    DISMISSED = "dismissed"  # `edgeagent dismiss EXIT_ID`


INITIAL: dict[Row, SessionState] = {Row.SESSION: SessionState.OPEN, Row.EXIT: SessionState.EXIT_PENDING}

# Every legal transition; anything else is a bug in the caller, never silently ignored. An exit
# row that joins a session is CLOSED as a row: from then on its exit is the session's.
TRANSITIONS: dict[Row, dict[SessionState, dict[SessionEvent, SessionState]]] = {
    Row.SESSION: {
        SessionState.OPEN: {
            SessionEvent.EXIT_MATCHED: SessionState.EXIT_PENDING,
            SessionEvent.EXIT_INFERRED: SessionState.EXIT_PENDING,
            SessionEvent.CLOSED_MANUALLY: SessionState.EXIT_PENDING,
            SessionEvent.CLOSED_BY_PEER: SessionState.CLOSED,
        },
        SessionState.EXIT_PENDING: {
            SessionEvent.EXIT_SENT: SessionState.CLOSED,
            SessionEvent.CLOSED_BY_PEER: SessionState.CLOSED,
        },
        SessionState.CLOSED: {},
    },
    Row.EXIT: {
        SessionState.EXIT_PENDING: {
            SessionEvent.ATTACHED: SessionState.CLOSED,
            SessionEvent.HOLD_EXPIRED: SessionState.ORPHAN,
        },
        SessionState.ORPHAN: {
            SessionEvent.ATTACHED: SessionState.CLOSED,
            SessionEvent.DISMISSED: SessionState.DISMISSED,
        },
        SessionState.CLOSED: {},
        SessionState.DISMISSED: {},
    },
}


class IllegalTransition(ValueError):
    """An event that the state machine does not allow in this state (a bug, not bad input)."""


def transition(row: Row, state: SessionState, event: SessionEvent) -> SessionState:
    """The state after `event`, or raise `IllegalTransition`."""
    found = TRANSITIONS[row].get(state, {}).get(event)
    if found is None:
        raise IllegalTransition(f"{row} in state {state}: {event} is not allowed")
    return found
