"""Plate text: normalise a camera's read, classify it, and infer colour and vehicle type (SPEC §4).

Pure code: no I/O, standard library only. The flow a caller follows is

    plate = normalise(read.plate or "")
    kind = classify(plate)           # VALID, NO_PLATE or INVALID
    color = read.color or color_from_plate(plate)
    vtype = ... or vehicle_type_from_color(color)

Plate structure and the regex it is built from are in `reference/anpr-formats.md` §12; where that
proposal and SPEC §4 differ, SPEC §4 wins (it adds the 试/超 suffixes and the 使 prefix).
"""

from __future__ import annotations

import enum
import re
import unicodedata

from edgeagent.model import PlateColor, VehicleType

__all__ = [
    "MAX_PLATE_LENGTH",
    "NO_PLATE_MARKERS",
    "PlateClass",
    "classify",
    "color_from_plate",
    "is_new_energy",
    "normalise",
    "vehicle_type_from_color",
]


class PlateClass(enum.StrEnum):
    """What a normalised plate string is."""

    VALID = "valid"  # ordinary mainland plate, new-energy plate, or an accepted special plate
    NO_PLATE = "no_plate"  # the camera saw no plate
    INVALID = "invalid"  # anything else


# WeChat Pay caps `plate_number` at 16 characters (anpr-formats.md §12.3, [WXP]). Every layout the
# regex accepts is at most 8, so this is a cheap first gate against oversized junk, not a rule of its own.
MAX_PLATE_LENGTH = 16

# Strings cameras send when they saw no plate (anpr-formats.md §13.2), stored in normalised form so a
# lookup after `normalise` is exact: "_无_" Vzenith HTTP, "无牌车" PHP/HuaXia, "noPlate"/"unknown"
# Hikvision schema, literal "车牌" Hikvision (CSDN JSON), "null" Qianyi, "" Vzenith MQTT/HuaXia,
# "Characters Not Found" CodeProject.AI. "无", "无牌", "无车牌" are the short forms of 无牌车.
NO_PLATE_MARKERS: frozenset[str] = frozenset(
    {
        "",
        "_无_",
        "无",
        "无牌",
        "无牌车",
        "无车牌",
        "车牌",
        "NOPLATE",
        "UNKNOWN",
        "NULL",
        "CHARACTERSNOTFOUND",
    }
)

# Separators printed between the issuing code and the serial ("粤B·12345") or typed by integrators.
# NFKC already folds "－" to "-" and "･" to "・"; the other dots and dashes survive NFKC, so list them.
# "_" is deliberately NOT a separator: Vzenith's no-plate marker is "_无_" (§13.2) and no camera in the
# reference emits "_" inside a real plate, so keeping it lets the marker stay recognisable as itself.
_SEPARATORS = frozenset("·•・‧∙⋅-‐–—")

# Only ASCII letters are upper-cased: str.upper() would also rewrite non-Latin text ("ß" → "SS"),
# which must stay visible as the junk it is.
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# One pattern for every accepted layout; the named groups tell `is_new_energy` which layout matched.
# Used with `fullmatch` (never `match` + `$`, which would accept a trailing newline). Character classes
# spell out [0-9] because \d also matches non-ASCII digits that NFKC leaves alone.
_PLATE = re.compile(
    r"""
    (?P<embassy> 使[0-9]{6} )                 # 使馆: 使 + 6 digits, e.g. 使014578 (SPEC §4; §12.2 has
                                              #   the format as UNCONFIRMED, so accept exactly this one)
  | [京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼]   # the 31 provinces (§12.1)
    [A-Z]                                     # issuing code; O allowed: 京O is police (§12.1)
    (?:
        (?P<nev_small>                        # small new-energy, 8 chars (§12.2): 京AD92035
            [DABCEFGHJK]                      #   D/F plus the 2021 extension A B C E / G H J K
            [A-HJ-NP-Z0-9]                    #   letter or digit, never I or O
            [0-9]{4}                          #   last four are digits
        )
      | (?P<nev_large>                        # large new-energy, 8 chars (§12.2): 甘G23459F
            [0-9]{5}
            [DABCEFGHJK]
        )
      | (?P<emergency>                        # 应急救援, 8 chars (§12.2): team code + 4 + 应急
            [A-HJ-NP-Z0-9]{4}
            应急
        )
      | (?P<ordinary>                         # blue / yellow, 7 chars; serial letters exclude I and O
            [A-HJ-NP-Z0-9]{4}
            [A-HJ-NP-Z0-9学警挂领港澳试超]        # a special kind replaces the last character (SPEC §4)
        )
    )
    """,
    re.VERBOSE,
)


