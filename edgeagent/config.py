"""Configuration: one TOML file (SPEC §3) parsed once into frozen, typed values.

Every problem is collected, not just the first, and each is one line `file: key.path: problem (hint)`.
Unknown keys are errors: a typo must not silently fall back to a default. Derived lookups (routes,
car-type lists) are compiled by their owners from these values at load time.

The only I/O here is reading the file and checking that referenced files exist; key files are
never opened here (the daemon reads the merchant key exactly once).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from edgeagent.decoders import KNOWN_FORMATS, REPORTS_DIRECTION
from edgeagent.errors import ConfigError
from edgeagent.model import CarType, MatchMode, ReentryMode, VehicleType

DEFAULT_PATH = Path("/etc/edgeagent/edgeagent.toml")
ENTRANCE_NUMBER_RE = re.compile(r"[A-Za-z0-9]{1,128}")
SERIAL_PREFIX_RE = re.compile(r"[A-Za-z0-9]{1,12}")
TIMESTAMP_SOURCES = ("camera", "agent", "auto")
TimestampSource = Literal["camera", "agent", "auto"]
Format = Literal["generic", "vzenith", "qianyi", "hikvision", "frigate"]  # decoders.FORMATS, as a type
PRIMARY_BASE_URL = "https://api.mch.weixin.qq.com"
BACKUP_BASE_URL = "https://api2.mch.weixin.qq.com"
# Permission bits a secret file must not have (issue 12): a private key only its owner reads; a
# password no one but owner and group (systemd's LoadCredential= copies are 0400 anyway).
KEY_MODES = 0o077
PASSWORD_MODES = 0o007


@dataclass(frozen=True, slots=True)
class WeChatPayConfig:
    mchid: str
    merchant_serial_no: str
    merchant_private_key: Path
    platform_public_key: Path | None
    platform_public_key_id: str
    apiv3_key_file: Path | None
    base_url: str
    backup_base_url: str
    ca_file: Path | None
    timeout_s: float
    max_in_flight: int
    max_rate_per_s: float


@dataclass(frozen=True, slots=True)
class ParkingConfig:
    parking_id: str
    repeat_window_s: float
    min_confidence: float
    max_entry_age_s: float
    timestamp_source: TimestampSource
    default_car_type: CarType
    car_type_lists: tuple[tuple[CarType, Path], ...]


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str
    port: int
    client_id: str
    username: str
    password_file: Path | None
    tls: bool
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    status_topic: str
    keepalive_s: int
    max_payload_bytes: int


@dataclass(frozen=True, slots=True)
class CameraConfig:
    id: str
    topic: str
    format: Format
    min_confidence: float | None


@dataclass(frozen=True, slots=True)
class EntranceConfig:
    number: str
    name: str
    sources: tuple[str, ...]
    vehicle_type: VehicleType | None
    discount_template_id: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ExitConfig:
    """`[[exits]]` (SPEC §3, §10). The number is local only: the exit API has no exit field."""

    number: str
    name: str
    sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    """`[sessions]` (SPEC §3, §10): how exit reads find their session."""

    match: MatchMode = MatchMode.CONFUSABLE
    exit_hold_s: float = 30.0
    reentry: ReentryMode = ReentryMode.CLOSE_PREVIOUS


@dataclass(frozen=True, slots=True)
class LotConfig:
    """`[lot]` (SPEC §3, §11): the MQTT topic the lot's boxes share sessions under; "" = off."""

    topic: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    state_dir: Path
    serial_prefix: str
    wechatpay: WeChatPayConfig
    parking: ParkingConfig
    mqtt: MqttConfig
    cameras: tuple[CameraConfig, ...]
    entrances: tuple[EntranceConfig, ...]
    exits: tuple[ExitConfig, ...] = ()
    sessions: SessionsConfig = SessionsConfig()
    lot: LotConfig = LotConfig()

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite3"

    def camera(self, camera_id: str) -> CameraConfig | None:
        return next((c for c in self.cameras if c.id == camera_id), None)


class _Missing:
    """Marks a required key."""


REQUIRED = _Missing()
T = TypeVar("T")


