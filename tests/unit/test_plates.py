"""Plate normalisation, validation and colour / vehicle-type inference (SPEC §4, anpr-formats.md §12)."""

from __future__ import annotations

import pytest

from edgeagent.model import PlateColor, VehicleType
from edgeagent.plates import (
    NO_PLATE_MARKERS,
    PlateClass,
    classify,
    color_from_plate,
    is_new_energy,
    normalise,
    vehicle_type_from_color,
)

# (camera text, expected normalised plate); every row must classify as VALID.
VALID = [
    ("京A00599", "京A00599"),  # ordinary blue
    ("黑D23908", "黑D23908"),
    ("赣GZ7S13", "赣GZ7S13"),  # letters in the serial
    ("鲁VF0050", "鲁VF0050"),  # large yellow
    ("琼E12345", "琼E12345"),  # last of the 31 provinces
    ("湘A1234学", "湘A1234学"),  # each special suffix
    ("京O1234警", "京O1234警"),  # O as issuing code (police)
    ("苏E1234挂", "苏E1234挂"),
    ("沪A1234领", "沪A1234领"),
    ("粤Z1234港", "粤Z1234港"),
    ("粤Z9065澳", "粤Z9065澳"),
    ("浙A1234试", "浙A1234试"),
    ("川A1234超", "川A1234超"),
    ("京AD92035", "京AD92035"),  # small NEV, D
    ("沪AF12345", "沪AF12345"),  # small NEV, F
    ("粤BDA1234", "粤BDA1234"),  # small NEV, letter in 4th position
    ("京AA92035", "京AA92035"),  # small NEV, 2021 extension
    ("苏AK12345", "苏AK12345"),  # small NEV, 2021 extension
    ("甘G23459F", "甘G23459F"),  # large NEV
    ("京A19203D", "京A19203D"),
    ("鲁B12345H", "鲁B12345H"),  # large NEV, 2021 extension
    ("京A1234应急", "京A1234应急"),  # emergency
    ("使014578", "使014578"),  # embassy
    ("使123456", "使123456"),
    ("粤Ｂ１２３４５", "粤B12345"),  # full-width digits and letter
    ("粤ｂ１２３４５", "粤B12345"),  # full-width lower-case
    ("粤b12345", "粤B12345"),  # lower-case
    ("京ad92035", "京AD92035"),
    ("粤B·12345", "粤B12345"),  # middle dot
    ("粤B・12345", "粤B12345"),  # katakana middle dot
    ("粤B•12345", "粤B12345"),  # bullet
    ("粤B-12345", "粤B12345"),  # hyphen
    ("粤B－12345", "粤B12345"),  # full-width hyphen
    (" 粤B 12345 ", "粤B12345"),  # spaces
    ("\t粤B\u300012345\n", "粤B12345"),  # tab, ideographic space, newline
    ("京 A · D92035", "京AD92035"),
]

# Normalised-looking strings that must be INVALID (after normalise too).
INVALID = [
    "京AI1234",  # I in the serial
    "京A1234O",  # O in the serial
    "京AD1I234",  # I in a small-NEV serial
    "京A1234",  # too short
    "京A12",
    "京",
    "京A123456",  # 8 chars, neither NEV layout
    "宁AD1234555555",  # too long
    "京A12345678901234567",  # longer than 16
    "港A12345",  # not a province
    "台A12345",
    "浙苏H6F681",  # two provinces
    "京112345",  # digit in position 2
    "湘22478领",  # consulate layout from §12.2: digit in position 2
    "粤Z123港澳",  # two suffixes
    "京A学1234",  # suffix not in last place
    "京A1234应",  # half of 应急
    "京AD9203X",  # small NEV ends in a letter
    "京A1234XD",  # large NEV with a letter among the five digits
    "使12345",  # embassy: too few digits
    "使1234567",  # embassy: too many digits
    "使A12345",
    "123456使",  # trailing 使 not accepted
    "WJ京1234J",  # 武警: unconfirmed layout
    "BA12345",  # military: unconfirmed layout
    "ABC';DROPTABLEX;",  # injection text after normalise
    "粤B1234🚗",  # 4-byte UTF-8 character
    "粤B𠀀1234",  # 4-byte CJK extension B
    "???",
    "\x00",
    "粤B_12345",  # "_" is not a separator
    "粤B.12345",
    "粤B١٢٣٤٥",  # Arabic-Indic digits survive NFKC and are not [0-9]
]

