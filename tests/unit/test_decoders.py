"""Golden decoder cases: every directory under tests/data/decoders/<format>/<case>/ is one test.

A case holds `payload.json` (or `payload.xml` / `payload.bin`, read as raw bytes), an optional
`topic.txt`, and `expected.json`: the PlateRead fields (omitted ones take PlateRead's defaults),
`{"ignored": true}`, or `{"error": {"reason": "<Reason value>", "field": "<dotted path or null>"}}`.
The directory name says what the case proves (STYLE §11).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from edgeagent.decoders import KNOWN_FORMATS, REGISTRY, decode
from edgeagent.errors import DecodeError
from edgeagent.model import Direction, Ignored, PlateColor, PlateRead, VehicleType

DATA = Path(__file__).resolve().parent.parent / "data" / "decoders"
PAYLOAD_NAMES = ("payload.json", "payload.xml", "payload.bin")
READ_FIELDS = {f.name for f in dataclasses.fields(PlateRead)}


def _cases() -> list[Path]:
    return sorted(path.parent for path in DATA.glob("*/*/expected.json"))


def _payload(case: Path) -> bytes:
    found = [case / name for name in PAYLOAD_NAMES if (case / name).exists()]
    assert len(found) == 1, f"{case}: expected exactly one of {PAYLOAD_NAMES}"
    return found[0].read_bytes()


def _topic(case: Path) -> str:
    topic_file = case / "topic.txt"
    return topic_file.read_text("utf-8").strip() if topic_file.exists() else f"test/{case.parent.name}"


def _expected_read(expected: dict[str, Any]) -> PlateRead:
    unknown = set(expected) - READ_FIELDS
    assert not unknown, f"expected.json has keys that are not PlateRead fields: {sorted(unknown)}"
    values = dict(expected)
    if values.get("color") is not None:
        values["color"] = PlateColor(values["color"])
    if values.get("vehicle_type") is not None:
        values["vehicle_type"] = VehicleType(values["vehicle_type"])
    if values.get("direction") is not None:
        values["direction"] = Direction(values["direction"])
    return PlateRead(**values)


@pytest.mark.parametrize("case", _cases(), ids=lambda case: f"{case.parent.name}/{case.name}")
def test_golden_case(case: Path) -> None:
    fmt = case.parent.name
    assert fmt in REGISTRY, f"{case}: no decoder registered for format {fmt!r}"
    expected = json.loads((case / "expected.json").read_text("utf-8"))
    payload, topic = _payload(case), _topic(case)

    if "error" in expected:
        with pytest.raises(DecodeError) as caught:
            decode(fmt, topic, payload)
        assert caught.value.reason.value == expected["error"]["reason"], caught.value
        assert caught.value.field == expected["error"].get("field"), caught.value
        return

    result = decode(fmt, topic, payload)
    if expected.get("ignored"):
        assert isinstance(result, Ignored), result
        assert result.why, "an Ignored result must say why"
        return

    assert isinstance(result, PlateRead), result
    want = _expected_read(expected)
    for name in READ_FIELDS:
        got_value, want_value = getattr(result, name), getattr(want, name)
        if isinstance(want_value, float) and not isinstance(want_value, bool):
            assert got_value == pytest.approx(want_value, abs=1e-6), name
        else:
            assert got_value == want_value, name


def test_every_registered_format_has_golden_cases() -> None:
    formats_with_cases = {case.parent.name for case in _cases()}
    assert set(REGISTRY) <= formats_with_cases
    assert set(REGISTRY) <= set(KNOWN_FORMATS)