class _Table:
    """Reads one TOML table, recording problems with their key path instead of raising."""

    def __init__(
        self, data: Mapping[str, Any], path: str, problems: list[str], label: str, base: Path, check_files: bool = True
    ):
        self.check_files = check_files
        self.data = data
        self.path = path
        self.problems = problems
        self.label = label
        self.base = base
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{self.label}: {key}: {text}")

    def get(self, name: str, kind: type[T], default: T | _Missing, check: Callable[[T], str | None] | None = None) -> T:
        """Return the value of `name` checked against `kind`; on a problem record it and return a stand-in."""
        self.seen.add(name)
        if name not in self.data:
            if isinstance(default, _Missing):
                self.problem(self.key(name), "required key is missing")
                return _stand_in(kind)
            return default
        value = self.data[name]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            self.problem(self.key(name), f"expected {_kind_name(kind)}, got {_kind_name(type(value))} {value!r}")
            return default if not isinstance(default, _Missing) else _stand_in(kind)
        if check is not None:
            text = check(value)
            if text:
                self.problem(self.key(name), text)
        return value  # type: ignore[no-any-return]

    def path_value(
        self, name: str, default: str | _Missing, *, must_exist: bool = True, forbid: int = 0
    ) -> Path | None:
        """A file path: `$VARS` expanded, relative to the config file, checked to exist when set.

        `forbid` is a mask of permission bits a secret must not have (issue 12): KEY_MODES for a private
        key (its group or others may read it), PASSWORD_MODES for a password (others may read it).
        """
        raw = self.get(name, str, default)
        if not raw:
            return None
        # An unset or empty variable would silently turn "$CREDENTIALS_DIRECTORY/key.pem" into "/key.pem".
        for var in re.findall(r"\$\{?(\w+)", raw):
            if not os.environ.get(var) and not self.check_files:
                return Path(raw)  # status/events at a shell: systemd's variables are not set there
            if not os.environ.get(var):
                hint = " (systemd sets it for LoadCredential=)" if var == "CREDENTIALS_DIRECTORY" else ""
                self.problem(self.key(name), f"environment variable ${var} is not set{hint}")
                return None
        path = Path(os.path.expandvars(raw))
        if not path.is_absolute():
            path = self.base / path
        if must_exist and self.check_files:
            if not path.exists():
                self.problem(self.key(name), f"file not found: {path}")
            elif not path.is_file():
                self.problem(self.key(name), f"not a regular file: {path}")
            elif not os.access(path, os.R_OK):
                self.problem(self.key(name), f"file not readable by this user: {path}")
            elif (mode := stat.S_IMODE(path.stat().st_mode)) & forbid:
                who = "its group or others" if mode & forbid & 0o070 else "others"
                self.problem(
                    self.key(name),
                    f"{path} is readable by {who} (mode {mode:04o}): chmod 600 it, and pass it to the service "
                    "with LoadCredential= (docs/deploy.md)",
                )
        return path

    def table(self, name: str, *, required: bool = False) -> _Table:
        self.seen.add(name)
        value = self.data.get(name)
        if value is None:
            if required:
                self.problem(self.key(name), "required table is missing")
            value = {}
        elif not isinstance(value, dict):
            self.problem(self.key(name), f"expected a table, got {_kind_name(type(value))}")
            value = {}
        return _Table(value, self.key(name), self.problems, self.label, self.base, self.check_files)

    def done(self) -> None:
        for name in self.data:
            if name not in self.seen:
                self.problem(self.key(name), "unknown key (check the spelling; see deploy/edgeagent.toml.example)")


def _kind_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "an array",
        dict: "a table",
    }.get(kind, kind.__name__)


def _stand_in(kind: type[T]) -> T:
    return kind()


def _in_range(low: float, high: float | None = None) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        if value < low or (high is not None and value > high):
            return f"must be between {low:g} and {high:g}" if high is not None else f"must be ≥ {low:g}"
        return None

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"unknown value {value!r} (known: {', '.join(choices)})"

    return check


