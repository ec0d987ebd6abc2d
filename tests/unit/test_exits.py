"""ExitRules (SPEC §10): which plates an exit read looks up, and the exit body built from the session."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeagent.exits import ExitRules
from edgeagent.model import CarType, MatchMode, PlateColor, ReentryMode, VehicleType
from edgeagent.requests import EntryRequest, build_entry_body, parse_exit_body
from edgeagent.sessions import CONFUSABLE_GROUPS, PROVINCES, MatchKind, one_difference

T = 1_720_078_200


def rules(mode: MatchMode = MatchMode.CONFUSABLE) -> ExitRules:
    return ExitRules(mode, ReentryMode.CLOSE_PREVIOUS, exit_hold_s=30, repeat_window_s=120)


def differences(a: str, b: str) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Session:
    """An open session as the journal hands it to ExitRules (exits.SessionLike)."""

    out_serial_number: str
    plate_number: str
    plate_color: str
    enter_timestamp: int
    body: bytes


def session(plate: str = "粤B0D123", color: PlateColor = PlateColor.BLUE, serial: str = "T1ABC0000000007") -> Session:
    entry = EntryRequest(
        out_serial_number=serial,
        parking_id="WXPARK001",
        plate_number=plate,
        enter_timestamp=T,
        plate_color=color,
        car_type=CarType.TEMPORARY,
        vehicle_type=VehicleType.SMALL,
        entrance_number="A01",
        entrance_name="南门入口",
    )
    return Session(serial, plate, color.value, T, build_entry_body(entry))


def test_exact_mode_looks_up_the_plate_only() -> None:
    assert rules(MatchMode.EXACT).lookup_plates("粤B0D123") == ["粤B0D123"]


def test_confusable_mode_looks_up_each_one_character_variant_including_provinces() -> None:
    found = rules().lookup_plates("粤B0D123")
    assert found[0] == "粤B0D123"
    assert "粤BDD123" in found and "粤BQD123" in found  # 0 → D, Q
    assert "粤B00123" in found and "粤B0Q123" in found  # D → 0, Q
    assert "粤B0D1Z3" in found and "粤B0DI23" in found and "粤B0D723" in found  # 2 → Z, 1 → I / 7
    assert "粤80D123" in found  # B → 8
    assert {p[0] for p in found} == PROVINCES  # every other province at position 0, and only there
    assert all(p[0] == "粤" for p in found if p[1:] != "B0D123")
    assert len(found) == len(set(found))


@given(st.text(alphabet="京粤苏ABDQ0123456789SZGIB", min_size=7, max_size=8))
def test_every_variant_is_one_confusable_or_province_change_never_two(plate: str) -> None:
    found = rules().lookup_plates(plate)
    assert found[0] == plate
    for variant in found[1:]:
        assert len(variant) == len(plate) and differences(plate, variant) == 1
        assert one_difference(plate, variant) is not None, variant  # the matcher agrees it may fit


def test_a_variant_for_every_confusable_pair() -> None:
    for group in CONFUSABLE_GROUPS:
        for a in group:
            found = set(rules().lookup_plates(f"京A12{a}45"))
            assert {f"京A12{b}45" for b in group} <= found, (a, group)


def test_the_lookup_covers_what_matching_accepts() -> None:
    """Every session the pure matcher would fit is among the plates the journal looks up."""
    read = "粤BDD123"
    candidates = [session(p, serial=f"S{i}") for i, p in enumerate(["粤B0D123", "京BDD123", "粤BDD12Z", "粤B0D12Z"])]
    looked_up = set(rules().lookup_plates(read))
    for s in candidates:
        m = rules().match(read, T + 10, [s])
        assert (m.kind in (MatchKind.EXACT, MatchKind.FUZZY)) == (s.plate_number in looked_up), s.plate_number


def test_the_exit_body_is_the_sessions_number_plate_colour_and_parking_id() -> None:
    s = session("粤B0D123", PlateColor.GREEN)
    body = rules().body(s, T + 3600)
    req = parse_exit_body(body)  # as strictly as the API reads it
    assert req.out_serial_number == "T1ABC0000000007"
    assert (req.plate_number, req.plate_color, req.parking_id) == ("粤B0D123", PlateColor.GREEN, "WXPARK001")
    assert req.exit_timestamp == T + 3600
    assert b" " not in body  # compact JSON, the bytes that are signed


def test_the_exit_body_never_carries_the_plate_as_read() -> None:
    """A fuzzy exit read (粤BDD123) goes out under the plate WeChat knows from the entry."""
    s = session("粤B0D123")
    m = rules().match("粤BDD123", T + 60, [s])
    assert m.kind is MatchKind.FUZZY and m.session is s
    assert parse_exit_body(rules().body(s, T + 60)).plate_number == "粤B0D123"


def test_the_exit_body_refuses_a_broken_entry_body() -> None:
    broken = Session("T1X", "粤B0D123", "PLATE_COLOR_BLUE", T, b'{"out_serial_number":"T1X"}')
    with pytest.raises(ValueError):
        rules().body(broken, T + 1)
