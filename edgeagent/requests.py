"""The kinds of request edgeagent makes to the WeChat Pay parking API, as data (DESIGN "One outbox").

One row per kind in `KINDS`: method, path, the answer that counts, which body fields come from the
configuration, and a pure builder/parser pair for the body. The journal, the delivery loop, the
policy, the sandbox and `events` handle every kind through this table; adding a kind is a row, a
builder, a sandbox route and tests. Section numbers `§n` refer to shared/reference/wechatpay-api.md.

Pure: no I/O, no clock. Builders validate every field the way the API would (§9 checklist) and
raise `BodyError` naming the field; parsers read a body as strictly as the API does, so the
sandbox and the tests share the same rules.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from edgeagent.config import EntranceConfig
from edgeagent.model import CarType, Entry, PlateColor, VehicleType

ENTRY_PATH = "/v3/parking/reminders/entry"
EXIT_PATH = "/v3/parking/reminders/exit"
PARKING_LOT_PATH = "/v3/parking/reminders/parking-lot"

_ENTRANCE_NUMBER = re.compile(r"[A-Za-z0-9]{1,128}")
_E = TypeVar("_E", bound=enum.StrEnum)


class Kind(enum.StrEnum):
    """The requests the agent makes; stored with each journal row (`events --json` `kind`)."""

    ENTRY = "entry"
    EXIT = "exit"
    PARKING_LOT = "parking_lot"


class Expect(enum.StrEnum):
    """The answer that counts as success for a kind (SPEC §5): anything else is a failed attempt."""

    SERIAL_NUMBER = "200 with serial_number"  # entry: 200 {"serial_number": "…"}
    EMPTY = "204 with an empty body"  # exit: 204, signed over the empty body
    DOCUMENT = "200 with a JSON document"  # queries: 200 {…}


class BodyError(ValueError):
    """A body field that the API would refuse; `str()` reads "field: problem"."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# -- field rules (§1.2, §1.5) --------------------------------------------------------------------


