"""Camera payload decoders, one module per format, in an explicit registry (SPEC §4).

A decoder is a pure function `decode(topic, payload) -> PlateRead | Ignored`:
- `PlateRead` for a plate read (the plate may be empty: "no plate" is screened later);
- `Ignored` for messages that are not plate reads at all (heartbeats, lane events, other commands);
- it raises `DecodeError(reason, detail, field)` for anything it cannot read, naming the field.

The payload has already passed the size cap; decoders never store images, they skip them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import replace

from edgeagent.decoders import frigate, generic, hikvision, qianyi, vzenith
from edgeagent.decoders._common import bad
from edgeagent.model import Ignored, PlateRead

Decoder = Callable[[str, bytes], PlateRead | Ignored]

REGISTRY: dict[str, Decoder] = {
    "generic": generic.decode,
    "vzenith": vzenith.decode,
    "qianyi": qianyi.decode,
    "hikvision": hikvision.decode,
    "frigate": frigate.decode,
}

# Every format SPEC §3 names; each has a decoder in REGISTRY.
KNOWN_FORMATS: tuple[str, ...] = ("generic", "vzenith", "qianyi", "hikvision", "frigate")

# Formats whose reads can say which way the car went (`PlateRead.direction`), so one of their sources
# may feed both an entrance and an exit (a two-way lane, SPEC §10): generic's `direction`, Qianyi's
# `inout` (anpr-formats.md §3.3). Vzenith's `direction` (§2.5) and Hikvision's `direction` (§4.2) are
# motion in the picture or against the mounting (left/right, forward/reverse), not in or out of the
# lot; Frigate has no such field (§7). They stay one-way until a camera mapping says otherwise.
REPORTS_DIRECTION: frozenset[str] = frozenset({"generic", "qianyi"})


# What a vendor's lane and record id may be (issue 12). Both end up in journal keys, `events`
# output, status and logs: a camera must not put kilobytes, control characters or terminal escape
# sequences there. Real ones are short ASCII: lane numbers and Frigate camera names; plateid,
# msg_id, Hikvision UUIDs and Frigate ids like "1718000000.123456-ab12cd".
LANE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
RECORD_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def decode(fmt: str, topic: str, payload: bytes) -> PlateRead | Ignored:
    """Decode `payload` received on `topic` with the decoder registered for `fmt`."""
    read = REGISTRY[fmt](topic, payload)
    if isinstance(read, PlateRead):
        if read.lane is not None and not LANE_RE.fullmatch(read.lane):
            raise bad("lane", f"lane must be 1-64 of A-Z a-z 0-9 . _ -, got {read.lane[:40]!r}")
        if read.record_id is not None and not RECORD_ID_RE.fullmatch(read.record_id):
            # The id only makes redeliveries idempotent: the car is real whatever its id looks like, so
            # the read is kept (never lost for an odd id) under a digest of the id, which is as stable
            # for redeliveries and carries none of its bytes into keys, `events` or logs.
            digest = hashlib.sha256(read.record_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
            read = replace(read, record_id=f"sha256:{digest}")
    return read