def normalise(raw: str) -> str:
    """Return `raw` in the canonical form used for validation, dedup and the journal (SPEC §4).

    Applies NFKC (full-width letters, digits and spaces become ASCII: "粤Ｂ１２３４５" → "粤B12345"),
    removes every whitespace character and the separators "·", "•", "・", "-" and similar dots and
    dashes, and upper-cases ASCII letters. "_" is kept, so "_无_" stays the Vzenith no-plate marker.
    Nothing is rejected here; `classify` decides what the result means.
    """
    folded = unicodedata.normalize("NFKC", raw)
    kept = "".join(ch for ch in folded if not ch.isspace() and ch not in _SEPARATORS)
    return kept.translate(_ASCII_UPPER)


def classify(plate: str) -> PlateClass:
    """Classify an already normalised plate as VALID, NO_PLATE or INVALID (SPEC §4).

    VALID covers ordinary 7-character plates (also with a 学 警 挂 领 港 澳 试 超 suffix), small and
    large 8-character new-energy plates, 8-character 应急 plates and 使 + 6 digits. Everything
    else, including military, 武警 and 民航 layouts the reference could not confirm, is INVALID.
    """
    if plate in NO_PLATE_MARKERS:
        return PlateClass.NO_PLATE
    if len(plate) > MAX_PLATE_LENGTH or _PLATE.fullmatch(plate) is None:
        return PlateClass.INVALID
    return PlateClass.VALID


def is_new_energy(plate: str) -> bool:
    """Return True if the normalised `plate` is a valid 8-character new-energy plate.

    Small layout: province, issuing code, one of D A B C E F G H J K, then a letter or digit and four
    digits. Large layout: province, issuing code, five digits, then one of those letters.
    """
    found = _PLATE.fullmatch(plate)
    return found is not None and (found["nev_small"] is not None or found["nev_large"] is not None)


def color_from_plate(plate: str) -> PlateColor | None:
    """Infer a plate colour from the normalised text, for reads where the camera gave none.

    SPEC §4: an 8-character new-energy plate is GREEN; nothing else is inferred (None).
    """
    # SPEC §4 says green for both NEV layouts, although §12.2 lists large NEV plates as yellow-green;
    # the camera's own colour, when present, is used before this and can say yellow-green.
    return PlateColor.GREEN if is_new_energy(plate) else None


_VEHICLE_TYPE_BY_COLOR: dict[PlateColor, VehicleType] = {
    PlateColor.YELLOW: VehicleType.LARGE,
    PlateColor.YELLOW_GREEN: VehicleType.LARGE,
    PlateColor.BLUE: VehicleType.SMALL,
    PlateColor.GREEN: VehicleType.SMALL,
}


def vehicle_type_from_color(color: PlateColor | None) -> VehicleType | None:
    """Map a plate colour to a vehicle type: yellow and yellow-green are LARGE, blue and green SMALL.

    Any other colour, or None, gives None so the caller falls back to VEHICLE_TYPE_UNKNOWN (SPEC §4).
    """
    # Agricultural yellow is left out on purpose: SPEC §4 names only these four colours, and a farm
    # vehicle is not reliably "large" for a parking tariff.
    if color is None:
        return None
    return _VEHICLE_TYPE_BY_COLOR.get(color)
