"""Screening: turn a decoded, routed plate read into an `Entry`, or say why not (SPEC §4).

`screen` is pure: the time, the clock's state and the car-type lookup are passed in. The repeat
window needs the journal, so it is applied there, inside the transaction that records the entry.
`CarTypeLists` is the one piece with I/O: it re-reads its plate-list files when they change.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeagent import plates
from edgeagent.config import CameraConfig, EntranceConfig, ExitConfig, ParkingConfig
from edgeagent.model import (
    CarType,
    Entry,
    ExitRead,
    PlateColor,
    PlateRead,
    Reason,
    Rejection,
    TimeSource,
    VehicleType,
)

log = logging.getLogger(__name__)

# SPEC §3 timestamp_source "auto": camera time unless it disagrees with the agent's by more than this.
CAMERA_TIME_TOLERANCE_S = 300.0


@dataclass(frozen=True, slots=True)
class Screened:
    """Outcome of `screen`: an entry, or the reason and detail of a rejection (and the plate, if any)."""

    entry: Entry | None
    reason: Reason | None = None
    detail: str = ""
    plate: str | None = None


def entry_time(read: PlateRead, parking: ParkingConfig, now: float, clock_synced: bool) -> tuple[int, TimeSource]:
    """`enter_timestamp` and its source per `timestamp_source` (SPEC §3, §5)."""
    camera_time = read.captured_at
    if parking.timestamp_source == "agent" or camera_time is None:
        return int(now), TimeSource.AGENT
    # An unsynchronised agent clock (no RTC after a power cut) is the less trustworthy of the two: then
    # the camera's time stands.
    if not clock_synced:
        return int(camera_time), TimeSource.CAMERA
    # No car enters in the future: a camera time more than 300 s ahead of a synchronised clock is a broken
    # camera clock, and the car is reported with the agent's time (recorded as such), never lost
    # (SPEC §5 "a camera clock that is wrong never loses an entry").
    if camera_time > now + CAMERA_TIME_TOLERANCE_S:
        return int(now), TimeSource.AGENT
    # auto: offline re-sends carry the real entry time, however old (anpr-formats.md §13.5); any other
    # camera time more than 300 s away from ours is the camera's clock being wrong.
    if parking.timestamp_source == "camera" or read.is_replay or abs(camera_time - now) <= CAMERA_TIME_TOLERANCE_S:
        return int(camera_time), TimeSource.CAMERA
    return int(now), TimeSource.AGENT


def repeat_of(entry: Entry, recent: Callable[[str, float, float], int | None], window_s: float) -> Rejection | None:
    """The repeat rule (SPEC §2 guarantee 2): the same plate entering again within `window_s` of an
    entry already journaled is the same car at the barrier, kept as a `repeat` rejection."""
    if window_s <= 0:
        return None
    earlier = recent(entry.plate_number, entry.enter_timestamp - window_s, entry.enter_timestamp + window_s)
    if earlier is None:
        return None
    return Rejection(
        entry.camera,
        entry.lane,
        entry.dedup_key,
        Reason.REPEAT,
        f"same plate as entry #{earlier} within {window_s:g} s",
        plate_number=entry.plate_number,
        repeat_of=earlier,
    )


def screen(
    read: PlateRead,
    *,
    camera: CameraConfig,
    entrance: EntranceConfig,
    parking: ParkingConfig,
    dedup_key: str,
    now: float,
    clock_synced: bool,
    car_type_of: Callable[[str], CarType],
) -> Screened:
    """Apply SPEC §4's rules to one read: plate validity, confidence, time, colour, types."""
    plate = plates.normalise(read.plate or "")
    refused = _refused(read, plate, camera, parking)
    if refused is not None:
        return refused
    enter_timestamp, time_source = entry_time(read, parking, now, clock_synced)
    color = read.color if read.color not in (None, PlateColor.UNKNOWN) else plates.color_from_plate(plate)
    vehicle_type = (
        entrance.vehicle_type
        or (read.vehicle_type if read.vehicle_type not in (None, VehicleType.UNKNOWN) else None)
        or plates.vehicle_type_from_color(color)
        or VehicleType.UNKNOWN
    )
    entry = Entry(
        camera=camera.id,
        lane=read.lane,
        dedup_key=dedup_key,
        plate_number=plate,
        plate_color=color or PlateColor.UNKNOWN,
        vehicle_type=vehicle_type,
        car_type=car_type_of(plate),
        enter_timestamp=enter_timestamp,
        time_source=time_source,
        clock_synced=clock_synced,
        entrance_number=entrance.number,
        entrance_name=entrance.name,
        parking_id=parking.parking_id,
        discount_template_id=entrance.discount_template_id,
        confidence=read.confidence,
    )
    return Screened(entry, plate=plate)


