"""Qianyi 芊熠 flat JSON `cmd: "result"` over MQTT (anpr-formats.md §3).

Only third-party sources exist for this format (§3: an adapter citing the vendor's "MQTT通信协议
V4.23", a camera simulator and a VO class whose fields are all strings), so the decoder is tolerant:
numbers may arrive as decimal strings, `utc_ts` in seconds or milliseconds, and any `cmd` other than
`result` (heartbeat `mqtt_herat`, `camera_register`, `image_result`, ...) is Ignored. The topic
(`aiot/plate/{sn}`, `/{product}/{sn}/qymqttpost`, ...) is not used.
"""

from __future__ import annotations

from typing import TypeVar

from edgeagent.decoders._common import Fields, bad, load_json_object, plate_text
from edgeagent.model import Direction, Ignored, PlateColor, PlateRead, VehicleType

T = TypeVar("T", PlateColor, VehicleType)

# `plate_color` is a Chinese colour name ("蓝色", §3.2-§3.3); the full value set is UNCONFIRMED, so the
# names are matched with or without the trailing 色, and anything else is UNKNOWN (not an error).
COLORS: dict[str, PlateColor] = {
    "蓝": PlateColor.BLUE,
    "黄": PlateColor.YELLOW,
    "白": PlateColor.WHITE,
    "黑": PlateColor.BLACK,
    "绿": PlateColor.GREEN,
    "渐变绿": PlateColor.GREEN,
    "新能源绿": PlateColor.GREEN,
    "黄绿": PlateColor.YELLOW_GREEN,
    "新能源黄绿": PlateColor.YELLOW_GREEN,
    "农用黄": PlateColor.AGRICULTURAL_YELLOW,
    "其他": PlateColor.OTHER,
    "其它": PlateColor.OTHER,
    "未知": PlateColor.UNKNOWN,
}
# `vehicle_type` is Chinese too ("小型车" in the simulator, §3.2); unlisted names are UNKNOWN.
VEHICLE_TYPES: dict[str, VehicleType] = {
    "小型车": VehicleType.SMALL,
    "小车": VehicleType.SMALL,
    "小型汽车": VehicleType.SMALL,
    "大型车": VehicleType.LARGE,
    "大车": VehicleType.LARGE,
    "大型汽车": VehicleType.LARGE,
    "超大型车": VehicleType.EXTRA_LARGE,
    "超大车": VehicleType.EXTRA_LARGE,
    "未知": VehicleType.UNKNOWN,
}

# Confidence: the adapter's DTO comment says "置信度 0-28" and the only sample carries 28 (§3.3, §13.3),
# which is no evidence of a 0-28 scale. Like every other Chinese camera in the reference it is read as
# 0..100, so `min_confidence` compares like with like; a value above 100 is rejected, not clamped.
CONFIDENCE_SCALE = 100


def decode(topic: str, payload: bytes) -> PlateRead | Ignored:
    """Decode one Qianyi message; only `cmd: "result"` is a plate read."""
    del topic  # every field the read needs is in the payload
    fields = Fields(load_json_object(payload), numeric_text=True)
    cmd = fields.text("cmd")
    if cmd is None:
        raise bad("cmd", "missing")
    if cmd != "result":
        # `mqtt_herat` (sic) is the heartbeat; `image_result` carries only pictures (§3.1-§3.2).
        return Ignored(f"qianyi cmd {cmd!r} is not a plate result")
    key = "plate_num" if "plate_num" in fields.data else "plate_number"
    if key not in fields.data:
        raise bad("plate_num", "missing")
    kind = (fields.text("type") or "").strip().lower()
    return PlateRead(
        # "null" as a string, not JSON null, is the protocol's no-plate value (§3.1).
        plate=plate_text(fields.text(key)),
        color=_lookup(fields, "plate_color", COLORS, PlateColor.UNKNOWN),
        vehicle_type=_lookup(fields, "vehicle_type", VEHICLE_TYPES, VehicleType.UNKNOWN),
        # `utc_ts` is UTC epoch, seconds in one source and milliseconds in another (§3.2);
        # `local_time` has no offset and is never used.
        captured_at=fields.time("utc_ts"),
        confidence=fields.confidence("confidence", CONFIDENCE_SCALE),
        record_id=fields.ident("msg_id"),  # 13-digit ms time + 7 random chars; the dedup key (§3.1)
        is_replay=kind == "offline",  # "type=offline 为断网续传结果" (§3.1)
        direction=_direction(fields),
    )


def _direction(fields: Fields) -> Direction | None:
    """`inout` "in" / "out" (§3.3), any case; anything else is None, not an error.

    The field is only needed on a two-way lane, where a read without it is rejected `no_direction`
    by routing (SPEC §10); failing the whole read here would also lose reads of one-way lanes,
    whose role comes from the config, over a field they do not need.
    """
    text = (fields.text("inout") or "").strip().lower()
    return Direction(text) if text in ("in", "out") else None


def _lookup(fields: Fields, key: str, names: dict[str, T], unknown: T) -> T | None:
    text = (fields.text(key) or "").strip()
    if not text:
        return None
    return names.get(text) or names.get(text.removesuffix("色")) or unknown
