"""Render a plate read the way a camera of each format would publish it (`edgeagent simulate`, demo).

Pure code: `render` returns a concrete topic and the payload bytes; publishing is the caller's job.
The payloads are in each vendor's own wire shape (Vzenith's base64 envelope, Qianyi's flat result,
Hikvision's ISAPI XML, Frigate's `lpr` update), so commissioning exercises the same decoder a real
camera will, and `decoders.decode(fmt, topic, payload)` gives the read back — except for what a
format cannot carry: Vzenith and Qianyi have no lane, Frigate no colour, only generic and Qianyi a
direction, and Frigate never reports a no-plate read (its update with an empty plate decodes as Ignored).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from xml.sax.saxutils import escape

from edgeagent.decoders import REPORTS_DIRECTION, generic, hikvision, qianyi, vzenith
from edgeagent.decoders._common import plate_text
from edgeagent.model import Direction, PlateColor

# Literals that replace MQTT wildcards: (`+` inside a filter, `+`/`#` at its end) per format.
VZENITH_SERIAL = "e06e0000-00000001"  # the 8-8 hex shape of a Vzenith serial (§2.5)
QIANYI_SERIAL = "15ZK0A000001"
WILDCARD_LITERALS: dict[str, tuple[str, str]] = {
    "generic": ("sim", "plate"),
    "vzenith": (VZENITH_SERIAL, "ivs_result"),
    "qianyi": (QIANYI_SERIAL, QIANYI_SERIAL),
    "hikvision": ("camera1", "anpr"),
    "frigate": ("frigate", "tracked_object_update"),
}
CHINA = timezone(timedelta(hours=8))  # the cameras' local wall time in the vendor samples


def parse_color(text: str) -> PlateColor:
    """Read a `--color` argument: a SPEC §4 short name or a PLATE_COLOR_* name, any case."""
    found = generic.COLORS.get(text.strip().lower())
    if found is None:
        raise ValueError(f"unknown colour {text!r} (accepted: {', '.join(generic.COLORS)})")
    return found


def concrete_topic(fmt: str, topic_filter: str) -> str:
    """Replace the wildcards of a camera's topic filter with literals a camera of `fmt` would use."""
    inner, last = WILDCARD_LITERALS[fmt]
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level in ("+", "#"):
            levels[i] = last if i == len(levels) - 1 else inner
    return "/".join(levels)


@dataclass(frozen=True, slots=True)
class _Read:
    topic: str
    plate: str
    color: PlateColor | None
    lane: str | None
    when: float
    record_id: str
    confidence: float
    direction: Direction | None = None

    @property
    def seen(self) -> bool:
        """False for a no-plate read ("", 无牌, _无_ ...), which each vendor spells its own way."""
        return plate_text(self.plate) is not None

    @property
    def percent(self) -> int:
        return round(self.confidence * 100)


def render(
    fmt: str,
    topic_filter: str,
    *,
    plate: str,
    color: PlateColor | None,
    lane: str | None,
    when: float,
    record_id: str,
    confidence: float = 0.95,
    direction: Direction | None = None,
) -> tuple[str, bytes]:
    """Return (topic, payload) for one read in `fmt`'s wire shape, published under `topic_filter`.

    Raises ValueError for an unknown format, a colour the format has no code for, or a direction
    given for a format that cannot report one (it would be dropped, and a two-way lane reject the read).
    """
    if fmt not in _RENDERERS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(_RENDERERS)})")
    if direction is not None and fmt not in REPORTS_DIRECTION:
        raise ValueError(f"{fmt} cannot report a direction (only {', '.join(sorted(REPORTS_DIRECTION))} can)")
    topic = concrete_topic(fmt, topic_filter)
    body = _RENDERERS[fmt](_Read(topic, plate, color, lane, when, record_id, confidence, direction))
    if isinstance(body, str):
        return topic, body.encode("utf-8")
    return topic, json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _generic(read: _Read) -> dict[str, Any]:
    short = {value: name for name, value in reversed(generic.COLORS.items())}  # the short name wins
    body: dict[str, Any] = {"plate": read.plate, "time": read.when, "event_id": read.record_id}
    body["confidence"] = read.confidence
    if read.color is not None:
        body["color"] = short[read.color]
    if read.lane is not None:
        body["lane"] = _int_if_digits(read.lane)
    if read.direction is not None:
        body["direction"] = read.direction.value
    return body


