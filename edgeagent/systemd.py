"""systemd integration without dependencies: sd_notify(3) over $NOTIFY_SOCKET, and the watchdog period.

The protocol is a datagram of `KEY=VALUE` lines to the AF_UNIX socket named in $NOTIFY_SOCKET
(a leading `@` means the abstract namespace). Outside systemd every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY / STATUS / WATCHDOG / STOPPING to systemd when it is listening."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        """Send `fields` (e.g. "READY=1", "STATUS=…"); False when not under systemd or the send failed."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
            return True
        except OSError as exc:
            log.debug("sd_notify_failed error=%s", exc)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec= (from $WATCHDOG_USEC) when the watchdog is armed for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None
