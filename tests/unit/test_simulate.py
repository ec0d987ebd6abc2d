"""`simulate.render` round trips: what it publishes decodes back to the read it was asked for.

Each format gives back every field it can carry; what it cannot (Vzenith and Qianyi have no lane,
Frigate no colour) comes back empty, and a colour a format has no code for is refused up front.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeagent import simulate
from edgeagent.config import load
from edgeagent.decoders import KNOWN_FORMATS, REPORTS_DIRECTION, decode
from edgeagent.model import Direction, Ignored, PlateColor, PlateRead, Reason
from edgeagent.routing import Router, topic_matches
from tests.unit.test_config import config_text, key_files

FILTERS = {
    "generic": "anpr/+/plate",
    "vzenith": "device/+/message/up/ivs_result",
    "qianyi": "aiot/plate/+",
    "hikvision": "hikbridge/#",
    "frigate": "frigate/#",
}
CARRIES_LANE = {"generic", "hikvision", "frigate"}
CARRIES_COLOR = {"generic", "vzenith", "qianyi", "hikvision"}
# Vzenith's colorType table (anpr-formats.md §2.6) has no "other" code.
UNSUPPORTED = {("vzenith", PlateColor.OTHER)}
WHEN = 1720078200.123456


def _round_trip(fmt: str, **read: object) -> tuple[str, bytes, PlateRead | Ignored]:
    args = {"plate": "粤B12345", "color": None, "lane": "2", "when": WHEN, "record_id": "90813"} | read
    topic, payload = simulate.render(fmt, FILTERS[fmt], **args)  # type: ignore[arg-type]
    return topic, payload, decode(fmt, topic, payload)


@pytest.mark.parametrize("color", [None, *PlateColor], ids=str)
@pytest.mark.parametrize("fmt", KNOWN_FORMATS)
def test_render_decodes_back_to_the_read(fmt: str, color: PlateColor | None) -> None:
    if (fmt, color) in UNSUPPORTED:
        with pytest.raises(ValueError, match="no code"):
            _round_trip(fmt, color=color)
        return
    topic, _, read = _round_trip(fmt, color=color, confidence=0.87)
    assert topic_matches(FILTERS[fmt], topic)
    assert "+" not in topic and "#" not in topic
    assert isinstance(read, PlateRead)
    assert read.plate == "粤B12345"
    assert read.color == (color if fmt in CARRIES_COLOR else None)
    assert read.vehicle_type is None
    assert read.captured_at == pytest.approx(WHEN, abs=1e-3)  # Qianyi and Hikvision carry milliseconds
    assert read.lane == ("2" if fmt in CARRIES_LANE else None)
    assert read.confidence == pytest.approx(0.87)
    assert read.record_id == "90813"
    assert read.is_replay is False
    assert read.direction is None  # not asked for, not sent: a one-way lane's role is the config's


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("fmt", sorted(REPORTS_DIRECTION))
def test_direction_round_trips_where_the_format_carries_it(fmt: str, direction: Direction) -> None:
    _, _, read = _round_trip(fmt, direction=direction)
    assert isinstance(read, PlateRead) and read.direction is direction


@pytest.mark.parametrize("fmt", sorted(set(KNOWN_FORMATS) - REPORTS_DIRECTION))
def test_direction_is_refused_where_the_format_cannot_carry_it(fmt: str) -> None:
    with pytest.raises(ValueError, match="cannot report a direction"):
        _round_trip(fmt, direction=Direction.OUT)


@pytest.mark.parametrize("fmt", KNOWN_FORMATS)
def test_text_record_id_and_lane_survive(fmt: str) -> None:
    # No space: a lane is 1-64 of A-Z a-z 0-9 . _ - (issue 12), as config sources can name it.
    _, _, read = _round_trip(fmt, record_id="demo-7", lane="east_gate", plate="京AD92035")
    assert isinstance(read, PlateRead)
    assert (read.plate, read.record_id) == ("京AD92035", "demo-7")
    assert read.lane == ("east_gate" if fmt in CARRIES_LANE else None)


@pytest.mark.parametrize("fmt", sorted(set(KNOWN_FORMATS) - {"frigate"}))
@pytest.mark.parametrize("plate", ["", "无牌", "_无_"])
def test_no_plate_read_uses_the_vendor_marker(fmt: str, plate: str) -> None:
    _, payload, read = _round_trip(fmt, plate=plate, color=PlateColor.BLUE)
    assert isinstance(read, PlateRead)
    assert read.plate is None
    if fmt == "qianyi":
        assert json.loads(payload)["plate_num"] == "null"
    if fmt == "hikvision":
        assert b"<licensePlate>noPlate</licensePlate>" in payload


def test_frigate_never_reports_a_no_plate_read() -> None:
    _, _, read = _round_trip("frigate", plate="无牌")
    assert isinstance(read, Ignored)


def test_hikvision_prefixes_the_colour_character_only_on_chinese_plates() -> None:
    _, payload, read = _round_trip("hikvision", plate="黑A12345", color=PlateColor.BLUE)
    assert "<licensePlate>蓝黑A12345</licensePlate>" in payload.decode()
    assert isinstance(read, PlateRead) and read.plate == "黑A12345"
    _, payload, read = _round_trip("hikvision", plate="A283KY77", color=PlateColor.BLUE)
    assert "<licensePlate>A283KY77</licensePlate>" in payload.decode()
    assert isinstance(read, PlateRead) and read.plate == "A283KY77"


def test_vzenith_payload_is_the_base64_mqtt_envelope() -> None:
    topic, payload, _ = _round_trip("vzenith")
    envelope = json.loads(payload)
    assert topic == f"device/{simulate.VZENITH_SERIAL}/message/up/ivs_result"
    assert envelope["name"] == "ivs_result" and envelope["sn"] == simulate.VZENITH_SERIAL
    result = envelope["payload"]["AlarmInfoPlate"]["result"]["PlateResult"]
    assert result["license"] == "57KkQjEyMzQ1"  # base64("粤B12345")
    assert result["plateid"] == 90813 and result["timeStamp"]["Timeval"]["sec"] == int(WHEN)


@pytest.mark.parametrize(
    ("topic_filter", "topic"),
    [
        ("device/0f823866-d2dc45ab/message/up/ivs_result", "device/0f823866-d2dc45ab/message/up/ivs_result"),
        ("+/device/message/up/ivs_result", f"{simulate.VZENITH_SERIAL}/device/message/up/ivs_result"),
        ("device/+/message/up/+", f"device/{simulate.VZENITH_SERIAL}/message/up/ivs_result"),
        ("#", "ivs_result"),
    ],
)
def test_vzenith_topics_and_serial(topic_filter: str, topic: str) -> None:
    got_topic, payload = simulate.render(
        "vzenith", topic_filter, plate="粤B12345", color=None, lane=None, when=WHEN, record_id="1"
    )
    assert got_topic == topic
    levels = topic.split("/")
    serial = levels[1] if levels[0] == "device" else levels[0] if len(levels) > 1 else simulate.VZENITH_SERIAL
    assert json.loads(payload)["sn"] == serial
    assert isinstance(decode("vzenith", got_topic, payload), PlateRead)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        simulate.render("hik", "x", plate="粤B12345", color=None, lane=None, when=WHEN, record_id="1")


@pytest.mark.parametrize(
    ("text", "color"),
    [("blue", PlateColor.BLUE), (" Yellow_Green ", PlateColor.YELLOW_GREEN), ("PLATE_COLOR_BLACK", PlateColor.BLACK)],
)
def test_parse_color(text: str, color: PlateColor) -> None:
    assert simulate.parse_color(text) is color


def test_parse_color_lists_the_accepted_names() -> None:
    with pytest.raises(ValueError, match="accepted: blue, yellow"):
        simulate.parse_color("pink")


# -- exit cameras and two-way lanes (SPEC §10) --------------------------------------------------------

LANES = """\
[[cameras]]
id = "exit-vz"
topic = "device/+/message/up/ivs_result"
format = "vzenith"

