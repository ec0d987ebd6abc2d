"""edgeagent's own camera format (SPEC §4), for bridges and cameras that can be told what to send.

    {"plate": "粤B12345", "color": "blue", "time": 1720078200, "lane": 1, "vehicle_type": "small",
     "confidence": 0.97, "event_id": "c7f1e2", "replay": false, "direction": "in"}

Only `plate` is required; unknown keys are ignored so a bridge may add its own. The topic is not used.
"""

from __future__ import annotations

from typing import TypeVar

from edgeagent.decoders._common import Fields, bad, load_json_object, plate_text, type_name
from edgeagent.model import Direction, Ignored, PlateColor, PlateRead, VehicleType

E = TypeVar("E", PlateColor, VehicleType, Direction)

# SPEC §4's short names, then every PLATE_COLOR_* / VEHICLE_TYPE_* value; looked up in lower case.
COLORS: dict[str, PlateColor] = {
    "blue": PlateColor.BLUE,
    "yellow": PlateColor.YELLOW,
    "black": PlateColor.BLACK,
    "white": PlateColor.WHITE,
    "green": PlateColor.GREEN,
    "yellow_green": PlateColor.YELLOW_GREEN,
    "agricultural_yellow": PlateColor.AGRICULTURAL_YELLOW,
    "other": PlateColor.OTHER,
} | {color.value.lower(): color for color in PlateColor}
VEHICLE_TYPES: dict[str, VehicleType] = {
    "small": VehicleType.SMALL,
    "large": VehicleType.LARGE,
    "extra_large": VehicleType.EXTRA_LARGE,
} | {vtype.value.lower(): vtype for vtype in VehicleType}
# `direction` (SPEC §10): which way the car passed a two-way lane; only these two words.
DIRECTIONS: dict[str, Direction] = {direction.value: direction for direction in Direction}


def decode(topic: str, payload: bytes) -> PlateRead | Ignored:
    """Decode one generic read; see the module docstring and docs/formats.md for the fields."""
    del topic  # the generic format carries everything in the payload
    fields = Fields(load_json_object(payload))
    if "plate" not in fields.data:
        raise bad("plate", "missing (the only required field)")
    replay = fields.data.get("replay")
    replay = False if replay is None else replay
    if not isinstance(replay, bool):
        raise bad("replay", f"expected true or false, got {type_name(replay)}")
    return PlateRead(
        plate=plate_text(fields.text("plate")),
        color=_choice(fields, "color", COLORS),
        vehicle_type=_choice(fields, "vehicle_type", VEHICLE_TYPES),
        captured_at=fields.time("time"),
        lane=fields.ident("lane"),
        confidence=fields.confidence("confidence", 1.0),
        record_id=fields.ident("event_id"),
        is_replay=replay,
        direction=_choice(fields, "direction", DIRECTIONS),
    )


def _choice(fields: Fields, key: str, names: dict[str, E]) -> E | None:
    """Look a name up case-insensitively; absent or "" gives None, a name not in `names` is an error."""
    text = (fields.text(key) or "").strip()
    if not text:
        return None
    found = names.get(text.lower())
    if found is None:
        full = ("plate_color_", "vehicle_type_")
        accepted = ", ".join(name.upper() if name.startswith(full) else name for name in names)
        raise bad(key, f"unknown {key} {text!r} (accepted: {accepted})")
    return found
