"""Vzenith 臻识 `AlarmInfoPlate` (anpr-formats.md §2), and the OEM cameras that reuse it.

Accepted shapes, told apart by the payload rather than the topic:
- the MQTT envelope `{"id", "sn", "name": "ivs_result" | "quick_ivs_result", "payload": {...}}` with
  base64(UTF-8) strings (§2.2), on `device/{sn}/message/up/{name}` or `{sn}/device/message/up/{name}`;
- the bare HTTP-push body `{"AlarmInfoPlate": {...}}` with plain UTF-8 strings (§2.3), relayed onto MQTT;
- the TCP frame's JSON `{"PlateResult": {...}, "cmd": "ivs_result"}` (§2.4), relayed onto MQTT.
Every other message name (keep_alive, gpio_in, barr_gate_status, lanectrl_result, ...) is Ignored.
"""

from __future__ import annotations

import base64
import binascii

from edgeagent.decoders._common import Fields, bad, load_json_object, plate_text
from edgeagent.model import Ignored, PlateColor, PlateRead, VehicleType

RESULT_NAMES = frozenset({"ivs_result", "quick_ivs_result"})

# `colorType` (§2.6, [VZ-LPDEF-2016] LC_*; 6 from [VZ-HTTP-DOC] §3.3). Codes not listed → UNKNOWN.
COLORS: dict[int, PlateColor] = {
    0: PlateColor.UNKNOWN,
    1: PlateColor.BLUE,
    2: PlateColor.YELLOW,
    3: PlateColor.WHITE,
    4: PlateColor.BLACK,
    5: PlateColor.GREEN,
    6: PlateColor.YELLOW_GREEN,
}
PLATE_TYPE_FARM = 12  # 农用车牌: a yellow farm plate is PLATE_COLOR_AGRICULTURAL_YELLOW (§2.6)
PLATE_TYPE_NO_PLATE = 31  # 无牌车 ([VZ-HTTP-DOC] §3.2, LI_NOPLATE in [VZ-LPDEF-NEW])

# `car_brand.type` (§2.6, [VZ-HTTP-DOC] §3.4): 1 轿车, 2 SUV, 3 MPV, 4 小型客车, 6 小型货车 are small;
# 5 大型客车 and 7 大型货车 large. 0 未知 and 255 (not recognised) defer to the plate type.
VEHICLE_TYPES: dict[int, VehicleType] = {
    1: VehicleType.SMALL,
    2: VehicleType.SMALL,
    3: VehicleType.SMALL,
    4: VehicleType.SMALL,
    5: VehicleType.LARGE,
    6: VehicleType.SMALL,
    7: VehicleType.LARGE,
}
VEHICLE_TYPE_NOT_RECOGNISED = frozenset({0, 255})
# Plate `type` → size, the fallback §2.6 proposes: 1 蓝牌小汽车, 2 黑牌小汽车, 19 小型新能源 are small;
# 3 单排黄牌, 4 双排黄牌, 20 大型新能源 large. Type is advisory (§2.6 "Conflict"), so nothing else is inferred.
VEHICLE_TYPE_BY_PLATE_TYPE: dict[int, VehicleType] = {
    1: VehicleType.SMALL,
    2: VehicleType.SMALL,
    19: VehicleType.SMALL,
    3: VehicleType.LARGE,
    4: VehicleType.LARGE,
    20: VehicleType.LARGE,
}

# `triggerType` is a bit set for real passages (1 video, 2 IO coil, 4 software, 8 virtual loop); 64 and up
# are lane events ([VZ-HTTP-DOC] §3.1: 64 车滞留, 65 滞留恢复, 66 车折返; 85/86 "treat as events", §2.6).
EVENT_TRIGGERS_FROM = 64
EVENT_NAMES = {64: "车滞留 vehicle lingering", 65: "车滞留恢复 lingering ended", 66: "车折返 vehicle turned back"}


def decode(topic: str, payload: bytes) -> PlateRead | Ignored:
    """Decode one Vzenith message; see the module docstring for the shapes."""
    top = Fields(load_json_object(payload))
    if "AlarmInfoPlate" in top.data:  # bare HTTP-push body (§2.3)
        return _alarm(top.need("AlarmInfoPlate"))
    if "PlateResult" in top.data:  # TCP `ivs_result` frame relayed as JSON (§2.4)
        return _plate_result(top.need("PlateResult"))
    name = top.text("name") or _topic_name(topic)
    if name in RESULT_NAMES:
        return _alarm(top.need("payload").need("AlarmInfoPlate"))
    if name == "lanectrl_result":
        return Ignored("vzenith lanectrl_result is a lane event (滞留/折返, §2.7), not a passage")
    if name:
        return Ignored(f"vzenith message {name!r} is not a plate result")
    raise bad("name", "missing: neither an AlarmInfoPlate body nor a named vzenith envelope")