def _enum_value(table: _Table, name: str, enum: type[CarType] | type[VehicleType], default: str) -> str:
    """A key holding one of `enum`'s values ("" allowed when `default` is ""); a bad value gives `default`."""
    names = tuple(member.value for member in enum)
    value = table.get(name, str, default)
    if value == default or value in names:
        return value
    table.problem(table.key(name), f"unknown value {value!r} (known: {', '.join(names)})")
    return default


def _url(value: str) -> str | None:
    if value and not re.fullmatch(r"https://[^\s/]+(:\d+)?/?", value):
        return f"must be an https:// URL with no path, got {value!r} (TLS is always verified)"
    return None


def _nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _parse_wechatpay(t: _Table) -> WeChatPayConfig:
    key_path = t.path_value("merchant_private_key", REQUIRED, forbid=KEY_MODES)
    pub = t.path_value("platform_public_key", "")
    apiv3 = t.path_value("apiv3_key_file", "", forbid=PASSWORD_MODES)
    pub_id = t.get("platform_public_key_id", str, "")
    if pub is None and apiv3 is None and "platform_public_key" not in t.data and "apiv3_key_file" not in t.data:
        t.problem(
            t.key("platform_public_key"),
            "set platform_public_key and platform_public_key_id (WeChat Pay public key), "
            "or apiv3_key_file (platform certificates)",
        )
    if pub is not None and not pub_id:
        t.problem(t.key("platform_public_key_id"), "required with platform_public_key (e.g. PUB_KEY_ID_0119…)")
    return WeChatPayConfig(
        mchid=t.get("mchid", str, REQUIRED, lambda v: None if re.fullmatch(r"\d{6,32}", v) else "must be digits"),
        merchant_serial_no=t.get(
            "merchant_serial_no",
            str,
            REQUIRED,
            lambda v: None if re.fullmatch(r"[0-9A-Fa-f]{8,64}", v) else "must be a hex serial",
        ),
        merchant_private_key=key_path or Path(),
        platform_public_key=pub,
        platform_public_key_id=pub_id,
        apiv3_key_file=apiv3,
        base_url=(base_url := t.get("base_url", str, PRIMARY_BASE_URL, _url).rstrip("/")),
        # The backup domain is the official primary's sibling (wechatpay-api.md §5): the default only
        # when base_url is the official one, never behind a sandbox or a private gateway.
        backup_base_url=t.get(
            "backup_base_url", str, BACKUP_BASE_URL if base_url == PRIMARY_BASE_URL else "", _url
        ).rstrip("/"),
        ca_file=t.path_value("ca_file", ""),
        timeout_s=t.get("timeout_s", float, 10.0, _in_range(0.1, 300)),
        max_in_flight=t.get("max_in_flight", int, 4, _in_range(1, 64)),
        max_rate_per_s=t.get("max_rate_per_s", float, 10.0, _in_range(0.01, 1000)),
    )


def _parse_parking(t: _Table) -> ParkingConfig:
    lists_table = t.table("car_type_lists")
    lists: list[tuple[CarType, Path]] = []
    for name in list(lists_table.data):
        check = _one_of(tuple(m.value for m in CarType))
        if (text := check(name)) is not None:
            lists_table.problem(lists_table.key(name), text)
            lists_table.seen.add(name)
            continue
        path = lists_table.path_value(name, "")
        if path is not None:
            lists.append((CarType(name), path))
    lists_table.done()
    return ParkingConfig(
        parking_id=t.get(
            "parking_id", str, REQUIRED, lambda v: None if 1 <= len(v) <= 64 else "must be 1-64 characters"
        ),
        repeat_window_s=t.get("repeat_window_s", float, 120.0, _in_range(0, 86400)),
        min_confidence=t.get("min_confidence", float, 0.0, _in_range(0, 1)),
        max_entry_age_s=t.get("max_entry_age_s", float, 604800.0, _in_range(60)),
        timestamp_source=cast(TimestampSource, t.get("timestamp_source", str, "auto", _one_of(TIMESTAMP_SOURCES))),
        default_car_type=CarType(_enum_value(t, "default_car_type", CarType, CarType.TEMPORARY.value)),
        car_type_lists=tuple(lists),
    )


