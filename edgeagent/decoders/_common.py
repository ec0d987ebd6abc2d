"""What every decoder shares: JSON loading, capture times, typed field access, confidence scales.

Pure, stdlib only. A `DecodeError`'s `field` is the dotted path as the payload spells it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edgeagent.errors import DecodeError
from edgeagent.model import Reason
from edgeagent.plates import NO_PLATE_MARKERS, normalise

# Capture times outside [2000-01-01, 2100-01-01) are a camera with a dead RTC or a unit mix-up, never a
# real entry (anpr-formats.md §13.5). 1e11 s is year 5138, so anything that large must be milliseconds.
_EARLIEST, _LATEST = 946_684_800.0, 4_102_444_800.0
_MILLIS_FROM = 1e11
# A plain decimal number written as text; float() alone would also take "nan", "inf" and "1e3".
_NUMBER_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)


def type_name(value: object) -> str:
    """Name a decoded value's JSON type, for messages like "expected a string, got number"."""
    kinds = ((type(None), "null"), (bool, "boolean"), (int | float, "number"), (str, "string"), (list, "array"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "object")


def bad(field: str, detail: str) -> DecodeError:
    return DecodeError(Reason.BAD_FIELD, detail, field)


def load_json_object(payload: bytes) -> dict[str, Any]:
    """Parse `payload` as one UTF-8 JSON object (else DecodeError NOT_UTF8 or MALFORMED)."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DecodeError(Reason.NOT_UTF8, f"payload is not UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        detail = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise DecodeError(Reason.MALFORMED, detail) from exc
    except RecursionError as exc:  # nesting deeper than the interpreter's stack (issue 12)
        raise DecodeError(Reason.MALFORMED, "JSON nested too deeply") from exc
    except ValueError as exc:  # an integer over Python's 4300-digit conversion limit (issue 12)
        raise DecodeError(Reason.MALFORMED, f"invalid JSON: {str(exc)[:120]}") from exc
    if not isinstance(value, dict):
        raise DecodeError(Reason.MALFORMED, f"expected a JSON object, got {type_name(value)}")
    return value


def parse_time(value: object, field: str, *, numeric_text: bool = False) -> float:
    """Return Unix seconds from Unix s, ms (>= 1e11), ISO 8601 with an offset, or (`numeric_text`) a
    decimal string; anything else, or a time outside 2000..2100, raises BAD_FIELD naming `field`."""
    if isinstance(value, str):
        text = value.strip()
        if numeric_text and _NUMBER_TEXT.fullmatch(text):
            return parse_time(float(text), field)
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as exc:
            raise bad(field, f"not an ISO 8601 time: {text!r}") from exc
        if parsed.utcoffset() is None:
            raise bad(field, f"{text!r} needs a UTC offset (e.g. +08:00 or Z)")
        seconds = parsed.timestamp()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # NaN, infinities and negatives all fail the range check below.
        seconds = value / 1000.0 if value >= _MILLIS_FROM else float(value)
    else:
        raise bad(field, f"expected Unix seconds, milliseconds or ISO 8601, got {type_name(value)}")
    if not _EARLIEST <= seconds < _LATEST:
        raise bad(field, f"time {value!r} is outside 2000-01-01..2100-01-01")
    return seconds


def plate_text(raw: str | None) -> str | None:
    """Return the plate text as read, or None for a no-plate marker (§13.2; see plates.NO_PLATE_MARKERS)."""
    return None if raw is None or normalise(raw) in NO_PLATE_MARKERS else raw


@dataclass(frozen=True, slots=True)
class Fields:
    """A JSON object and its dotted path; typed getters return None for an absent or null field.

    `numeric_text`: decimal strings count as numbers (Hikvision XML/JSON, Qianyi send values as text).
    """

    data: Mapping[str, Any]
    path: str = ""
    numeric_text: bool = False

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _wrong(self, key: str, expected: str) -> DecodeError:
        value = self.data[key]
        return bad(self.name(key), f"expected {expected}, got {type_name(value)} {value!r}"[:200])

    def text(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None or isinstance(value, str):
            return value
        raise self._wrong(key, "a string")

    def child(self, key: str) -> Fields | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, dict):
            raise self._wrong(key, "an object")
        return None if value is None else Fields(value, self.name(key), self.numeric_text)

    def need(self, key: str) -> Fields:
        if (found := self.child(key)) is None:
            raise bad(self.name(key), "missing")
        return found

    def number(self, key: str) -> float | None:
        value = self.data.get(key)
        if self.numeric_text and isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
            return float(value)
        if value is None or (self.numeric_text and value == ""):  # "" is "absent" in all-text JSON
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self._wrong(key, "a number")
        return float(value)

    def integer(self, key: str) -> int | None:
        value = self.number(key)
        if value is not None and not value.is_integer():
            raise self._wrong(key, "a whole number")
        return None if value is None else int(value)

    def ident(self, key: str) -> str | None:
        """Return an id or a lane given as a string or a whole number, as text; "" is absent."""
        value = self.data.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if value is None or isinstance(value, str):
            return (value or "").strip() or None
        raise self._wrong(key, "a string or an integer")

    def time(self, key: str) -> float | None:
        value = self.data.get(key)
        return None if value is None else parse_time(value, self.name(key), numeric_text=self.numeric_text)

    def confidence(self, key: str, full_scale: float) -> float | None:
        """Return a confidence on 0..`full_scale` as 0..1 (§13.3); outside is an error, not clamped."""
        value = self.number(key)
        if value is not None and not 0 <= value <= full_scale:
            raise bad(self.name(key), f"confidence {value:g} is outside 0..{full_scale:g}")
        return None if value is None else value / full_scale
