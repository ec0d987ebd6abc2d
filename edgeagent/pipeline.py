"""One inbound message, start to finish before the journal: size cap → decode → route → screen.

The result is an `Entry`, a `Rejection` (kept for inspection) or `Ignored` (heartbeats and other
messages that are not plate reads), plus what the journal keeps about the message itself.
No I/O here: time and clock state are passed in.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

from edgeagent import decoders
from edgeagent.config import CameraConfig, Config, ExitConfig
from edgeagent.errors import DecodeError
from edgeagent.model import REJECTED_PAYLOAD_CAP, Entry, ExitRead, Ignored, Inbound, PlateRead, Reason, Rejection
from edgeagent.routing import Router
from edgeagent.screening import CarTypeLists, screen, screen_exit

log = logging.getLogger(__name__)

# Inline images (base64 runs) are never stored, not even in a rejected row's excerpt.
_LONG_BASE64 = re.compile(rb"[A-Za-z0-9+/=\\]{256,}")


def redact(payload: bytes) -> bytes:
    """A capped excerpt of `payload` for inspection, with long base64 runs replaced by their length."""
    head = payload[: 64 * 1024]
    head = _LONG_BASE64.sub(lambda m: b"<%d bytes of base64 omitted>" % len(m.group(0)), head)
    return head[:REJECTED_PAYLOAD_CAP]


def record_scope(camera: CameraConfig, topic: str) -> str:
    """Whose record ids a message's are: the camera's own, except Frigate's.

    A Frigate tracked-object id is unique across the Frigate instance, and one vehicle pass is
    published under it on both `<prefix>/tracked_object_update` and `<prefix>/events` (anpr-formats.md
    §7). Scoped by the topic prefix, two [[cameras]] entries for those two topics share the id, so the
    pass stays one entry however its refined plates interleave across the topics.
    """
    if camera.format == "frigate":
        return f"frigate:{topic.rpartition('/')[0]}"
    return camera.id


def dedup_key(camera: str, read: PlateRead | None, digest: str) -> str:
    """The journal's redelivery key: vendor record id, else plate + capture time, else payload digest."""
    if read is not None and read.record_id:
        return f"{camera}|id|{read.record_id}"
    if read is not None and read.captured_at is not None and read.plate:
        return f"{camera}|t|{read.plate}|{read.captured_at:.3f}"
    return f"{camera}|sha|{digest}"


@dataclass(frozen=True, slots=True)
class Processed:
    outcome: Entry | ExitRead | Rejection | Ignored
    inbound: Inbound


class Pipeline:
    """Turns (topic, payload) into an outcome for the journal, using the compiled config."""

    def __init__(self, config: Config, router: Router, car_types: CarTypeLists) -> None:
        self.config = config
        self.router = router
        self.car_types = car_types

    def process(
        self,
        topic: str,
        payload: bytes,
        *,
        received_at: float,
        now: float,
        clock_synced: bool,
        received_mono: float | None = None,
    ) -> Processed:
        digest = hashlib.sha256(payload).hexdigest()
        inbound = Inbound(topic, received_at, digest, len(payload), redact(payload), received_mono)

        def reject(camera: str | None, reason: Reason, detail: str, lane: str | None = None) -> Processed:
            key = f"{camera}|rej|{digest}"
            return Processed(Rejection(camera, lane, key, reason, detail), inbound)

        camera = self.router.camera_for(topic)
        if camera is None:
            return reject(None, Reason.UNKNOWN_CAMERA, f"no [[cameras]] topic matches {topic!r}")
        cap = self.config.mqtt.max_payload_bytes
        if len(payload) > cap:
            return reject(camera.id, Reason.TOO_LARGE, f"{len(payload)} bytes > max_payload_bytes {cap}; not parsed")
        try:
            read = decoders.decode(camera.format, topic, payload)
        except DecodeError as exc:
            return reject(camera.id, exc.reason, str(exc))
        except Exception as exc:  # a decoder bug must not turn one message into a poison pill for intake
            # One line, not a traceback: a camera sending junk must not be able to flood the log.
            log.warning("decoder_failed format=%s topic=%r error=%s", camera.format, topic, exc.__class__.__name__)
            detail = f"{camera.format} decoder failed: {exc.__class__.__name__}: {exc}"
            return reject(camera.id, Reason.MALFORMED, detail)
        if isinstance(read, Ignored):
            return Processed(read, inbound)
        place = self.router.route(camera.id, read.lane, read.direction)
        if place is Reason.NO_DIRECTION:
            detail = f"camera {camera.id!r} lane {read.lane!r} is two-way and the read does not say in or out"
            return reject(camera.id, Reason.NO_DIRECTION, detail, read.lane)
        if isinstance(place, Reason):
            lane = f"lane {read.lane!r}" if read.lane is not None else "no lane"
            detail = f"camera {camera.id!r} {lane} maps to no [[entrances]] or [[exits]]"
            return reject(camera.id, Reason.UNMAPPED_LANE, detail, read.lane)
        key = dedup_key(record_scope(camera, topic), read, digest)
        if isinstance(place, ExitConfig):
            out = screen_exit(
                read,
                camera=camera,
                exit_=place,
                parking=self.config.parking,
                dedup_key=key,
                now=now,
                clock_synced=clock_synced,
            )
            if isinstance(out, ExitRead):
                return Processed(out, inbound)
            screened = out
        else:
            screened = screen(
                read,
                camera=camera,
                entrance=place,
                parking=self.config.parking,
                dedup_key=key,
                now=now,
                clock_synced=clock_synced,
                car_type_of=self.car_types,
            )
        if screened.entry is not None:
            return Processed(screened.entry, inbound)
        assert screened.reason is not None
        rejection = Rejection(
            camera.id, read.lane, f"{camera.id}|rej|{digest}", screened.reason, screened.detail, screened.plate
        )
        return Processed(rejection, inbound)
