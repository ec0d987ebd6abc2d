"""Value types shared by the pure core: enums of the WeChat Pay API and our own reads and entries.

Nothing here does I/O. Decoders produce `PlateRead`s, the pipeline turns one into an `Entry` or a
`Rejection`, and the journal stores those.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class PlateColor(enum.StrEnum):
    """`plate_color` of the entry API (wechatpay-api.md §1.2)."""

    UNKNOWN = "PLATE_COLOR_UNKNOWN"
    BLUE = "PLATE_COLOR_BLUE"
    YELLOW = "PLATE_COLOR_YELLOW"
    BLACK = "PLATE_COLOR_BLACK"
    WHITE = "PLATE_COLOR_WHITE"
    GREEN = "PLATE_COLOR_GREEN"
    YELLOW_GREEN = "PLATE_COLOR_YELLOW_GREEN"
    AGRICULTURAL_YELLOW = "PLATE_COLOR_AGRICULTURAL_YELLOW"
    OTHER = "PLATE_COLOR_OTHER"


class VehicleType(enum.StrEnum):
    """`vehicle_type` of the entry API."""

    UNKNOWN = "VEHICLE_TYPE_UNKNOWN"
    SMALL = "VEHICLE_TYPE_SMALL"
    LARGE = "VEHICLE_TYPE_LARGE"
    EXTRA_LARGE = "VEHICLE_TYPE_EXTRA_LARGE"
    ALL_TYPE = "VEHICLE_TYPE_ALL_TYPE"


class CarType(enum.StrEnum):
    """`car_type` (车辆性质) of the entry API."""

    UNKNOWN = "PLATE_TYPE_UNKNOWN"
    TEMPORARY = "PLATE_TYPE_TEMPORARY"
    MONTHLY = "PLATE_TYPE_MONTHLY"
    FREE = "PLATE_TYPE_FREE"
    PREPAID = "PLATE_TYPE_PREPAID"
    OTHERS = "PLATE_TYPE_OTHERS"


class EntryState(enum.StrEnum):
    """Journal row states (SPEC §6). `rejected` rows were never entries."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    REJECTED = "rejected"


class TimeSource(enum.StrEnum):
    """Where an entry's `enter_timestamp` came from."""

    CAMERA = "camera"
    AGENT = "agent"


class Direction(enum.StrEnum):
    """Which way a car passed, when the camera says so (SPEC §10: two-way lanes, 同进同出)."""

    IN = "in"
    OUT = "out"


class MatchMode(enum.StrEnum):
    """`[sessions] match` (SPEC §3, §10): the same plate only, or also one confusable character."""

    EXACT = "exact"
    CONFUSABLE = "confusable"


class ReentryMode(enum.StrEnum):
    """`[sessions] reentry` (SPEC §3, §10): what an entry does to an open session of the same plate."""

    CLOSE_PREVIOUS = "close_previous"
    KEEP = "keep"


class Reason(enum.StrEnum):
    """Why a read did not become an entry. Stable names: they appear in `events` and in tests."""

    TOO_LARGE = "payload_too_large"
    NOT_UTF8 = "not_utf8"
    MALFORMED = "malformed_payload"
    BAD_FIELD = "bad_field"
    NO_PLATE = "no_plate"
    INVALID_PLATE = "invalid_plate"
    LOW_CONFIDENCE = "low_confidence"
    UNKNOWN_CAMERA = "unknown_camera"
    UNMAPPED_LANE = "unmapped_lane"
    NO_DIRECTION = "no_direction"  # a two-way source's read that does not say which way (SPEC §10)
    TIME_IN_FUTURE = "time_in_future"  # no longer produced (issue 9: the agent's time is used); old rows keep it
    REPEAT = "repeat"


@dataclass(frozen=True, slots=True)
class PlateRead:
    """One plate read as a decoder understood it, before routing and screening.

    `plate` is the camera's text (not yet normalised); `None` or "" means the camera saw no plate.
    `captured_at` is Unix seconds (UTC) from the camera's clock, `None` when it gave none.
    `confidence` is already normalised to 0..1. `record_id` is the vendor's id of this record,
    which makes redeliveries and offline re-sends idempotent. `is_replay` marks offline re-sends.
    `direction` is the way the car passed as the camera reported it, `None` when it did not say.
    """

    plate: str | None
    color: PlateColor | None = None
    vehicle_type: VehicleType | None = None
    captured_at: float | None = None
    lane: str | None = None
    confidence: float | None = None
    record_id: str | None = None
    is_replay: bool = False
    direction: Direction | None = None


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message that is not a plate read at all (heartbeat, lane event): acknowledged, not kept."""

    why: str


@dataclass(frozen=True, slots=True)
class Entry:
    """A vehicle entry ready to be journaled; `out_serial_number` is minted by the journal."""

    camera: str
    lane: str | None
    dedup_key: str
    plate_number: str
    plate_color: PlateColor
    vehicle_type: VehicleType
    car_type: CarType
    enter_timestamp: int
    time_source: TimeSource
    clock_synced: bool
    entrance_number: str
    entrance_name: str
    parking_id: str
    discount_template_id: tuple[int, ...] = ()
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class ExitRead:
    """An exit read ready to be journaled (SPEC §10): the plate as read, and where and when.

    It becomes an exit request once it is matched to a session; the request then carries the
    session's plate, colour and number, while this read stays in the journal as evidence.
    """

    camera: str
    lane: str | None
    dedup_key: str
    plate_number: str  # as read, normalised
    plate_color: PlateColor  # as read
    read_at: int  # Unix seconds, on the clock `time_source` names
    time_source: TimeSource
    clock_synced: bool
    exit_number: str
    exit_name: str
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """A read that did not become an entry, kept with its reason for inspection (SPEC §6)."""

    camera: str | None
    lane: str | None
    dedup_key: str
    reason: Reason
    detail: str
    plate_number: str | None = None
    repeat_of: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


REJECTED_PAYLOAD_CAP = 4096  # bytes of a rejected payload kept for inspection (SPEC §6 "capped in size")


@dataclass(frozen=True, slots=True)
class Inbound:
    """What the journal keeps about the message a record came from."""

    topic: str
    received_at: float
    payload_sha256: str
    payload_size: int
    payload_excerpt: bytes  # already redacted and capped; stored for rejected rows only
    received_mono: float | None = None  # time.monotonic() at receipt, meaningful within `boot_id` only