def _vzenith(read: _Read) -> dict[str, Any]:
    # Both topic layouts carry the serial (§2.1): device/{sn}/message/up/... and {sn}/device/message/up/...
    levels = read.topic.split("/")
    serial = levels[1] if levels[0] == "device" and len(levels) > 1 else VZENITH_SERIAL
    serial = levels[0] if len(levels) > 1 and levels[1] == "device" else serial
    color, plate_type = read.color, 0  # type 0 未知: no vehicle type is inferred from the plate type
    if color is PlateColor.AGRICULTURAL_YELLOW:
        color, plate_type = PlateColor.YELLOW, vzenith.PLATE_TYPE_FARM
    result: dict[str, Any] = {"license": _b64(read.plate if read.seen else "_无_")}
    if color is not None:
        codes = {value: code for code, value in vzenith.COLORS.items()}
        if color not in codes:
            raise ValueError(f"vzenith colorType has no code for {color.value}")
        result["colorType"] = codes[color]
    local = datetime.fromtimestamp(read.when, CHINA)  # dec* fields are camera-local wall time (§2.2)
    timeval = {"decyear": local.year, "decmon": local.month, "decday": local.day, "dechour": local.hour}
    timeval |= {"decmin": local.minute, "decsec": local.second, "sec": int(read.when), "usec": local.microsecond}
    result |= {"confidence": read.percent, "isoffline": 0, "plateid": _int_if_digits(read.record_id)}
    result |= {"timeStamp": {"Timeval": timeval}, "triggerType": 4, "type": plate_type}
    alarm = {"channel": 0, "deviceName": _b64("edgeagent-sim"), "result": {"PlateResult": result}}
    envelope = {"id": f"sim-{read.record_id}", "sn": serial, "name": "ivs_result", "timestamp": int(read.when)}
    return envelope | {"payload": {"AlarmInfoPlate": alarm | {"serialno": serial}}}


def _qianyi(read: _Read) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": "result", "msg_id": read.record_id, "type": "online", "sn": QIANYI_SERIAL}
    body |= {"plate_num": read.plate if read.seen else "null", "confidence": read.percent}
    if read.color is not None:
        name = next(name for name, value in qianyi.COLORS.items() if value is read.color)
        body["plate_color"] = name if read.color in (PlateColor.OTHER, PlateColor.UNKNOWN) else name + "色"
    # `inout` is the camera's report of the way the car went (§3.3); without one it is left out.
    body |= {"inout": read.direction.value} if read.direction is not None else {}
    return body | {"utc_ts": round(read.when * 1000), "trigger_type": "video"}


def _hikvision(read: _Read) -> str:
    color, plate = read.color, read.plate if read.seen else "noPlate"
    anpr = {"confidenceLevel": str(read.percent), "alarmDataType": "0"}
    if color is PlateColor.AGRICULTURAL_YELLOW:
        color, anpr["plateType"] = PlateColor.YELLOW, hikvision.FARM_PLATE_TYPES[0]
    if color is not None:
        anpr["plateColor"] = next(name for name, value in hikvision.COLORS.items() if value is color)
        # Chinese plates carry their colour character, overseas ones do not (§4.2).
        if read.seen and not plate[0].isascii():
            plate = next((p for p, value in hikvision.PREFIX_COLORS.items() if value is color), "") + plate
    if read.lane is not None:
        anpr["line"] = read.lane
    stamp = datetime.fromtimestamp(read.when, CHINA).isoformat(timespec="milliseconds")
    alert = {"ipAddress": "192.0.2.10", "channelID": "1", "dateTime": stamp, "activePostCount": "1"}
    alert |= {"eventType": "ANPR", "eventState": "active", "eventDescription": "ANPR"}
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<EventNotificationAlert version="2.0" xmlns="http://www.isapi.org/ver20/XMLSchema">'
        f"{_elements(alert)}<ANPR>{_elements({'licensePlate': plate} | anpr)}</ANPR>"
        f"<UUID>{escape(read.record_id)}</UUID></EventNotificationAlert>\n"
    )


def _frigate(read: _Read) -> dict[str, Any]:
    # Frigate has no colour, and the Frigate camera name is what the decoder reports as the lane.
    body: dict[str, Any] = {"type": "lpr", "id": read.record_id, "name": None}
    body |= {"plate": read.plate if read.seen else "", "score": read.confidence, "timestamp": read.when}
    return body | {"plate_box": [917, 487, 1029, 529]} | ({"camera": read.lane} if read.lane is not None else {})


def _elements(values: dict[str, str]) -> str:
    return "".join(f"<{name}>{escape(value)}</{name}>" for name, value in values.items())


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _int_if_digits(text: str) -> int | str:
    """A numeric id or lane is sent as a JSON number, as cameras do, when that loses nothing."""
    return int(text) if text.isascii() and text.isdigit() and str(int(text)) == text else text


_RENDERERS: dict[str, Callable[[_Read], dict[str, Any] | str]] = {
    "generic": _generic,
    "vzenith": _vzenith,
    "qianyi": _qianyi,
    "hikvision": _hikvision,
    "frigate": _frigate,
}
