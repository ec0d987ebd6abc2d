"""Time: the agent's wall clock, its offset from the API's clock, and whether the system clock is synced.

A gate controller has no RTC (reliability.md §5): after a power cut the clock restarts in the past
until NTP syncs. Signatures and entry times are only as good as the clock, so the agent learns the
API's offset from answers whose signature verified (their `Wechatpay-Timestamp`, SPEC §5) and asks
the kernel whether time is synchronised. Every time read of the delivery loop goes through a
`Clock`, so tests can step it by hand (`now`, `system`, `monotonic` are the three readings).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from collections import deque
from pathlib import Path

TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
STA_UNSYNC = 0x0040
TIME_ERROR = 5


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux); only `status` and the return value are used.
    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("padding", ctypes.c_int * 11),
    ]  # fmt: skip


def system_clock_synchronized() -> tuple[bool, str]:
    """(synchronised?, how we know). `EDGEAGENT_CLOCK_SYNCED=1|0` overrides, for containers and tests."""
    forced = os.environ.get("EDGEAGENT_CLOCK_SYNCED")
    if forced in ("0", "1"):
        return forced == "1", "EDGEAGENT_CLOCK_SYNCED"
    if TIMESYNC_FLAG.exists():
        return True, str(TIMESYNC_FLAG)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return False, "unknown (no timesync flag, adjtimex unavailable)"
    if state < 0:
        return False, "unknown (adjtimex failed)"
    synced = state != TIME_ERROR and not (tx.status & STA_UNSYNC)
    return synced, "adjtimex"


# A signed answer more than 300 s off our clock is either the API's clock having stepped or a replay of an
# old answer. A replayed answer keeps its old timestamp, so replays seen at different times disagree about
# the offset; answers from an API whose clock stepped agree. A stale offset is adopted only once
# STALE_WITNESSES answers with different timestamps, seen within STALE_WINDOW_S, agree within STALE_AGREE_S.
STALE_WITNESSES = 2
STALE_AGREE_S = 2.0
STALE_WINDOW_S = 120.0


class Clock:
    """Wall time corrected by the offset learnt from the API, plus the monotonic clock.

    Thread-safe: the delivery loop updates the offset, every other thread reads it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset: float | None = None
        self._sync_cache: tuple[float, bool, str] = (-1e9, False, "")
        self._stale: deque[tuple[float, int, float]] = deque(maxlen=8)  # (monotonic, server time, offset)

    def system(self) -> float:
        """The system clock, uncorrected (what stamps `received_at`)."""
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    @property
    def offset(self) -> float | None:
        """API clock minus our clock, in seconds; None until a verified answer told us."""
        with self._lock:
            return self._offset

    def witness(self, server_time: int, sent_at: float, received_at: float, *, fresh: bool) -> bool:
        """Learn from the signed `Wechatpay-Timestamp` of an answer whose signature verified.

        `fresh`: it was within 300 s of `now()` (a normal answer: follow it, smoothing jitter). A stale
        one counts only when corroborated (see STALE_WITNESSES). Returns True when the corrected time
        moved by more than the smoothing band (the caller may re-sign at once).
        """
        midpoint = (sent_at + received_at) / 2
        offset = server_time + 0.5 - midpoint  # the timestamp truncates to the second: its middle is +0.5 s
        with self._lock:
            if not fresh:
                mono = self.monotonic()
                self._stale.append((mono, server_time, offset))
                recent = [
                    (t, o) for m, t, o in self._stale if mono - m <= STALE_WINDOW_S and abs(o - offset) <= STALE_AGREE_S
                ]
                if len({t for t, _ in recent}) < STALE_WITNESSES:
                    return False
                self._stale.clear()
            # A step: the time we sign with moves by more than the smoothing band (from no offset at all
            # too: learning that our clock is 600 s off is a correction, learning it is right is not).
            stepped = abs(offset - (self._offset or 0.0)) > 2
            # Smooth small jitter, follow real steps at once.
            self._offset = offset if stepped or self._offset is None else 0.8 * self._offset + 0.2 * offset
            return stepped

    def now(self) -> float:
        """Best estimate of true Unix time: the system clock plus the learnt offset, if any."""
        offset = self.offset
        return self.system() + (offset or 0.0)

    def trusted(self) -> bool:
        """Whether `now()` can be trusted: the system clock is synchronised or the API's offset is known."""
        return self.offset is not None or self.synchronized()[0]

    def synchronized(self) -> tuple[bool, str]:
        """The system clock's sync state, probed at most every 10 s."""
        mono = self.monotonic()
        with self._lock:
            at, synced, how = self._sync_cache
        if mono - at > 10:
            synced, how = system_clock_synchronized()
            with self._lock:
                self._sync_cache = (mono, synced, how)
        return synced, how