def _parse_mqtt(t: _Table, serial_prefix: str) -> MqttConfig:
    client_id = t.get(
        "client_id",
        str,
        f"edgeagent-{serial_prefix.lower()}",
        lambda v: (
            None
            if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v)
            else "must be 1-64 of A-Z a-z 0-9 . _ - (a fixed id keeps our broker session)"
        ),
    )
    tls = t.get("tls", bool, False)
    return MqttConfig(
        host=t.get("host", str, "127.0.0.1", _nonempty),
        port=t.get("port", int, 8883 if tls else 1883, _in_range(1, 65535)),
        client_id=client_id,
        username=t.get("username", str, ""),
        password_file=t.path_value("password_file", "", forbid=PASSWORD_MODES),
        tls=tls,
        ca_file=t.path_value("ca_file", ""),
        cert_file=t.path_value("cert_file", ""),
        key_file=t.path_value("key_file", "", forbid=KEY_MODES),
        status_topic=t.get(
            "status_topic",
            str,
            f"edgeagent/{client_id}/status",
            lambda v: None if v and not set(v) & {"+", "#"} else "must be a topic without wildcards",
        ),
        keepalive_s=t.get("keepalive_s", int, 30, _in_range(5, 3600)),
        max_payload_bytes=t.get("max_payload_bytes", int, 1024 * 1024, _in_range(1024, 16 * 1024 * 1024)),
    )


def _array_of_tables(root: _Table, name: str) -> list[_Table]:
    root.seen.add(name)
    value = root.data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        root.problem(name, f"expected an array of tables ([[{name}]])")
        return []
    return [
        _Table(item, f"{name}[{i}]", root.problems, root.label, root.base, root.check_files)
        for i, item in enumerate(value)
    ]