[[cameras]]
id = "both-qy"
topic = "aiot/plate/+"
format = "qianyi"

[[entrances]]
number = "A01"
name = "入口"
sources = ["both-qy"]

[[exits]]
number = "X01"
name = "出口"
sources = ["exit-vz", "both-qy"]
"""


@pytest.mark.parametrize(
    ("camera", "direction", "expected"),
    [
        ("exit-vz", None, "X01"),  # an exit camera: nothing special, the config is the lane's role
        ("both-qy", Direction.IN, "A01"),  # a two-way lane goes by the read's direction
        ("both-qy", Direction.OUT, "X01"),
        ("both-qy", None, "no_direction"),
    ],
)
def test_a_simulated_read_goes_where_the_config_sends_a_cameras_read(
    tmp_path: Path, camera: str, direction: Direction | None, expected: str
) -> None:
    key, pub = key_files(tmp_path / "keys")
    path = tmp_path / "edgeagent.toml"
    path.write_text(config_text(key, pub, cameras=LANES, entrances=""), encoding="utf-8")
    config = load(path)
    router = Router.build(config)
    cam = config.camera(camera)
    assert cam is not None
    topic, payload = simulate.render(
        cam.format, cam.topic, plate="粤B12345", color=None, lane=None, when=WHEN, record_id="7", direction=direction
    )
    read = decode(cam.format, topic, payload)
    assert isinstance(read, PlateRead)
    found = router.camera_for(topic)
    assert found is not None and found.id == camera
    routed = router.route(found.id, read.lane, read.direction)
    assert (routed.value if isinstance(routed, Reason) else routed.number) == expected
