"""What happens to an exit read when it is journaled, and to a session a re-entry closes (SPEC §10).

The rules of `sessions` (pure matching, re-entry, clamp, hold) applied to what the journal holds:
which plates to look up for a read, which session it belongs to, and the exit request's body, built
from the *session* (its number, plate, colour and parking_id: what WeChat knows) with the exit time
clamped to at least the entry's time + 1. The journal calls these inside the transaction that records
the read, so a read and its match are one atomic step; the rules themselves do no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from edgeagent import requests, sessions
from edgeagent.config import Config
from edgeagent.model import MatchMode, PlateColor, ReentryMode


class SessionLike(Protocol):
    """An open session as the journal reads it: the entry's number, plate, colour, time and body."""

    @property
    def out_serial_number(self) -> str: ...
    @property
    def plate_number(self) -> str: ...
    @property
    def plate_color(self) -> str: ...
    @property
    def enter_timestamp(self) -> int: ...
    @property
    def body(self) -> bytes: ...


S = TypeVar("S", bound=SessionLike)


@dataclass(frozen=True, slots=True)
class ExitRules:
    """`[sessions]` and the repeat window, with the decisions that use them."""

    match_mode: MatchMode
    reentry_mode: ReentryMode
    exit_hold_s: float
    repeat_window_s: float

    @classmethod
    def from_config(cls, config: Config) -> ExitRules:
        s = config.sessions
        return cls(s.match, s.reentry, s.exit_hold_s, config.parking.repeat_window_s)

    def lookup_plates(self, plate: str) -> list[str]:
        """Every plate an open session may have for an exit read of `plate` to match it: the plate itself
        and, with `match = "confusable"`, each plate one confusable or province character away. The
        journal looks these up by index instead of scanning every open session."""
        found = [plate]
        if self.match_mode is MatchMode.EXACT:
            return found
        for position, char in enumerate(plate):
            if position == 0 and char in sessions.PROVINCES:
                others: Iterable[str] = sorted(sessions.PROVINCES - {char})
            else:
                others = (c for group in sessions.CONFUSABLE_GROUPS if char in group for c in group if c != char)
            found += [plate[:position] + other + plate[position + 1 :] for other in others]
        return found

    def match(self, plate: str, read_at: float, open_sessions: Iterable[S]) -> sessions.Match[S]:
        return sessions.match_exit(plate, read_at, open_sessions, self.match_mode)

    def reentry(self, plate: str, enter_timestamp: int, open_sessions: Iterable[S]) -> sessions.Reentry[S]:
        return sessions.reentry(plate, enter_timestamp, open_sessions, self.reentry_mode)

    def body(self, session: SessionLike, exit_timestamp: int) -> bytes:
        """The exit request of `session`: the entry's number, plate, colour and parking_id (SPEC §10)."""
        entry = requests.parse_entry_body(session.body)
        return requests.build_exit_body(
            requests.ExitRequest(
                out_serial_number=session.out_serial_number,
                exit_timestamp=exit_timestamp,
                plate_number=entry.plate_number,
                plate_color=PlateColor(session.plate_color),
                parking_id=entry.parking_id,
            )
        )
