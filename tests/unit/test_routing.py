"""Routing (SPEC §3): topic → camera by MQTT filter, and (camera, lane) → entrance, compiled at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeagent.config import Config, EntranceConfig, ExitConfig, load
from edgeagent.model import Direction, Reason
from edgeagent.routing import Router, topic_matches
from tests.unit.test_config import config_text, key_files


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("anpr/south-1/plate", "anpr/south-1/plate", True),
        ("anpr/south-1/plate", "anpr/south-1/plates", False),
        ("anpr/south-1/plate", "anpr/south-1", False),
        ("anpr/south-1/plate", "anpr/south-1/plate/x", False),
        ("anpr/+/plate", "anpr/south-1/plate", True),
        ("anpr/+/plate", "anpr//plate", True),  # an empty level is still a level
        ("anpr/+/plate", "anpr/a/b/plate", False),
        ("anpr/+", "anpr/south-1/plate", False),
        ("anpr/#", "anpr/south-1/plate", True),
        ("anpr/#", "anpr", True),  # "#" also matches the parent level (MQTT 3.1.1 §4.7.1.2)
        ("#", "anpr/south-1/plate", True),
        ("+/+/plate", "anpr/x/plate", True),
        ("#", "$SYS/broker/uptime", False),  # wildcards never match $-topics
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/broker/uptime", "$SYS/broker/uptime", True),
        ("/ivs/+/result", "/ivs/cam1/result", True),  # Vzenith topics start with "/"
        ("ivs/+/result", "/ivs/cam1/result", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


CAMERAS = """\
[[cameras]]
id = "south-1"
topic = "anpr/south-1/plate"

[[cameras]]
id = "north"
topic = "anpr/north/+"

[[cameras]]
id = "catch-all"
topic = "cams/#"
"""
ENTRANCES = """\
[[entrances]]
number = "A01"
name = "南门入口"
sources = ["south-1"]

[[entrances]]
number = "B01"
name = "北门小车道"
sources = ["north:1", "catch-all:9"]

[[entrances]]
number = "B02"
name = "北门大车道"
sources = ["north:2", "south-1:7"]
"""


@pytest.fixture
def config(tmp_path: Path) -> Config:
    key, pub = key_files(tmp_path / "keys")
    path = tmp_path / "edgeagent.toml"
    path.write_text(config_text(key, pub, cameras=CAMERAS, entrances=ENTRANCES), encoding="utf-8")
    return load(path)


def test_each_topic_finds_its_one_camera(config: Config) -> None:
    # Filters that overlap are refused when the config loads (issue 12), so order never decides.
    router = Router.build(config)
    camera = router.camera_for("anpr/south-1/plate")
    assert camera is not None and camera.id == "south-1"
    north = router.camera_for("anpr/north/lane2")
    assert north is not None and north.id == "north"
    other = router.camera_for("cams/east/plate")
    assert other is not None and other.id == "catch-all"
    assert router.camera_for("other/south-1/plate") is None


def test_whole_camera_source_covers_every_lane(config: Config) -> None:
    router = Router.build(config)
    for lane in (None, "1", "2", "99"):
        entrance = router.entrance_for("south-1", lane)
        assert entrance is not None and entrance.number == "A01", lane


def test_lane_source_wins_over_whole_camera(config: Config) -> None:
    entrance = Router.build(config).entrance_for("south-1", "7")
    assert entrance is not None and entrance.number == "B02"


def test_lane_sources_only_route_their_own_lanes(config: Config) -> None:
    router = Router.build(config)
    one, two = router.entrance_for("north", "1"), router.entrance_for("north", "2")
    assert one is not None and one.number == "B01"
    assert two is not None and two.number == "B02"
    assert router.entrance_for("north", "3") is None  # an unknown lane maps nowhere: rejected, not guessed
    assert router.entrance_for("north", None) is None  # no lane given, and no whole-camera source
    assert router.entrance_for("catch-all", "1") is None
    nine = router.entrance_for("catch-all", "9")
    assert nine is not None and nine.number == "B01"


def test_lanes_are_compared_as_text(config: Config) -> None:
    router = Router.build(config)
    assert router.entrance_for("north", "01") is None  # decoders turn lane 1 into "1"; "01" is another lane
    assert router.entrance_for("unknown-camera", "1") is None


# -- exits and two-way lanes (SPEC §10) ------------------------------------------------------------

GATE_CAMERAS = """\
[[cameras]]
id = "in-cam"
topic = "anpr/in-cam/plate"

[[cameras]]
id = "out-cam"
topic = "anpr/out-cam/plate"
format = "vzenith"

[[cameras]]
id = "both"
topic = "anpr/both/plate"

[[cameras]]
id = "split"
topic = "anpr/split/plate"
format = "qianyi"
"""
GATES = """\
[[entrances]]
number = "A01"
name = "入口"
sources = ["in-cam", "both", "split:1"]

[[exits]]
number = "X01"
name = "出口"
sources = ["out-cam", "both"]

[[exits]]
number = "X02"
name = "出口二"
sources = ["split:2", "out-cam:9"]
"""


@pytest.fixture
def gates(tmp_path: Path) -> Router:
    key, pub = key_files(tmp_path / "keys")
    path = tmp_path / "edgeagent.toml"
    path.write_text(config_text(key, pub, cameras=GATE_CAMERAS, entrances=GATES), encoding="utf-8")
    return Router.build(load(path))


def _number(result: EntranceConfig | ExitConfig | Reason) -> str:
    return result.value if isinstance(result, Reason) else result.number


@pytest.mark.parametrize(
    ("camera", "lane", "direction", "expected"),
    [
        # One-way lanes: the config is the role, whatever the read says.
        ("in-cam", None, None, "A01"),
        ("in-cam", "3", Direction.OUT, "A01"),
        ("out-cam", None, None, "X01"),
        ("out-cam", "1", Direction.IN, "X01"),
        ("out-cam", "9", None, "X02"),  # a lane source wins over the whole camera among exits too
        ("split", "1", Direction.OUT, "A01"),
        ("split", "2", Direction.IN, "X02"),
        # Unmapped: no guess.
        ("split", "3", Direction.IN, "unmapped_lane"),
        ("split", None, None, "unmapped_lane"),
        ("nowhere", None, Direction.OUT, "unmapped_lane"),
        # Two-way lane: the read's direction decides; none → no_direction.
        ("both", None, Direction.IN, "A01"),
        ("both", "7", Direction.OUT, "X01"),
        ("both", None, None, "no_direction"),
        ("both", "7", None, "no_direction"),
    ],
)
def test_route(gates: Router, camera: str, lane: str | None, direction: Direction | None, expected: str) -> None:
    assert _number(gates.route(camera, lane, direction)) == expected


def test_entrance_for_is_unchanged_for_existing_callers(gates: Router) -> None:
    entrance = gates.entrance_for("both", None)
    assert entrance is not None and entrance.number == "A01"  # blind to direction, as before
    assert gates.entrance_for("out-cam", None) is None
    exit_ = gates.exit_for("out-cam", "9")
    assert exit_ is not None and exit_.number == "X02"
    assert gates.exit_for("in-cam", None) is None


def test_route_without_exits_matches_entrance_for(config: Config) -> None:
    router = Router.build(config)
    for camera, lane in [("south-1", None), ("south-1", "7"), ("north", "1"), ("north", "3"), ("x", None)]:
        for direction in (None, *Direction):
            routed = router.route(camera, lane, direction)
            entrance = router.entrance_for(camera, lane)
            assert routed == (entrance if entrance is not None else Reason.UNMAPPED_LANE)