# Raw camera text for "no plate", with spacing and full-width variants.
NO_PLATE_RAW = [
    "",
    "   ",
    "\u3000",
    "·",
    "无",
    "无牌",
    "无牌车",
    " 无牌车 ",
    "无车牌",
    "车牌",
    "_无_",
    " _无_\t",
    "＿无＿",
    "noPlate",
    "NOPLATE",
    "ｎｏＰｌａｔｅ",
    "unknown",
    " Unknown ",
    "null",
    "ＮＵＬＬ",
    "Characters Not Found",
]


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_valid_plates_normalise_and_classify(raw: str, expected: str) -> None:
    plate = normalise(raw)
    assert plate == expected
    assert classify(plate) is PlateClass.VALID


@pytest.mark.parametrize("plate", INVALID)
def test_invalid_plates(plate: str) -> None:
    assert classify(plate) is PlateClass.INVALID
    assert classify(normalise(plate)) is PlateClass.INVALID


def test_injection_string_is_invalid_end_to_end() -> None:
    raw = "ABC'; DROP TABLE x;--"
    assert normalise(raw) == "ABC';DROPTABLEX;"
    assert classify(normalise(raw)) is PlateClass.INVALID


@pytest.mark.parametrize("plate", ["粤B12345\n", "粤b12345", "粤B 12345", "粤Ｂ12345"])
def test_classify_does_not_normalise(plate: str) -> None:
    # classify takes normalised text; a trailing newline must not slip through a `$` anchor.
    assert classify(plate) is PlateClass.INVALID


def test_empty_string_is_no_plate() -> None:
    assert classify("") is PlateClass.NO_PLATE


@pytest.mark.parametrize("raw", NO_PLATE_RAW)
def test_no_plate_reads(raw: str) -> None:
    assert classify(normalise(raw)) is PlateClass.NO_PLATE


@pytest.mark.parametrize("marker", sorted(NO_PLATE_MARKERS))
def test_markers_are_stored_normalised(marker: str) -> None:
    assert normalise(marker) == marker
    assert classify(marker) is PlateClass.NO_PLATE


def test_underscore_marker_survives_normalise() -> None:
    assert normalise("_无_") == "_无_"


@pytest.mark.parametrize("raw", [raw for raw, _ in VALID] + INVALID + NO_PLATE_RAW)
def test_normalise_is_idempotent(raw: str) -> None:
    once = normalise(raw)
    assert normalise(once) == once


@pytest.mark.parametrize(
    ("plate", "expected"),
    [
        ("京AD92035", True),
        ("京AA92035", True),
        ("粤BDA1234", True),
        ("甘G23459F", True),
        ("鲁B12345K", True),
        ("京A00599", False),  # 7 chars
        ("粤Z9065澳", False),
        ("京A1234应急", False),  # 8 chars, not NEV
        ("使014578", False),
        ("京A123456", False),  # 8 chars, invalid
        ("京AI92035", False),  # 8 chars, I as NEV letter
        ("港AD92035", False),  # NEV layout, not a province
        ("", False),
    ],
)
def test_is_new_energy(plate: str, expected: bool) -> None:
    assert is_new_energy(plate) is expected


@pytest.mark.parametrize(
    ("plate", "expected"),
    [
        ("京AD92035", PlateColor.GREEN),  # small NEV
        ("甘G23459F", PlateColor.GREEN),  # large NEV: green per SPEC §4
        ("京AA92035", PlateColor.GREEN),
        ("京A00599", None),  # 7 chars
        ("湘A1234学", None),
        ("京A1234应急", None),  # 8 chars but not NEV
        ("京A123456", None),  # 8 chars, invalid
        ("_无_", None),
        ("", None),
    ],
)
def test_color_from_plate(plate: str, expected: PlateColor | None) -> None:
    assert color_from_plate(plate) is expected


VEHICLE_TYPE_BY_COLOR: dict[PlateColor, VehicleType | None] = {
    PlateColor.UNKNOWN: None,
    PlateColor.BLUE: VehicleType.SMALL,
    PlateColor.YELLOW: VehicleType.LARGE,
    PlateColor.BLACK: None,
    PlateColor.WHITE: None,
    PlateColor.GREEN: VehicleType.SMALL,
    PlateColor.YELLOW_GREEN: VehicleType.LARGE,
    PlateColor.AGRICULTURAL_YELLOW: None,
    PlateColor.OTHER: None,
}


def test_vehicle_type_table_covers_every_color() -> None:
    assert set(VEHICLE_TYPE_BY_COLOR) == set(PlateColor)


@pytest.mark.parametrize(("color", "expected"), list(VEHICLE_TYPE_BY_COLOR.items()))
def test_vehicle_type_from_color(color: PlateColor, expected: VehicleType | None) -> None:
    assert vehicle_type_from_color(color) is expected


def test_vehicle_type_from_no_color() -> None:
    assert vehicle_type_from_color(None) is None