def _parse_cameras(root: _Table) -> list[CameraConfig]:
    cameras: list[CameraConfig] = []
    seen_ids: dict[str, str] = {}
    seen_topics: dict[str, str] = {}
    tables = _array_of_tables(root, "cameras")
    if not tables:
        root.problem("cameras", "at least one [[cameras]] is required")
    for t in tables:
        cam_id = t.get(
            "id",
            str,
            REQUIRED,
            lambda v: None if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v) else "must be 1-64 of A-Z a-z 0-9 . _ -",
        )
        topic = t.get("topic", str, REQUIRED, _nonempty)
        fmt = t.get(
            "format",
            str,
            "generic",
            lambda v: None if v in KNOWN_FORMATS else f'unknown format "{v}" (known: {", ".join(KNOWN_FORMATS)})',
        )
        min_conf = t.get("min_confidence", float, -1.0, _in_range(0, 1))
        t.done()
        if cam_id in seen_ids:
            t.problem(t.key("id"), f'duplicate camera id "{cam_id}" (also {seen_ids[cam_id]})')
        seen_ids.setdefault(cam_id, t.path)
        if topic in seen_topics:
            t.problem(t.key("topic"), f'topic "{topic}" is already used by {seen_topics[topic]}')
        else:
            # A read is routed to the first camera whose filter matches (issue 12): overlapping
            # filters would silently send one camera's reads to another's entrance.
            for other, where in seen_topics.items():
                if filters_overlap(topic, other):
                    t.problem(
                        t.key("topic"),
                        f'"{topic}" overlaps {where}.topic "{other}": a read on a topic both match would be '
                        "taken for the first camera's (give each camera a filter of its own)",
                    )
        seen_topics.setdefault(topic, t.path)
        cameras.append(CameraConfig(cam_id, topic, cast(Format, fmt), None if min_conf < 0 else min_conf))
    return cameras


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters `a` and `b` (`+` one level, `#` the rest, even none).

    Frigate's two topics of one instance, `<prefix>/tracked_object_update` and `<prefix>/events`,
    are two [[cameras]] that do not overlap: that pair is one source by design (pipeline.record_scope).
    """
    left, right = a.split("/"), b.split("/")
    for x, y in zip(left, right, strict=False):
        if "#" in (x, y):
            return True
        if x != y and "+" not in (x, y):
            return False
    if len(left) == len(right):
        return True
    longer = left if len(left) > len(right) else right
    return longer[min(len(left), len(right))] == "#"  # "a/#" also matches "a"


def _parse_entrances(root: _Table, camera_ids: set[str]) -> list[EntranceConfig]:
    entrances: list[EntranceConfig] = []
    seen_numbers: dict[str, str] = {}
    seen_sources: dict[str, str] = {}
    tables = _array_of_tables(root, "entrances")
    if not tables and not root.data.get("exits"):
        # An exit-only box is fine: in a lot of several boxes its entries are made elsewhere (SPEC §11).
        root.problem("entrances", "at least one [[entrances]] or [[exits]] is required")
    for t in tables:
        number = t.get(
            "number",
            str,
            REQUIRED,
            lambda v: None if ENTRANCE_NUMBER_RE.fullmatch(v) else f"{v!r} must be 1-128 letters and digits (like A01)",
        )
        name = t.get(
            "name",
            str,
            REQUIRED,
            lambda v: None if 1 <= len(v) <= 64 else f"must be 1-64 characters, got {len(v)}",
        )
        sources = t.get("sources", list, REQUIRED)
        vehicle_type = _enum_value(t, "vehicle_type", VehicleType, "")
        discounts = t.get("discount_template_id", list, [])
        t.done()
        if number in seen_numbers:
            t.problem(t.key("number"), f'duplicate entrance number "{number}" (also {seen_numbers[number]})')
        seen_numbers.setdefault(number, t.path)
        if t.data.get("sources") == []:  # not when it was of the wrong type: that is reported already
            t.problem(t.key("sources"), "must name at least one camera")
        clean_sources: list[str] = []
        for i, source in enumerate(sources):
            key = f"{t.key('sources')}[{i}]"
            if not isinstance(source, str) or not re.fullmatch(r"[^:\s]+(:[^:\s]+)?", source):
                t.problem(key, f'expected "camera" or "camera:lane", got {source!r}')
                continue
            if source.split(":", 1)[0] not in camera_ids:
                t.problem(
                    key,
                    f'unknown camera "{source.split(":", 1)[0]}" (known: {", ".join(sorted(camera_ids))})',
                )
            if source in seen_sources:
                t.problem(key, f'"{source}" is already a source of {seen_sources[source]}')
            seen_sources.setdefault(source, t.path)
            clean_sources.append(source)
        if len(discounts) > 3:
            t.problem(t.key("discount_template_id"), f"at most 3 template ids, got {len(discounts)}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in discounts):
            t.problem(t.key("discount_template_id"), "must be an array of non-negative integers")
            discounts = []
        entrances.append(
            EntranceConfig(
                number,
                name,
                tuple(clean_sources),
                VehicleType(vehicle_type) if vehicle_type else None,
                tuple(discounts[:3]),
            )
        )
    return entrances


# -- exits, sessions and the lot (SPEC §3, §10, §11) --------------------------------------------------

SOURCE_RE = re.compile(r"[^:\s]+(:[^:\s]+)?")


def _parse_exits_and_sessions(
    root: _Table, cameras: list[CameraConfig], entrances: list[EntranceConfig]
) -> tuple[list[ExitConfig], SessionsConfig, LotConfig]:
    """`[[exits]]`, `[sessions]` and `[lot]`, then the rule that ties exits to entrances (SPEC §10)."""
    exits = _parse_exits(root, {c.id for c in cameras}, {e.number for e in entrances})
    _check_source_roles(root, {c.id: c.format for c in cameras})
    sessions_table = root.table("sessions")
    sessions = _parse_sessions(sessions_table)
    sessions_table.done()
    lot_table = root.table("lot")
    lot = LotConfig(topic=lot_table.get("topic", str, "", _lot_topic))
    lot_table.done()
    return exits, sessions, lot


def _parse_exits(root: _Table, camera_ids: set[str], entrance_numbers: set[str]) -> list[ExitConfig]:
    exits: list[ExitConfig] = []
    seen_numbers: dict[str, str] = {}
    seen_sources: dict[str, str] = {}
    for t in _array_of_tables(root, "exits"):
        number = t.get(
            "number",
            str,
            REQUIRED,
            lambda v: None if ENTRANCE_NUMBER_RE.fullmatch(v) else f"{v!r} must be 1-128 letters and digits (like X01)",
        )
        name = t.get(
            "name",
            str,
            REQUIRED,
            lambda v: None if 1 <= len(v) <= 64 else f"must be 1-64 characters, got {len(v)}",
        )
        sources = t.get("sources", list, REQUIRED)
        t.done()
        if number in seen_numbers:
            t.problem(t.key("number"), f'duplicate exit number "{number}" (also {seen_numbers[number]})')
        elif number in entrance_numbers:
            # Local only, but `events` and `sessions` show both numbers side by side: one name, one gate.
            t.problem(t.key("number"), f'"{number}" is already an entrance number (give the exit its own, like X01)')
        seen_numbers.setdefault(number, t.path)
        if t.data.get("sources") == []:
            t.problem(t.key("sources"), "must name at least one camera")
        clean_sources: list[str] = []
        for i, source in enumerate(sources):
            key = f"{t.key('sources')}[{i}]"
            if not isinstance(source, str) or not SOURCE_RE.fullmatch(source):
                t.problem(key, f'expected "camera" or "camera:lane", got {source!r}')
                continue
            camera = source.split(":", 1)[0]
            if camera not in camera_ids:
                t.problem(key, f'unknown camera "{camera}" (known: {", ".join(sorted(camera_ids))})')
            if source in seen_sources:
                t.problem(key, f'"{source}" is already a source of {seen_sources[source]}')
            seen_sources.setdefault(source, t.path)
            clean_sources.append(source)
        exits.append(ExitConfig(number, name, tuple(clean_sources)))
    return exits


def _role_sources(root: _Table, name: str, camera_formats: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(source, key path, owner path) of every well-formed source of a known camera in `[[name]]`."""
    found: list[tuple[str, str, str]] = []
    tables = root.data.get(name)
    for i, table in enumerate(tables if isinstance(tables, list) else []):
        sources = table.get("sources") if isinstance(table, dict) else None
        for j, source in enumerate(sources if isinstance(sources, list) else []):
            # Malformed sources and unknown cameras are reported where they are parsed.
            if isinstance(source, str) and SOURCE_RE.fullmatch(source) and source.split(":")[0] in camera_formats:
                found.append((source, f"{name}[{i}].sources[{j}]", f"{name}[{i}]"))
    return found


