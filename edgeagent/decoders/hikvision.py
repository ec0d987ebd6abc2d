"""Hikvision ISAPI `EventNotificationAlert` with `eventType` ANPR (anpr-formats.md §4), XML or JSON.

Hikvision cameras push over HTTP only (§4), so these messages come from a bridge that relays the
`anpr.xml` (or JSON) part onto MQTT; pictures travel as separate parts and are never expected here.
XML is read with expat, refusing any DOCTYPE or ENTITY declaration before an entity can expand, and
element names are matched by local name (the ISAPI namespace varies by firmware). JSON may be the
alert object itself or `{"EventNotificationAlert": {...}}`. All values may be text (XML always is).
"""

from __future__ import annotations

from typing import Any, NoReturn
from xml.parsers import expat

from edgeagent.decoders._common import Fields, bad, load_json_object, plate_text
from edgeagent.errors import DecodeError
from edgeagent.model import Ignored, PlateColor, PlateRead, Reason, VehicleType

ROOT = "EventNotificationAlert"

# `ANPR.plateColor` (§4.2 [HIK-CN] enum, English guide's "0xff"), matched case-insensitively. Colours
# the schema lists without a WeChat equivalent (golden, orange, red, mixedColor 花底, brown) are OTHER;
# values outside the schema are UNKNOWN.
COLORS: dict[str, PlateColor] = {
    "blue": PlateColor.BLUE,
    "yellow": PlateColor.YELLOW,
    "white": PlateColor.WHITE,
    "black": PlateColor.BLACK,
    "civilAviationBlack": PlateColor.BLACK,
    "green": PlateColor.GREEN,
    "newEnergyGreen": PlateColor.GREEN,
    "civilAviationGreen": PlateColor.GREEN,
    "newEnergyYellowGreen": PlateColor.YELLOW_GREEN,
    "unknown": PlateColor.UNKNOWN,
    **dict.fromkeys(("other", "0xff", "golden", "orange", "red", "mixedColor", "brown"), PlateColor.OTHER),
}
_COLORS_BY_LOWER = {name.lower(): color for name, color in COLORS.items()}
# Yellow farm-vehicle plate types are agricultural yellow (`plateType`, §4.2).
FARM_PLATE_TYPES = ("yellow1225FarmVehicle", "yellow1325FarmVehicle", "92FarmVehicle")
_FARM_BY_LOWER = frozenset(name.lower() for name in FARM_PLATE_TYPES)
# The colour character Chinese plates carry in `licensePlate` ("蓝浙AX2P12", §4.2), longest first.
PREFIX_COLORS: dict[str, PlateColor] = {
    "黄绿": PlateColor.YELLOW_GREEN,
    "蓝": PlateColor.BLUE,
    "黄": PlateColor.YELLOW,
    "绿": PlateColor.GREEN,
    "白": PlateColor.WHITE,
    "黑": PlateColor.BLACK,
}
# `vehicleInfo.vehicleType` "0#其它车型,1#小型车,2#大型车,3#行人触发,..." (§4.2); the others are UNKNOWN.
VEHICLE_CODES: dict[int, VehicleType] = {1: VehicleType.SMALL, 2: VehicleType.LARGE}
# `ANPR.vehicleType` names (§4.2), lower-cased: cars, vans and light trucks are small; buses and
# medium/heavy trucks large. Unlisted names ("unknown", "vehicle", "buggy", ...) are UNKNOWN.
VEHICLE_NAMES: dict[str, VehicleType] = {
    **dict.fromkeys(
        ("smallcar", "minicar", "suvmpv", "pickuptruck", "van", "lighttruck", "minibus"), VehicleType.SMALL
    ),
    **dict.fromkeys(("largebus", "mediumbus", "bus", "truck", "mediumheavytruck"), VehicleType.LARGE),
}


def decode(topic: str, payload: bytes) -> PlateRead | Ignored:
    """Decode one relayed ANPR alert; other event types and heartbeats are Ignored."""
    del topic  # a bridge's topic layout is its own; everything needed is in the alert
    if payload.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        tree = _parse_xml(payload)
        if ROOT not in tree:
            return Ignored(f"hikvision XML <{next(iter(tree), '')}> is not an EventNotificationAlert")
        # An empty <EventNotificationAlert/> parses to the text "", not to an element (issue 12).
        body = tree[ROOT]
        alert = Fields(body if isinstance(body, dict) else {}, ROOT, numeric_text=True)
    else:
        doc = Fields(load_json_object(payload), numeric_text=True)
        alert = doc.child(ROOT) or doc
    return _alert(alert)


