"""Issue 12 in the config: overlapping camera filters, secret file modes, a remote broker without TLS."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeagent.config import filters_overlap, warnings
from tests.unit.test_config import CAMERAS, config_text, key_files, parse_text, problems_of


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return key_files(tmp_path / "keys")


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("anpr/+/plate", "anpr/north-1/plate", True),
        ("anpr/#", "anpr/north-1/plate", True),
        ("anpr/#", "anpr", True),  # "#" also matches its parent level
        ("#", "frigate/events", True),
        ("anpr/+/plate", "anpr/+/status", False),
        ("anpr/south-1/plate", "anpr/north-1/plate", False),
        ("anpr/+", "anpr/a/b", False),
        ("frigate/tracked_object_update", "frigate/events", False),
        ("a/+/c", "a/b/+", True),
    ],
)
def test_filters_overlap(a: str, b: str, overlap: bool) -> None:
    assert filters_overlap(a, b) is overlap
    assert filters_overlap(b, a) is overlap


def test_overlapping_camera_filters_are_refused(tmp_path: Path, files: tuple[Path, Path]) -> None:
    """The review's case: anpr/+/plate first took north-1's reads to the wrong entrance."""
    cameras = CAMERAS.replace("anpr/south-1/plate", "anpr/+/plate").replace("anpr/north-1/+", "anpr/north-1/plate")
    [problem] = problems_of(tmp_path, config_text(*files, cameras=cameras))
    assert problem.endswith(
        ': cameras[1].topic: "anpr/north-1/plate" overlaps cameras[0].topic "anpr/+/plate": a read on a topic '
        "both match would be taken for the first camera's (give each camera a filter of its own)"
    )
    assert "\n" not in problem


def test_frigates_two_topics_are_two_cameras_that_do_not_overlap(tmp_path: Path, files: tuple[Path, Path]) -> None:
    cameras = (
        '[[cameras]]\nid = "south-1"\ntopic = "frigate/tracked_object_update"\nformat = "frigate"\n\n'
        '[[cameras]]\nid = "north-1"\ntopic = "frigate/events"\nformat = "frigate"\n'
    )
    assert len(parse_text(tmp_path, config_text(*files, cameras=cameras)).cameras) == 2


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_private_key_readable_by_group_or_others_is_refused(
    tmp_path: Path, files: tuple[Path, Path], mode: int
) -> None:
    key, _ = files
    key.chmod(mode)
    [problem] = problems_of(tmp_path, config_text(*files))
    assert ": wechatpay.merchant_private_key: " in problem
    assert f"(mode {mode:04o}): chmod 600 it" in problem


def test_password_files_may_be_group_readable_but_not_world_readable(tmp_path: Path, files: tuple[Path, Path]) -> None:
    secret = tmp_path / "mqtt.password"
    secret.write_text("pw\n")
    secret.chmod(0o640)
    mqtt = f'host = "127.0.0.1"\nusername = "edgeagent"\npassword_file = "{secret}"\n'
    parse_text(tmp_path, config_text(*files, mqtt=mqtt))
    secret.chmod(0o644)
    [problem] = problems_of(tmp_path, config_text(*files, mqtt=mqtt))
    assert ": mqtt.password_file: " in problem and "readable by others (mode 0644)" in problem


def test_a_remote_broker_without_tls_is_warned_about(tmp_path: Path, files: tuple[Path, Path]) -> None:
    local = parse_text(tmp_path, config_text(*files))
    assert warnings(local) == []
    remote = parse_text(tmp_path, config_text(*files, mqtt='host = "broker.example.net"\n'))
    [warning] = warnings(remote)
    assert ": mqtt.host: 'broker.example.net' is not this box and mqtt.tls is false" in warning
    tls = parse_text(tmp_path, config_text(*files, mqtt='host = "10.0.0.5"\ntls = true\n'))
    assert warnings(tls) == []