def _check_source_roles(root: _Table, camera_formats: Mapping[str, str]) -> None:
    """A camera's lanes feed entrances or exits, never both, except a two-way lane (SPEC §10).

    Within one role a lane source wins over the whole camera ("cam:1" and "cam" may both appear), but
    across roles that would make a lane's role depend on which line is more specific, so any overlap
    ("cam" and "cam:1", or the same source) is an error. The one exception is the same source under
    an entrance and an exit, on a camera whose format reports a direction: routing decides by the
    read's direction, and a read without one is rejected `no_direction`.
    """
    entrance_sources = _role_sources(root, "entrances", camera_formats)
    for source, key, _owner in _role_sources(root, "exits", camera_formats):
        camera, _, lane = source.partition(":")
        for other, _other_key, owner in entrance_sources:
            other_camera, _, other_lane = other.partition(":")
            if other_camera != camera or (lane and other_lane and lane != other_lane):
                continue
            fmt = camera_formats[camera]
            if source != other:
                root.problem(
                    key,
                    f'"{source}" overlaps "{other}" of {owner} (a lane feeds an entrance or an exit; '
                    f"list the same source under both only for a two-way lane)",
                )
            elif fmt not in REPORTS_DIRECTION:
                root.problem(
                    key,
                    f'"{source}" is also a source of {owner}, but camera "{camera}" is {fmt}, whose reads do not '
                    f"say in or out (a two-way lane needs one of: {', '.join(sorted(REPORTS_DIRECTION))})",
                )


def _parse_sessions(t: _Table) -> SessionsConfig:
    match = t.get("match", str, MatchMode.CONFUSABLE.value, _one_of(tuple(m.value for m in MatchMode)))
    reentry = t.get("reentry", str, ReentryMode.CLOSE_PREVIOUS.value, _one_of(tuple(m.value for m in ReentryMode)))
    return SessionsConfig(
        match=MatchMode(match) if match in tuple(MatchMode) else MatchMode.CONFUSABLE,
        exit_hold_s=t.get("exit_hold_s", float, 30.0, _in_range(0, 86400)),
        reentry=ReentryMode(reentry) if reentry in tuple(ReentryMode) else ReentryMode.CLOSE_PREVIOUS,
    )


