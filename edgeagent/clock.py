"""Time: the agent's wall clock, its offset from the API's clock, and whether the system clock is synced.

A gate controller has no RTC (reliability.md §5): after a power cut the clock restarts in the past
until NTP syncs. Signatures and entry times are only as good as the clock, so the agent learns the
API's offset from its `Date` header (SPEC §5) and asks the kernel whether time is synchronised.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from email.utils import parsedate_to_datetime
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


def parse_http_date(value: str) -> float | None:
    """Unix seconds of an RFC 7231 `Date` header, or None when it cannot be read."""
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


class Clock:
    """Wall time corrected by the offset learnt from the API, plus the monotonic clock.

    Thread-safe: the delivery loop updates the offset, every other thread reads it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset: float | None = None
        self._sync_cache: tuple[float, bool, str] = (-1e9, False, "")

    @staticmethod
    def system() -> float:
        return time.time()

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()

    @property
    def offset(self) -> float | None:
        """API clock minus our clock, in seconds; None until an answer with a `Date` header arrived."""
        with self._lock:
            return self._offset

    def learn(self, server_time: float, sent_at: float, received_at: float) -> None:
        """Update the offset from a server `Date` (1 s resolution) seen between `sent_at` and `received_at`."""
        midpoint = (sent_at + received_at) / 2
        offset = server_time + 0.5 - midpoint  # Date truncates to the second: its middle is +0.5 s
        with self._lock:
            # Smooth small jitter, follow real steps at once.
            if self._offset is None or abs(offset - self._offset) > 2:
                self._offset = offset
            else:
                self._offset = 0.8 * self._offset + 0.2 * offset

    def now(self) -> float:
        """Best estimate of true Unix time: the system clock plus the learnt offset, if any."""
        offset = self.offset
        return time.time() + (offset or 0.0)

    def trusted(self) -> bool:
        """Whether `now()` can be trusted: the system clock is synchronised or the API's offset is known."""
        return self.offset is not None or self.synchronized()[0]

    def synchronized(self) -> tuple[bool, str]:
        """The system clock's sync state, probed at most every 10 s."""
        mono = time.monotonic()
        with self._lock:
            at, synced, how = self._sync_cache
        if mono - at > 10:
            synced, how = system_clock_synchronized()
            with self._lock:
                self._sync_cache = (mono, synced, how)
        return synced, how
