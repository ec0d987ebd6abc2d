"""Screening (SPEC §4): plate validity, confidence, entry time, colour, vehicle and car type; car-type lists."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from edgeagent.config import CameraConfig, EntranceConfig, ParkingConfig, TimestampSource
from edgeagent.model import CarType, PlateColor, PlateRead, Reason, TimeSource, VehicleType
from edgeagent.screening import CAMERA_TIME_TOLERANCE_S, CarTypeLists, Screened, screen

NOW = 1_720_078_200.0
CAMERA = CameraConfig("south-1", "anpr/south-1/plate", "generic", None)
ENTRANCE = EntranceConfig("A01", "南门入口", ("south-1",), None, (1001, 1002))
PARKING = ParkingConfig(
    parking_id="WXPARK001",
    repeat_window_s=120,
    min_confidence=0.0,
    max_entry_age_s=604800,
    timestamp_source="auto",
    default_car_type=CarType.TEMPORARY,
    car_type_lists=(),
)


def run(
    read: PlateRead,
    *,
    camera: CameraConfig = CAMERA,
    entrance: EntranceConfig = ENTRANCE,
    parking: ParkingConfig = PARKING,
    clock_synced: bool = True,
    car_type: CarType = CarType.TEMPORARY,
) -> Screened:
    return screen(
        read,
        camera=camera,
        entrance=entrance,
        parking=parking,
        dedup_key="south-1|id|e1",
        now=NOW,
        clock_synced=clock_synced,
        car_type_of=lambda plate: car_type,
    )


def test_valid_read_becomes_an_entry_with_every_field() -> None:
    read = PlateRead(" 粤b·12345 ", PlateColor.BLUE, VehicleType.SMALL, NOW - 5, "1", 0.97, "e1")
    result = run(read, car_type=CarType.MONTHLY)
    entry = result.entry
    assert entry is not None and result.reason is None
    assert entry.plate_number == "粤B12345"  # normalised
    assert entry.plate_color is PlateColor.BLUE
    assert entry.vehicle_type is VehicleType.SMALL
    assert entry.car_type is CarType.MONTHLY
    assert (entry.enter_timestamp, entry.time_source) == (int(NOW - 5), TimeSource.CAMERA)
    assert (entry.camera, entry.lane, entry.dedup_key) == ("south-1", "1", "south-1|id|e1")
    assert (entry.entrance_number, entry.entrance_name, entry.parking_id) == ("A01", "南门入口", "WXPARK001")
    assert entry.discount_template_id == (1001, 1002)
    assert entry.confidence == 0.97
    assert entry.clock_synced is True


@pytest.mark.parametrize("plate", [None, "", "无牌", "_无_", "  "])
def test_no_plate_is_rejected(plate: str | None) -> None:
    result = run(PlateRead(plate))
    assert result.entry is None
    assert result.reason is Reason.NO_PLATE


@pytest.mark.parametrize("plate", ["ABC'; DROP TABLE x;--", "粤B1234", "12345678", "粤B12345678901234567890"])
def test_invalid_plate_is_rejected_with_the_plate(plate: str) -> None:
    result = run(PlateRead(plate))
    assert result.entry is None
    assert result.reason is Reason.INVALID_PLATE
    assert "is not a mainland plate" in result.detail
    assert result.plate is not None and len(result.plate) <= 40


def test_confidence_below_the_lot_minimum_is_rejected() -> None:
    parking = dataclasses.replace(PARKING, min_confidence=0.8)
    low = run(PlateRead("粤B12345", confidence=0.79), parking=parking)
    assert low.reason is Reason.LOW_CONFIDENCE
    assert low.detail == "confidence 0.79 < 0.80"
    assert run(PlateRead("粤B12345", confidence=0.8), parking=parking).entry is not None
    assert run(PlateRead("粤B12345", confidence=None), parking=parking).entry is not None  # no score: no judgement


def test_camera_minimum_overrides_the_lot_minimum() -> None:
    parking = dataclasses.replace(PARKING, min_confidence=0.9)
    lenient = dataclasses.replace(CAMERA, min_confidence=0.5)
    assert run(PlateRead("粤B12345", confidence=0.6), camera=lenient, parking=parking).entry is not None
    strict = dataclasses.replace(CAMERA, min_confidence=0.95)
    assert run(PlateRead("粤B12345", confidence=0.92), camera=strict).reason is Reason.LOW_CONFIDENCE


# -- enter_timestamp (SPEC §3 timestamp_source) ----------------------------------------------------


def test_camera_time_far_in_the_future_uses_the_agents_time_when_the_clock_is_synced() -> None:
    ahead = NOW + CAMERA_TIME_TOLERANCE_S + 1
    result = run(PlateRead("粤B12345", captured_at=ahead))
    assert result.entry is not None, "a wrong camera clock must never lose the car (SPEC §5)"
    assert (result.entry.enter_timestamp, result.entry.time_source) == (int(NOW), TimeSource.AGENT)
    # An offline re-send from the future is no more believable.
    replay = run(PlateRead("粤B12345", captured_at=ahead, is_replay=True))
    assert replay.entry is not None and replay.entry.time_source is TimeSource.AGENT
    # Within the tolerance the camera's time stands.
    near = run(PlateRead("粤B12345", captured_at=NOW + CAMERA_TIME_TOLERANCE_S))
    assert near.entry is not None and near.entry.enter_timestamp == int(NOW + CAMERA_TIME_TOLERANCE_S)


def test_unsynced_agent_clock_trusts_the_camera() -> None:
    ahead = NOW + 3600
    result = run(PlateRead("粤B12345", captured_at=ahead), clock_synced=False)
    assert result.entry is not None
    assert (result.entry.enter_timestamp, result.entry.time_source) == (int(ahead), TimeSource.CAMERA)
    assert result.entry.clock_synced is False


@pytest.mark.parametrize(
    ("source", "captured_at", "replay", "expected"),
    [
        ("auto", None, False, (int(NOW), TimeSource.AGENT)),
        ("auto", NOW - 299, False, (int(NOW - 299), TimeSource.CAMERA)),
        ("auto", NOW - 301, False, (int(NOW), TimeSource.AGENT)),  # camera clock drifted: use ours
        ("auto", NOW - 86400, True, (int(NOW - 86400), TimeSource.CAMERA)),  # offline re-send keeps its time
        ("camera", NOW - 86400, False, (int(NOW - 86400), TimeSource.CAMERA)),
        ("camera", None, False, (int(NOW), TimeSource.AGENT)),
        ("agent", NOW - 10, False, (int(NOW), TimeSource.AGENT)),
    ],
)
def test_timestamp_source(
    source: TimestampSource, captured_at: float | None, replay: bool, expected: tuple[int, TimeSource]
) -> None:
    parking = dataclasses.replace(PARKING, timestamp_source=source)
    result = run(PlateRead("粤B12345", captured_at=captured_at, is_replay=replay), parking=parking)
    assert result.entry is not None
    assert (result.entry.enter_timestamp, result.entry.time_source) == expected


def test_future_time_uses_the_agents_time_even_for_timestamp_source_camera() -> None:
    parking = dataclasses.replace(PARKING, timestamp_source="camera")
    entry = run(PlateRead("粤B12345", captured_at=NOW + 3600), parking=parking).entry
    assert entry is not None and (entry.enter_timestamp, entry.time_source) == (int(NOW), TimeSource.AGENT)
    # In the past, however far, "camera" means the camera's time.
    old = run(PlateRead("粤B12345", captured_at=NOW - 7200), parking=parking).entry
    assert old is not None and (old.enter_timestamp, old.time_source) == (int(NOW - 7200), TimeSource.CAMERA)


# -- plate_color and vehicle_type (SPEC §4) --------------------------------------------------------


@pytest.mark.parametrize(
    ("plate", "color", "expected"),
    [
        ("粤B12345", PlateColor.YELLOW, PlateColor.YELLOW),  # the camera's colour decides
        ("粤BD12345", PlateColor.BLUE, PlateColor.BLUE),  # even for an 8-character plate
        ("粤BD12345", None, PlateColor.GREEN),  # none given: new-energy plates are green
        ("粤BD12345", PlateColor.UNKNOWN, PlateColor.GREEN),
        ("粤B12345", None, PlateColor.UNKNOWN),  # no guess for a 7-character plate
    ],
)
def test_plate_color(plate: str, color: PlateColor | None, expected: PlateColor) -> None:
    result = run(PlateRead(plate, color))
    assert result.entry is not None and result.entry.plate_color is expected


@pytest.mark.parametrize(
    ("fixed", "camera_type", "color", "expected"),
    [
        (VehicleType.EXTRA_LARGE, VehicleType.SMALL, PlateColor.BLUE, VehicleType.EXTRA_LARGE),  # entrance wins
        (None, VehicleType.LARGE, PlateColor.BLUE, VehicleType.LARGE),  # then the camera's classification
        (None, VehicleType.UNKNOWN, PlateColor.YELLOW, VehicleType.LARGE),  # then the colour
        (None, None, PlateColor.YELLOW_GREEN, VehicleType.LARGE),
        (None, None, PlateColor.BLUE, VehicleType.SMALL),
        (None, None, PlateColor.GREEN, VehicleType.SMALL),
        (None, None, PlateColor.WHITE, VehicleType.UNKNOWN),  # nothing to go by
        (None, None, None, VehicleType.UNKNOWN),
    ],
)
def test_vehicle_type_precedence(
    fixed: VehicleType | None, camera_type: VehicleType | None, color: PlateColor | None, expected: VehicleType
) -> None:
    entrance = dataclasses.replace(ENTRANCE, vehicle_type=fixed)
    result = run(PlateRead("粤B12345", color, camera_type), entrance=entrance)
    assert result.entry is not None and result.entry.vehicle_type is expected


# -- car_type_lists --------------------------------------------------------------------------------


def write(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(mtime_ns, mtime_ns))  # an explicit new mtime: no reliance on timestamp granularity


def test_car_type_lists_read_plates_comments_and_normalise(tmp_path: Path) -> None:
    monthly, free = tmp_path / "monthly.txt", tmp_path / "free.txt"
    write(monthly, "# monthly holders\n粤B12345  # Mr Li\n\n 粤b·54321\n", 1_000_000_000_000_000_000)
    write(free, "粤B12345\n京A00599\n", 1_000_000_000_000_000_000)
    lists = CarTypeLists(((CarType.MONTHLY, monthly), (CarType.FREE, free)), CarType.TEMPORARY)
    lists.refresh()
    assert lists("粤B12345") is CarType.MONTHLY  # in both: the first list in config order wins
    assert lists("粤B54321") is CarType.MONTHLY
    assert lists("京A00599") is CarType.FREE
    assert lists("沪A88888") is CarType.TEMPORARY


def test_car_type_lists_are_re_read_when_they_change(tmp_path: Path) -> None:
    monthly = tmp_path / "monthly.txt"
    write(monthly, "粤B12345\n", 1_000_000_000_000_000_000)
    lists = CarTypeLists(((CarType.MONTHLY, monthly),), CarType.OTHERS)
    lists.refresh()
    assert lists("粤B12345") is CarType.MONTHLY

    write(monthly, "粤B99999\n", 1_000_000_001_000_000_000)  # same size, new mtime
    assert lists("粤B12345") is CarType.MONTHLY  # nothing changes until the next refresh
    lists.refresh()
    assert lists("粤B12345") is CarType.OTHERS
    assert lists("粤B99999") is CarType.MONTHLY


def test_unreadable_list_keeps_its_last_good_contents(tmp_path: Path) -> None:
    monthly = tmp_path / "monthly.txt"
    write(monthly, "粤B12345\n", 1_000_000_000_000_000_000)
    lists = CarTypeLists(((CarType.MONTHLY, monthly),), CarType.TEMPORARY)
    lists.refresh()
    monthly.unlink()  # e.g. being replaced by an editor or a sync job
    lists.refresh()
    assert lists("粤B12345") is CarType.MONTHLY
    monthly.write_bytes(b"\xff\xfe not utf-8")
    lists.refresh()
    assert lists("粤B12345") is CarType.MONTHLY
    write(monthly, "京A00599\n", 1_000_000_002_000_000_000)
    lists.refresh()
    assert lists("粤B12345") is CarType.TEMPORARY
    assert lists("京A00599") is CarType.MONTHLY


def test_missing_list_at_start_means_the_default(tmp_path: Path) -> None:
    lists = CarTypeLists(((CarType.FREE, tmp_path / "nowhere.txt"),), CarType.TEMPORARY)
    lists.refresh()
    assert lists("粤B12345") is CarType.TEMPORARY