def _topic_name(topic: str) -> str | None:
    """The message name is the segment after `message/up/` in both topic layouts (§2.1)."""
    _, found, rest = topic.partition("message/up/")
    name = rest.split("/", 1)[0]
    return name if found and name else None


def _alarm(alarm: Fields) -> PlateRead | Ignored:
    # `serialno` and the envelope `sn` may disagree (§2.2); the camera is keyed on the topic instead.
    return _plate_result(alarm.need("result").need("PlateResult"))


def _plate_result(result: Fields) -> PlateRead | Ignored:
    trigger = result.integer("triggerType")
    if trigger is not None and trigger >= EVENT_TRIGGERS_FROM:
        event = EVENT_NAMES.get(trigger, "lane event")
        return Ignored(f"vzenith triggerType {trigger} ({event}) is not a passage")
    if result.integer("is_encrypted"):
        detail = "the plate is encrypted (is_encrypted=1); turn plate encryption off on the camera"
        raise bad(result.name("license"), detail)
    first = _first_plate(result)
    plate_type = _code(result, "type", first, "type")
    raw = result.text("license")
    if raw is None and first is not None:
        raw = first.text("license")
    if raw is None:
        raise bad(result.name("license"), "missing")
    # Cross-border tri-plates are joined with "|" (§2.3, "粤ZJ068澳|MX7742|ZM127"); the first is mainland.
    plate = None if plate_type == PLATE_TYPE_NO_PLATE else plate_text(_unbase64(raw).split("|", 1)[0])
    return PlateRead(
        plate=plate,
        color=_color(_code(result, "colorType", first, "color"), plate_type),
        vehicle_type=_vehicle_type(result, plate_type),
        captured_at=_captured_at(result),
        confidence=result.confidence("confidence", 100),
        record_id=result.ident("plateid"),
        is_replay=bool(result.integer("isoffline")),  # 1 = re-sent after the link came back (§2.8)
    )


def _first_plate(result: Fields) -> Fields | None:
    plates = result.data.get("plates")
    if isinstance(plates, list) and plates and isinstance(plates[0], dict):
        return Fields(plates[0], result.name("plates[0]"))
    return None


def _code(result: Fields, key: str, first: Fields | None, first_key: str) -> int | None:
    """Top-level fields win; `plates[0]` is only the fallback (§2.2: the two may contradict)."""
    value = result.integer(key)
    return first.integer(first_key) if value is None and first is not None else value


def _unbase64(text: str) -> str:
    """MQTT strings are base64(UTF-8), HTTP ones plain (§2.2, §15: detect, don't assume)."""
    # A plate with a Chinese character is never valid base64; b64decode(validate=True) rejects other
    # alphabets and bad padding, and the decoded bytes must be printable UTF-8 to count.
    if not text.isascii() or len(text) % 4:
        return text
    try:
        decoded = base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return text
    return decoded if decoded.isprintable() else text


def _color(code: int | None, plate_type: int | None) -> PlateColor | None:
    if code is None:
        return None
    color = COLORS.get(code, PlateColor.UNKNOWN)
    if color is PlateColor.YELLOW and plate_type == PLATE_TYPE_FARM:
        return PlateColor.AGRICULTURAL_YELLOW
    return color


def _vehicle_type(result: Fields, plate_type: int | None) -> VehicleType | None:
    brand = result.child("car_brand")
    code = brand.integer("type") if brand is not None else None
    if code is not None and code not in VEHICLE_TYPE_NOT_RECOGNISED:
        return VEHICLE_TYPES.get(code, VehicleType.UNKNOWN)
    from_plate = VEHICLE_TYPE_BY_PLATE_TYPE.get(plate_type) if plate_type is not None else None
    if from_plate is not None:
        return from_plate
    return None if code is None else VehicleType.UNKNOWN


def _captured_at(result: Fields) -> float | None:
    # `timeStamp.Timeval.sec` is UTC; `dec*` is camera-local wall time and the envelope `timestamp` is
    # unrelated to the capture (§2.2), so only sec (+ usec) is used.
    stamp = result.child("timeStamp")
    timeval = stamp.child("Timeval") if stamp is not None else None
    seconds = timeval.time("sec") if timeval is not None else None
    if timeval is None or seconds is None:
        return None
    usec = timeval.integer("usec") or 0
    if not 0 <= usec < 1_000_000:
        raise bad(timeval.name("usec"), f"expected 0..999999 microseconds, got {usec}")
    return seconds + usec / 1e6