def _lot_topic(value: str) -> str | None:
    """A topic name to publish under (MQTT 3.1.1 §4.7): the agent adds /<out_serial_number>."""
    if not value:
        return None  # off
    if set(value) & {"+", "#"}:
        return f"{value!r} must be a topic name without wildcards (the agent subscribes to <topic>/# itself)"
    # MQTT caps a topic at 65535 bytes; "/<out_serial_number>/exit" adds at most 70 (SPEC §11).
    if "\0" in value or len(value.encode("utf-8")) > 65535 - 70:
        return "must be at most 65465 bytes with no NUL character"
    if value.startswith("$"):
        return f"{value!r} must not start with $ (reserved for the broker, e.g. $SYS)"
    if value.endswith("/"):
        return f"{value!r} must not end with / (the agent adds /<out_serial_number>)"
    return None


def parse(text: str, source: Path, *, check_files: bool = True) -> Config:
    """Parse TOML `text` read from `source` into a `Config`, or raise `ConfigError` with every problem.

    `check_files=False` skips checking that referenced files exist (and that `$VARS` in their paths are
    set): for `status`, `events` and `retry`, which never open them and run outside the service.
    """
    label = str(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{label}: (syntax): {exc}"]) from exc
    problems: list[str] = []
    root = _Table(data, "", problems, label, source.parent, check_files)
    state_dir = root.get("state_dir", str, "/var/lib/edgeagent", _nonempty)
    serial_prefix = root.get(
        "serial_prefix",
        str,
        REQUIRED,
        lambda v: (
            None
            if SERIAL_PREFIX_RE.fullmatch(v)
            else f"{v!r} must be 1-12 letters and digits (unique per agent of one merchant)"
        ),
    )
    wx_table = root.table("wechatpay", required=True)
    wechatpay = _parse_wechatpay(wx_table)
    wx_table.done()
    parking_table = root.table("parking", required=True)
    parking = _parse_parking(parking_table)
    parking_table.done()
    mqtt_table = root.table("mqtt")
    mqtt = _parse_mqtt(mqtt_table, serial_prefix or "agent")
    mqtt_table.done()
    cameras = _parse_cameras(root)
    entrances = _parse_entrances(root, {c.id for c in cameras})
    exits, sessions, lot = _parse_exits_and_sessions(root, cameras, entrances)
    root.done()
    if problems:
        raise ConfigError(problems)
    state_path = Path(os.path.expandvars(state_dir))
    if not state_path.is_absolute():
        state_path = source.parent / state_path
    return Config(
        source,
        state_path,
        serial_prefix,
        wechatpay,
        parking,
        mqtt,
        tuple(cameras),
        tuple(entrances),
        tuple(exits),
        sessions,
        lot,
    )


def warnings(config: Config) -> list[str]:
    """What is valid but unsafe, one line each in the config's error format (issue 12)."""
    found = []
    mqtt = config.mqtt
    if not mqtt.tls and not is_loopback(mqtt.host):
        found.append(
            f"{config.source}: mqtt.host: {mqtt.host!r} is not this box and mqtt.tls is false: the broker "
            "password and every plate read cross the network in clear (set tls = true, or use the lane broker)"
        )
    return found


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine (a broker there needs no TLS: nothing crosses a network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_path(cli_value: str | None) -> Path:
    """`--config PATH`, else `$EDGEAGENT_CONFIG`, else /etc/edgeagent/edgeagent.toml (SPEC §2)."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get("EDGEAGENT_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def load(path: Path, *, check_files: bool = True) -> Config:
    """Read and parse the config file at `path` (see `parse` for `check_files`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: (file): not found (use --config PATH or $EDGEAGENT_CONFIG)"]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: (file): cannot read: {exc}"]) from exc
    return parse(text, path, check_files=check_files)