def _alert(alert: Fields) -> PlateRead | Ignored:
    event_type = alert.text("eventType")
    if event_type is None:
        raise bad(alert.name("eventType"), "missing")
    if event_type.strip().lower() != "anpr":
        return Ignored(f"hikvision eventType {event_type!r} is not ANPR")
    if (alert.text("eventState") or "").strip().lower() == "inactive":
        return Ignored("hikvision eventState inactive is a heartbeat, not a read")
    anpr = alert.child("ANPR") or alert
    raw = anpr.text("licensePlate")
    if raw is None:
        raise bad(anpr.name("licensePlate"), "missing")
    plate, prefix_color = _strip_color(raw.strip())
    color = _color(anpr)
    return PlateRead(
        # "noPlate", "unknown" (schema) and the literal "车牌" (one firmware's JSON) mean no plate (§4.1-4.2).
        plate=plate_text(plate),
        color=prefix_color if color in (None, PlateColor.UNKNOWN) and prefix_color else color,
        vehicle_type=_vehicle_type(alert, anpr),
        captured_at=alert.time("dateTime"),  # ISO 8601 with the camera's offset (§4.2)
        lane=anpr.ident("line"),  # "识别车道号"
        confidence=anpr.confidence("confidenceLevel", 100),
        record_id=alert.ident("UUID"),  # event id; re-uploads (`activePostCount`) keep it (§13.1)
        is_replay=anpr.integer("alarmDataType") == 1,  # "1#历史数据,0#实时数据"
    )


def _strip_color(raw: str) -> tuple[str, PlateColor | None]:
    """Split "蓝浙AX2P12" into ("浙AX2P12", BLUE); keep the raw text when no colour prefix is present.

    黑 is also Heilongjiang's abbreviation, so a prefix only counts when what follows starts like a
    plate itself (a Chinese character, or WJ for armed police): "黑A12345" is a Heilongjiang plate.
    """
    for prefix, color in PREFIX_COLORS.items():
        rest = raw.removeprefix(prefix)
        if rest != raw and rest and (not rest[0].isascii() or rest.startswith("WJ")):
            return rest, color
    return raw, None


def _color(anpr: Fields) -> PlateColor | None:
    name = (anpr.text("plateColor") or "").strip().lower()
    if not name:
        return None
    color = _COLORS_BY_LOWER.get(name, PlateColor.UNKNOWN)
    plate_type = (anpr.text("plateType") or "").strip().lower()
    return PlateColor.AGRICULTURAL_YELLOW if color is PlateColor.YELLOW and plate_type in _FARM_BY_LOWER else color


def _vehicle_type(alert: Fields, anpr: Fields) -> VehicleType | None:
    info = anpr.child("vehicleInfo") or alert.child("vehicleInfo")
    code = info.integer("vehicleType") if info is not None else None
    name = (anpr.text("vehicleType") or "").strip().lower()
    found = VEHICLE_CODES.get(code) if code is not None else None
    found = found or VEHICLE_NAMES.get(name)
    if found is None and (code is not None or name):
        return VehicleType.UNKNOWN
    return found


def _parse_xml(payload: bytes) -> dict[str, Any]:
    """Parse XML into nested dicts keyed by local name; leaves become their stripped text.

    A repeated element keeps its first occurrence (the alert has no lists this decoder reads).
    """
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(Reason.NOT_UTF8, f"payload is not UTF-8 (byte {exc.start})") from exc
    root: dict[str, Any] = {}
    # Each open element: (its children, its text parts, its parent, its local name, first of its name?).
    stack: list[tuple[dict[str, Any], list[str], dict[str, Any], str, bool]] = []

    def refuse(*_: object) -> NoReturn:
        # A DTD is how entity expansion ("billion laughs") and external entities get in; ISAPI sends none.
        raise DecodeError(Reason.MALFORMED, "XML with a DOCTYPE or ENTITY declaration is refused")

    def start(name: str, _attrs: dict[str, str]) -> None:
        parent = stack[-1][0] if stack else root
        local = name.rpartition(" ")[2]
        children: dict[str, Any] = {}
        first = local not in parent
        if first:
            parent[local] = children
        stack.append((children, [], parent, local, first))

    def end(_name: str) -> None:
        children, text, parent, local, first = stack.pop()
        if first and not children:
            parent[local] = "".join(text).strip()

    parser = expat.ParserCreate(encoding="utf-8", namespace_separator=" ")
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = lambda data: stack[-1][1].append(data) if stack else None
    try:
        parser.Parse(payload, True)
    except expat.ExpatError as exc:
        raise DecodeError(Reason.MALFORMED, f"invalid XML: {exc}") from exc
    return root
