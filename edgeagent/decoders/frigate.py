"""Frigate NVR licence-plate recognition over MQTT (anpr-formats.md §7).

Two messages carry plates:
- `<prefix>/tracked_object_update` with `"type": "lpr"`: `{"id", "plate", "score", "camera", "timestamp"}`;
- `<prefix>/events` (`type` new / update / end) once `after.recognized_license_plate` is set: a string
  with `recognized_license_plate_score` in Frigate's MQTT docs, the tracked object's `[plate, score]`
  pair in what Frigate 0.16 and later actually publish.
Frigate refines a pass's plate as the car moves and re-emits it under the same tracked-object `id`
(§7, §13.1), so `id` is the record id: the journal keeps the FIRST valid read under an id and absorbs
later ones as duplicates, while an earlier invalid read (kept as rejected) does not block a later valid
one. Frigate gives no colour or vehicle type. All Frigate cameras share one topic, so the Frigate
`camera` name becomes the lane: an entrance can take `"<camera id>:<frigate camera>"` as a source.
"""

from __future__ import annotations

from typing import Any

from edgeagent.decoders._common import Fields, bad, load_json_object, plate_text
from edgeagent.errors import DecodeError
from edgeagent.model import Ignored, PlateRead

# Frigate's topic suffixes are fixed; only the prefix ("frigate") is configurable.
PLATE_TOPICS = frozenset({"events", "tracked_object_update"})
EVENT_TYPES = frozenset({"new", "update", "end"})


def decode(topic: str, payload: bytes) -> PlateRead | Ignored:
    """Decode one Frigate message; anything that is not a plate read yet is Ignored."""
    suffix = topic.rpartition("/")[2]
    try:
        doc = Fields(load_json_object(payload))
    except DecodeError:
        # Frigate publishes plain-text payloads ("online", "ON", numbers) on its other topics; a
        # filter like `frigate/#` sees them all, and none of them is a read.
        if suffix in PLATE_TOPICS:
            raise
        return Ignored(f"frigate topic {topic!r} does not carry plate reads")
    kind = doc.text("type")
    if kind == "lpr":
        return _lpr(doc)
    if kind in EVENT_TYPES and "after" in doc.data:
        return _event(doc.need("after"))
    return Ignored(f"frigate message of type {kind!r} on {topic!r} is not a plate read")


def _lpr(update: Fields) -> PlateRead | Ignored:
    # `name` is the user's label for a known plate, never the plate itself; `plate_box` is geometry.
    return _read(update, "plate", "score", "timestamp")


def _event(after: Fields) -> PlateRead | Ignored:
    # `frame_time` is the frame the plate was read in; `start_time` when the object first appeared.
    time_key = "frame_time" if after.data.get("frame_time") is not None else "start_time"
    pair = after.data.get("recognized_license_plate")
    if isinstance(pair, list):
        after = _unpair(after, pair)
    return _read(after, "recognized_license_plate", "recognized_license_plate_score", time_key)


def _unpair(after: Fields, pair: list[Any]) -> Fields:
    """Read Frigate 0.16+'s `"recognized_license_plate": [plate, score]` as the documented two fields.

    Frigate keeps the plate on the tracked object as a (plate, score) tuple and publishes the object as
    it is, so `frigate/events` carries a JSON array and no `recognized_license_plate_score`.
    """
    if len(pair) != 2:
        raise bad(after.name("recognized_license_plate"), f"expected a plate or [plate, score], got {pair!r}"[:200])
    data = dict(after.data) | {"recognized_license_plate": pair[0]}
    if data.get("recognized_license_plate_score") is None:
        data["recognized_license_plate_score"] = pair[1]
    return Fields(data, after.path, after.numeric_text)


def _read(obj: Fields, plate_key: str, score_key: str, time_key: str) -> PlateRead | Ignored:
    plate = plate_text(obj.text(plate_key))
    if plate is None:
        # Frigate publishes the object before OCR has read anything; no text yet is not a no-plate read.
        return Ignored(f"frigate {obj.name(plate_key)} has no plate text yet")
    record_id = obj.ident("id")
    if record_id is None:
        # Without the tracked-object id every refinement of one pass would look like a new car.
        raise bad(obj.name("id"), "missing")
    return PlateRead(
        plate=plate,
        captured_at=obj.time(time_key),  # float Unix seconds of the Frigate host's clock (§7)
        lane=obj.ident("camera"),
        confidence=obj.confidence(score_key, 1.0),
        record_id=record_id,
    )