def text(field: str, value: object, max_len: int) -> str:
    """A non-empty string of at most `max_len` characters AND UTF-8 bytes (SPEC §5).

    Whether the API's `string(N)` counts characters or bytes is unconfirmed (§1.2): checking both
    means a body we send is never refused for its length either way.
    """
    if not isinstance(value, str):
        raise BodyError(field, "must be a string")
    if not value:
        raise BodyError(field, "must not be empty")
    if len(value) > max_len:
        raise BodyError(field, f"longer than {max_len} characters")
    if len(value.encode("utf-8", "surrogatepass")) > max_len:
        raise BodyError(field, f"longer than {max_len} bytes in UTF-8 ({len(value)} characters)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise BodyError(field, "contains a control character")
    if any(ord(c) > 0xFFFF or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise BodyError(field, "contains a character outside the 1-3 byte UTF-8 subset (§2.4)")
    return value


def integer(field: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value < high:  # bool is not an int here
        raise BodyError(field, f"must be an integer in [{low}, {high})")
    return value


def member(field: str, cls: type[_E], value: object) -> _E:
    if isinstance(value, str) and value in cls._value2member_map_:
        return cls(value)
    raise BodyError(field, f"not one of {', '.join(cls)}")


def _timestamp(field: str, value: object) -> int:
    # Unix seconds (§1.2, §1.5 "秒级时间戳"); 10^10 is year 2286, so a millisecond value cannot pass.
    return integer(field, value, 1, 10**10)


def _compact(doc: Mapping[str, object]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    doc: dict[str, object] = {}
    for key, value in pairs:
        if key in doc:
            raise BodyError(key, "appears twice")
        doc[key] = value
    return doc


def _document(body: bytes, fields: tuple[str, ...], required: int) -> dict[str, Any]:
    """A body read as strictly as the API: one JSON object, known fields, the first `required` present."""
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise BodyError("body", "not UTF-8") from None
    except BodyError:
        raise
    except ValueError:
        raise BodyError("body", "not JSON") from None
    if not isinstance(doc, dict):
        raise BodyError("body", "not a JSON object")
    for name in doc:
        if name not in fields:
            raise BodyError(name, "unknown field")
    for name in fields[:required]:
        if name not in doc:
            raise BodyError(name, "required")
    for name in fields[required:]:
        if name in doc and doc[name] in ("", []):  # we never send empty optional fields
            raise BodyError(name, "must not be empty (leave the field out instead)")
    return doc


# -- entry: POST /v3/parking/reminders/entry (§1.2) ----------------------------------------------

ENTRY_FIELDS = (  # §1.2 order; the first seven are required
    "out_serial_number", "parking_id", "plate_number", "enter_timestamp", "plate_color", "car_type",
    "vehicle_type", "entrance_number", "entrance_name", "discount_template_id",
)  # fmt: skip
_ENTRY_ENUMS: tuple[tuple[str, type[enum.StrEnum]], ...] = (
    ("plate_color", PlateColor), ("car_type", CarType), ("vehicle_type", VehicleType),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class EntryRequest:
    """The fields of one entry notification (§1.2). Empty optional fields are left out of the body."""

    out_serial_number: str
    parking_id: str
    plate_number: str
    enter_timestamp: int
    plate_color: PlateColor
    car_type: CarType
    vehicle_type: VehicleType
    entrance_number: str = ""
    entrance_name: str = ""
    discount_template_id: tuple[int, ...] = ()


def _entry_fields(req: EntryRequest) -> dict[str, object]:
    doc: dict[str, object] = {
        "out_serial_number": text("out_serial_number", req.out_serial_number, 64),
        "parking_id": text("parking_id", req.parking_id, 64),
        "plate_number": text("plate_number", req.plate_number, 16),
        "enter_timestamp": _timestamp("enter_timestamp", req.enter_timestamp),
    }
    for name, cls in _ENTRY_ENUMS:
        doc[name] = member(name, cls, getattr(req, name)).value
    if req.entrance_number != "":
        number = text("entrance_number", req.entrance_number, 128)
        if not _ENTRANCE_NUMBER.fullmatch(number):
            raise BodyError("entrance_number", "must be 1-128 letters A-Z, a-z or digits")
        doc["entrance_number"] = number
    if req.entrance_name != "":
        doc["entrance_name"] = text("entrance_name", req.entrance_name, 64)
    ids = req.discount_template_id
    if not isinstance(ids, tuple):
        raise BodyError("discount_template_id", "must be a list of integers")
    if len(ids) > 3:  # maxItems 3 ([OAPI] only, §1.2)
        raise BodyError("discount_template_id", "at most 3 ids")
    if ids:
        doc["discount_template_id"] = [integer("discount_template_id", i, 0, 2**63) for i in ids]
    return doc


def build_entry_body(req: EntryRequest) -> bytes:
    """The exact bytes to sign and send: compact UTF-8 JSON in §1.2 field order (SPEC §5)."""
    return _compact(_entry_fields(req))


def parse_entry_body(body: bytes) -> EntryRequest:
    """Read an entry body as strictly as the API would: the inverse of `build_entry_body`."""
    doc = _document(body, ENTRY_FIELDS, 7)
    ids = doc.get("discount_template_id", [])
    if not isinstance(ids, list):
        raise BodyError("discount_template_id", "must be a list of integers")
    enums = {name: member(name, cls, doc[name]) for name, cls in _ENTRY_ENUMS}
    req = EntryRequest(**{**doc, **enums, "discount_template_id": tuple(ids)})
    _entry_fields(req)  # the same checks as on the way out
    return req


def entry_request(entry: Entry, out_serial_number: str) -> EntryRequest:
    """The request for a journaled entry under its number."""
    return EntryRequest(
        out_serial_number=out_serial_number,
        parking_id=entry.parking_id,
        plate_number=entry.plate_number,
        enter_timestamp=entry.enter_timestamp,
        plate_color=entry.plate_color,
        car_type=entry.car_type,
        vehicle_type=entry.vehicle_type,
        entrance_number=entry.entrance_number,
        entrance_name=entry.entrance_name,
        discount_template_id=entry.discount_template_id,
    )


def entry_body(entry: Entry, out_serial_number: str) -> bytes:
    """The exact request body for `entry`: built once at journaling time and sent on every attempt."""
    return build_entry_body(entry_request(entry, out_serial_number))


def rebuild_entry_body(body: bytes, parking_id: str, entrance: EntranceConfig | None) -> bytes:
    """An entry body with its config-sourced fields taken from the current config (`retry --rebuild`).

    The car's own fields (number, plate, colour, types, time) stay as they were journaled. `entrance`
    is the entrance its camera and lane map to now; None keeps the journaled entrance fields.
    """
    old = parse_entry_body(body)
    if entrance is None:
        return build_entry_body(replace(old, parking_id=parking_id))
    return build_entry_body(
        replace(
            old,
            parking_id=parking_id,
            entrance_number=entrance.number,
            entrance_name=entrance.name,
            discount_template_id=entrance.discount_template_id,
        )
    )


# -- exit: POST /v3/parking/reminders/exit (§1.5) ------------------------------------------------

EXIT_FIELDS = ("out_serial_number", "exit_timestamp", "plate_number", "plate_color", "parking_id")
# The optional payment fields (pay_state, pay_type, …) are left out on purpose: one payment may be
# reported once, through the exit or the payment API, and payments belong to the lot's billing system.


@dataclass(frozen=True, slots=True)
class ExitRequest:
    """An exit notification: the entry's number, plate, colour and parking_id (§1.5, SPEC §10)."""

    out_serial_number: str
    exit_timestamp: int
    plate_number: str
    plate_color: PlateColor
    parking_id: str


def _exit_fields(req: ExitRequest) -> dict[str, object]:
    return {
        "out_serial_number": text("out_serial_number", req.out_serial_number, 64),
        "exit_timestamp": _timestamp("exit_timestamp", req.exit_timestamp),
        "plate_number": text("plate_number", req.plate_number, 16),
        "plate_color": member("plate_color", PlateColor, req.plate_color).value,
        "parking_id": text("parking_id", req.parking_id, 64),
    }


def build_exit_body(req: ExitRequest) -> bytes:
    """The exact bytes of an exit notification, in §1.5 field order."""
    return _compact(_exit_fields(req))


def parse_exit_body(body: bytes) -> ExitRequest:
    """Read an exit body as strictly as the API would: the inverse of `build_exit_body`."""
    doc = _document(body, EXIT_FIELDS, len(EXIT_FIELDS))
    req = ExitRequest(**{**doc, "plate_color": member("plate_color", PlateColor, doc["plate_color"])})
    _exit_fields(req)
    return req


# -- the lot query: GET /v3/parking/reminders/parking-lot (§1.5) --------------------------------

LOT_STATES = ("ENABLED_STATE_UNKNOWN", "ENABLED_STATE_NOT_ENABLED", "ENABLED_STATE_ENABLED", "ENABLED_STATE_OFFLINE")
LOT_ENABLED = "ENABLED_STATE_ENABLED"


def rebuild_exit_body(body: bytes, parking_id: str) -> bytes:
    """An exit body with the current config's parking_id (`retry --rebuild`); the rest is the entry's."""
    return build_exit_body(replace(parse_exit_body(body), parking_id=parking_id))


def parking_lot_target(parking_id: str) -> str:
    """The request target of the lot query for our `parking_id`, percent-encoded as it is sent.

    The signature covers the target exactly as it goes on the wire (§2.1): httpx would encode a
    non-ASCII query itself, and a signature over the unencoded text would not verify.
    """
    text("wx_parking_lot_id", parking_id, 64)
    return f"{PARKING_LOT_PATH}?{urlencode({'wx_parking_lot_id': parking_id}, quote_via=quote)}"


@dataclass(frozen=True, slots=True)
class LotState:
    """What the lot query says about the lot (`status.lot`)."""

    enabled_state: str
    reason: str
    name: str = ""


def parse_lot(doc: Mapping[str, object]) -> LotState:
    """The lot query's answer document; raises BodyError when `enabled_state` is missing or unknown."""
    state = doc.get("enabled_state")
    if state not in LOT_STATES:
        raise BodyError("enabled_state", f"{state!r} is not one of {', '.join(LOT_STATES)}")
    reason = doc.get("reason") if isinstance(doc.get("reason"), str) else ""
    name = doc.get("parking_lot_name") if isinstance(doc.get("parking_lot_name"), str) else ""
    return LotState(str(state), str(reason), str(name))


# -- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One kind of request: how it goes out, what answer counts, and how its body is checked.

    `config_fields` are body fields whose value comes from the configuration rather than from the
    car: a 400 that names one of them is fixed by a config change, not by the request (SPEC §5).
    `parse` reads a body back (the sandbox and `retry --rebuild` use it); None for body-less queries.
    """

    kind: Kind
    method: str
    path: str
    expect: Expect
    config_fields: frozenset[str]
    parse: Callable[[bytes], object] | None
    journaled: bool  # kept in the outbox (entries, exits) or asked on the spot (queries)


KINDS: Mapping[Kind, KindSpec] = {
    Kind.ENTRY: KindSpec(
        Kind.ENTRY,
        "POST",
        ENTRY_PATH,
        Expect.SERIAL_NUMBER,
        frozenset({"parking_id", "entrance_number", "entrance_name", "discount_template_id"}),
        parse_entry_body,
        journaled=True,
    ),
    Kind.EXIT: KindSpec(
        Kind.EXIT, "POST", EXIT_PATH, Expect.EMPTY, frozenset({"parking_id"}), parse_exit_body, journaled=True
    ),
    Kind.PARKING_LOT: KindSpec(
        Kind.PARKING_LOT,
        "GET",
        PARKING_LOT_PATH,
        Expect.DOCUMENT,
        frozenset({"wx_parking_lot_id", "parking_id"}),
        None,
        journaled=False,
    ),
}


def kind_of_path(method: str, path: str) -> KindSpec | None:
    """The kind served at `method path` (the sandbox routes by it)."""
    for spec in KINDS.values():
        if spec.method == method and spec.path == path:
            return spec
    return None
