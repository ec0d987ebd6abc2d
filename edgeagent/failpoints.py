"""Failpoints: faults the fault-injection suite switches on from outside, inert in production.

`EDGEAGENT_FAILPOINTS=name[,name…]` in the environment of `edgeagent run` arms them; nothing else
can. They exist so that black-box tests can prove the watchdog notices a hung intake thread or a
dead paho thread (issue 6), which no honest input can provoke.

    ingest-hang     the ingest thread stops taking messages after its first batch (a hung thread)
    paho-crash      the first message kills paho's network thread (an exception escaping a callback)
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ARMED = frozenset(filter(None, os.environ.get("EDGEAGENT_FAILPOINTS", "").split(",")))
if ARMED:
    log.warning("failpoints_armed names=%s (fault-injection tests only)", ",".join(sorted(ARMED)))


def armed(name: str) -> bool:
    """Whether the failpoint `name` was switched on for this process."""
    return name in ARMED