def _refused(read: PlateRead, plate: str, camera: CameraConfig, parking: ParkingConfig) -> Screened | None:
    """The checks every read passes, entrance or exit: a plate, a valid one, enough confidence."""
    kind = plates.classify(plate)
    if kind is plates.PlateClass.NO_PLATE:
        return Screened(None, Reason.NO_PLATE, "the camera read no plate")
    if kind is plates.PlateClass.INVALID:
        return Screened(None, Reason.INVALID_PLATE, f"{plate[:40]!r} is not a mainland plate", plate[:40])
    threshold = camera.min_confidence if camera.min_confidence is not None else parking.min_confidence
    if read.confidence is not None and read.confidence < threshold:
        return Screened(None, Reason.LOW_CONFIDENCE, f"confidence {read.confidence:.2f} < {threshold:.2f}", plate)
    return None


def screen_exit(
    read: PlateRead,
    *,
    camera: CameraConfig,
    exit_: ExitConfig,
    parking: ParkingConfig,
    dedup_key: str,
    now: float,
    clock_synced: bool,
) -> ExitRead | Screened:
    """An exit read passes the same screening as an entry (SPEC §10), and is timed the same way."""
    plate = plates.normalise(read.plate or "")
    refused = _refused(read, plate, camera, parking)
    if refused is not None:
        return refused
    read_at, time_source = entry_time(read, parking, now, clock_synced)
    color = read.color if read.color not in (None, PlateColor.UNKNOWN) else plates.color_from_plate(plate)
    return ExitRead(
        camera=camera.id,
        lane=read.lane,
        dedup_key=dedup_key,
        plate_number=plate,
        plate_color=color or PlateColor.UNKNOWN,
        read_at=read_at,
        time_source=time_source,
        clock_synced=clock_synced,
        exit_number=exit_.number,
        exit_name=exit_.name,
        confidence=read.confidence,
    )


class CarTypeLists:
    """`car_type_lists`: plate-list files (one plate per line, `#` comments), re-read when they change.

    A plate in several lists takes the first list in config order. A list that cannot be read keeps
    its last good contents and the problem is logged once per change.
    """

    def __init__(self, lists: tuple[tuple[CarType, Path], ...], default: CarType) -> None:
        self._lists = lists
        self._default = default
        self._stamps: dict[Path, tuple[int, int] | None] = {}
        self._plates: dict[Path, frozenset[str]] = {}

    def refresh(self) -> None:
        """Re-read any list whose modification time or size changed since the last look."""
        for _, path in self._lists:
            try:
                st = os.stat(path)
                stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if stamp == self._stamps.get(path, ()):
                continue
            self._stamps[path] = stamp
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("car_type_list_unreadable path=%s error=%s", path, exc)
                continue
            entries = (line.split("#", 1)[0] for line in text.splitlines())
            self._plates[path] = frozenset(plates.normalise(e) for e in entries if e.strip())
            log.info("car_type_list_loaded path=%s plates=%d", path, len(self._plates[path]))

    def __call__(self, plate: str) -> CarType:
        for car_type, path in self._lists:
            if plate in self._plates.get(path, frozenset()):
                return car_type
        return self._default
