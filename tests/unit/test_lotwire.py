"""The lot topic's wire format, pure (SPEC §11): topics, strict decoding, encoding, revisions."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeagent import lotwire
from edgeagent.lotwire import (
    MAX_PAYLOAD_BYTES,
    Cleared,
    ExitRecord,
    ExitState,
    Reason,
    Rejected,
    Snapshot,
    decode,
    encode,
    epoch_of,
    exit_topic_for,
    newer,
    next_rev,
    parse_topic,
    prefix_of,
    topic_for,
)
from edgeagent.model import EntryState, PlateColor
from edgeagent.sessions import SessionState

LOT = "lots/WXPARK001/sessions"
A = "P1G1ABCDEF0000000042"  # box P1G1, journal epoch ABCDEF, row 42 (Journal.serial_for)
T = 1_720_078_200

OPEN = Snapshot(A, "P1G1", 3, SessionState.OPEN, "粤B12345", PlateColor.BLUE, T, "A01", EntryState.SENT)
CLOSED = replace(OPEN, rev=4, state=SessionState.CLOSED, exit_timestamp=T + 3600, exit_box="P1G2")
EXIT = ExitRecord(A, "P1G2", 1, "X01", T + 3600, ExitState.WAITING)


def fields_of(message: Snapshot | ExitRecord) -> dict[str, Any]:
    return dict(json.loads(encode(message)))


def raw(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


# -- topics -------------------------------------------------------------------------------------------


def test_serial_names_its_box_and_epoch() -> None:
    assert (prefix_of(A), epoch_of(A)) == ("P1G1", "ABCDEF")
    # The prefix is read by length, so a prefix that ends like an epoch is still whole.
    assert prefix_of("ABCDEFGHIJKLZZZZZZ0000000001") == "ABCDEFGHIJKL"
    assert prefix_of("X0000000000000001") == "X"


def test_topics() -> None:
    assert topic_for(LOT, A) == f"{LOT}/{A}"
    assert exit_topic_for(LOT, A) == f"{LOT}/{A}/exit"
    assert parse_topic(LOT, topic_for(LOT, A)) == (A, False)
    assert parse_topic(LOT, exit_topic_for(LOT, A)) == (A, True)
    with pytest.raises(ValueError):
        topic_for(LOT, "P1G1/../x")


@pytest.mark.parametrize(
    "topic",
    [
        LOT,
        f"{LOT}/",
        f"{LOT}/+",
        f"{LOT}/#",
        f"{LOT}/{A}/+",
        f"{LOT}/{A}/#",
        f"{LOT}/{A}/exit/x",
        f"{LOT}/{A}/entry",
        f"{LOT}/{A}/",
        f"{LOT}//{A}",
        f"{LOT}/../{A}",
        f"{LOT}/..",
        f"{LOT}/{A}/..",
        f"{LOT}/p1g1abcdef0000000042",  # the epoch is upper case: not one of ours
        f"{LOT}/P1G1ABCDEF000000004",  # one digit short
        f"{LOT}/P1G1ABCDEF0000000042\n",
        f"{LOT}/ＰABCDEF0000000042",  # full-width letter
        f"lots/WXPARK002/sessions/{A}",
        f"lots/WXPARK001/sessionsX/{A}",
        f"$SYS/{A}",
        A,
        "",
    ],
)
def test_foreign_topics(topic: str) -> None:
    assert parse_topic(LOT, topic) is None
    found = decode(LOT, topic, encode(OPEN))
    assert isinstance(found, Rejected) and found.reason is Reason.FOREIGN_TOPIC


def test_no_lot_topic_means_nothing_is_ours() -> None:
    assert parse_topic("", f"/{A}") is None


# -- decoding -----------------------------------------------------------------------------------------


def test_snapshot_and_exit_record_round_trip() -> None:
    for message in (OPEN, CLOSED, EXIT):
        topic = exit_topic_for(LOT, A) if isinstance(message, ExitRecord) else topic_for(LOT, A)
        assert decode(LOT, topic, encode(message)) == message


def test_encoding_is_compact_json_with_nulls_and_no_serial() -> None:
    body = encode(OPEN)
    assert b" " not in body and "粤".encode() in body  # compact, UTF-8 rather than \\u escapes
    assert list(json.loads(body)) == [
        "box", "rev", "state", "plate_number", "plate_color", "enter_timestamp", "entrance_number",
        "entry_state", "exit_timestamp", "exit_box",
    ]  # fmt: skip
    assert json.loads(body)["exit_timestamp"] is None
    assert list(json.loads(encode(EXIT))) == ["box", "rev", "exit_number", "exit_timestamp", "exit_state"]


def test_an_empty_retained_payload_clears() -> None:
    assert decode(LOT, topic_for(LOT, A), b"") == Cleared(A, False)
    assert decode(LOT, exit_topic_for(LOT, A), b"") == Cleared(A, True)


def reason(obj: Any, *, exit_record: bool = False) -> Reason:
    topic = exit_topic_for(LOT, A) if exit_record else topic_for(LOT, A)
    payload = obj if isinstance(obj, bytes) else raw(obj)
    found = decode(LOT, topic, payload)
    assert isinstance(found, Rejected), found
    assert found.detail and len(found.detail) < 400
    return found.reason


def test_a_snapshot_from_a_box_that_did_not_mint_the_number_is_refused() -> None:
    assert reason(fields_of(OPEN) | {"box": "P1G2"}) is Reason.WRONG_BOX
    # A box name that is the owner's with a suffix, or a prefix of it, is another box.
    assert reason(fields_of(OPEN) | {"box": "P1G"}) is Reason.WRONG_BOX
    assert reason(fields_of(OPEN) | {"box": "P1G1A"}) is Reason.WRONG_BOX


def test_an_exit_record_from_the_owner_is_refused() -> None:
    assert reason(fields_of(EXIT) | {"box": "P1G1"}, exit_record=True) is Reason.WRONG_BOX


def test_a_snapshot_on_the_exit_topic_and_the_other_way_round() -> None:
    assert reason(fields_of(OPEN), exit_record=True) is Reason.UNKNOWN_FIELD
    assert reason(fields_of(EXIT)) is Reason.UNKNOWN_FIELD


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"extra": 1}, Reason.UNKNOWN_FIELD),
        ({"serial": A}, Reason.UNKNOWN_FIELD),  # the number is the topic's, never a field
        ({"rev": True}, Reason.WRONG_TYPE),
        ({"rev": 1.0}, Reason.WRONG_TYPE),
        ({"rev": "4"}, Reason.WRONG_TYPE),
        ({"rev": 0}, Reason.BAD_VALUE),
        ({"rev": -1}, Reason.BAD_VALUE),
        ({"rev": 2**63}, Reason.BAD_VALUE),
        ({"rev": 10**300}, Reason.BAD_VALUE),
        ({"box": ""}, Reason.BAD_VALUE),
        ({"box": None}, Reason.WRONG_TYPE),
        ({"state": "orphan"}, Reason.BAD_VALUE),  # an exit row's state, never a session's
        ({"state": "OPEN"}, Reason.BAD_VALUE),
        ({"state": ["open"]}, Reason.WRONG_TYPE),
        ({"plate_number": "粤b12345"}, Reason.BAD_VALUE),  # not normalised
        ({"plate_number": "粤B·12345"}, Reason.BAD_VALUE),
        ({"plate_number": "无牌车"}, Reason.BAD_VALUE),
        ({"plate_number": "B12345"}, Reason.BAD_VALUE),
        ({"plate_number": "粤B12345" * 100}, Reason.BAD_VALUE),
        ({"plate_number": 12345}, Reason.WRONG_TYPE),
        ({"plate_color": "blue"}, Reason.BAD_VALUE),
        ({"enter_timestamp": 0}, Reason.BAD_VALUE),
        ({"enter_timestamp": 1720078200000}, Reason.BAD_VALUE),  # milliseconds
        ({"enter_timestamp": "2024-07-04T07:30:00Z"}, Reason.WRONG_TYPE),
        ({"entrance_number": "A 01"}, Reason.BAD_VALUE),
        ({"entrance_number": "A" * 129}, Reason.BAD_VALUE),
        ({"entry_state": "rejected"}, Reason.BAD_VALUE),
        ({"exit_timestamp": T + 60}, Reason.INCONSISTENT),  # open, but with an exit
        ({"exit_box": "P1G2"}, Reason.INCONSISTENT),
        ({"state": "closed"}, Reason.INCONSISTENT),  # closed without an exit
        ({"state": "closed", "exit_timestamp": T, "exit_box": "P1G2"}, Reason.INCONSISTENT),  # exit = entry
        ({"state": "exit_pending", "exit_timestamp": T + 1, "exit_box": None}, Reason.INCONSISTENT),
        ({"state": "closed", "exit_timestamp": T + 1, "exit_box": "P1/G2"}, Reason.BAD_VALUE),
    ],
)
def test_snapshot_field_checks(change: dict[str, Any], expected: Reason) -> None:
    assert reason(fields_of(OPEN) | change) is expected


def test_every_field_is_required_even_when_null() -> None:
    for name in fields_of(OPEN):
        obj = fields_of(OPEN)
        del obj[name]
        assert reason(obj) is Reason.MISSING_FIELD, name
    for name in fields_of(EXIT):
        obj = fields_of(EXIT)
        del obj[name]
        assert reason(obj, exit_record=True) is Reason.MISSING_FIELD, name


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"exit_state": "exited"}, Reason.BAD_VALUE),
        ({"exit_number": ""}, Reason.BAD_VALUE),
        ({"exit_number": "X01/.."}, Reason.BAD_VALUE),
        ({"exit_timestamp": None}, Reason.WRONG_TYPE),
        ({"exit_timestamp": 1e9}, Reason.WRONG_TYPE),
        ({"box": "P1G2", "rev": False}, Reason.WRONG_TYPE),
    ],
)
def test_exit_record_field_checks(change: dict[str, Any], expected: Reason) -> None:
    assert reason(fields_of(EXIT) | change, exit_record=True) is expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"[" * 3000 + b"]" * 3000, Reason.TOO_LARGE),
        (b"[" * 2000 + b"]" * 2000, Reason.NOT_JSON),  # nested past the recursion limit, under the cap
        (b"9" * 4000, Reason.NOT_OBJECT),  # a 4000-digit number parses (under 4300 digits) and is no object
        (b"{" + b" " * MAX_PAYLOAD_BYTES + b"}", Reason.TOO_LARGE),
        (b"\xff\xfe{}", Reason.NOT_JSON),
        (b"\xef\xbb\xbf{}", Reason.NOT_JSON),  # a BOM
        (b'{"rev": NaN}', Reason.NOT_JSON),
        (b'{"rev": Infinity}', Reason.NOT_JSON),
        (b'{"rev": 1, "rev": 2}', Reason.NOT_JSON),  # which one wins differs between parsers
        (b"null", Reason.NOT_OBJECT),
        (b'"open"', Reason.NOT_OBJECT),
        (b"[]", Reason.NOT_OBJECT),
        (b"{}", Reason.MISSING_FIELD),
        (b"\x00", Reason.NOT_JSON),
        (b"offline", Reason.NOT_JSON),
        (b'{"box": "P1G1"', Reason.NOT_JSON),
    ],
)
def test_hostile_payloads(payload: bytes, expected: Reason) -> None:
    assert reason(payload) is expected
    assert reason(payload, exit_record=True) is expected


@pytest.mark.parametrize("depth", [10, 500, 800, 1500, 2040])
def test_deep_nesting_is_rejected_at_any_depth_under_the_cap(depth: int) -> None:
    # Past the interpreter's recursion limit it is not JSON to us; below it, not our object.
    for payload in (b"[" * depth + b"]" * depth, b'{"":' * depth + b"1" + b"}" * depth):
        if len(payload) <= MAX_PAYLOAD_BYTES:
            assert reason(payload) in {Reason.NOT_JSON, Reason.NOT_OBJECT, Reason.UNKNOWN_FIELD}


@given(st.binary(max_size=MAX_PAYLOAD_BYTES + 10))
def test_any_bytes_decode_to_a_value_never_an_exception(payload: bytes) -> None:
    found = decode(LOT, topic_for(LOT, A), payload)
    assert isinstance(found, (Snapshot, Rejected, Cleared))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=10), c),
    )
)
def test_any_json_decodes_to_a_value(obj: Any) -> None:
    payload = raw(obj)
    for topic in (topic_for(LOT, A), exit_topic_for(LOT, A)):
        assert isinstance(decode(LOT, topic, payload), (Snapshot, ExitRecord, Rejected, Cleared))


# -- round trips --------------------------------------------------------------------------------------

PREFIX = st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True)
SERIAL = st.builds(
    lambda p, e, n: f"{p}{e}{n:010d}",
    PREFIX,
    st.from_regex(r"[A-Z0-9]{6}", fullmatch=True),
    st.integers(0, 10**10 - 1),
)
PLATE = st.sampled_from(["粤B12345", "京AD92035", "甘G23459F", "沪A1234学", "使014578", "粤ZA123港", "川A1234应急"])
STAMP = st.integers(lotwire.MIN_TIMESTAMP, lotwire.MAX_TIMESTAMP - 10**6)
REV = st.integers(1, lotwire.MAX_REV)
NUMBER = st.from_regex(r"[A-Za-z0-9]{1,128}", fullmatch=True)


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    serial = draw(SERIAL)
    state = draw(st.sampled_from([SessionState.OPEN, SessionState.EXIT_PENDING, SessionState.CLOSED]))
    enter = draw(STAMP)
    exited = state is not SessionState.OPEN
    return Snapshot(
        serial=serial,
        box=prefix_of(serial),
        rev=draw(REV),
        state=state,
        plate_number=draw(PLATE),
        plate_color=draw(st.sampled_from(PlateColor)),
        enter_timestamp=enter,
        entrance_number=draw(NUMBER),
        entry_state=draw(st.sampled_from([EntryState.PENDING, EntryState.SENT, EntryState.DEAD])),
        exit_timestamp=enter + draw(st.integers(1, 10**6)) if exited else None,
        exit_box=draw(PREFIX) if exited else None,
    )


@st.composite
def exit_records(draw: st.DrawFn) -> ExitRecord:
    serial = draw(SERIAL)
    box = draw(PREFIX.filter(lambda b: b != prefix_of(serial)))
    return ExitRecord(serial, box, draw(REV), draw(NUMBER), draw(STAMP), draw(st.sampled_from(ExitState)))


@given(snapshots())
def test_snapshots_round_trip(snapshot: Snapshot) -> None:
    body = encode(snapshot)
    assert len(body) <= MAX_PAYLOAD_BYTES
    assert decode(LOT, topic_for(LOT, snapshot.serial), body) == snapshot


@given(exit_records())
def test_exit_records_round_trip(record: ExitRecord) -> None:
    assert decode(LOT, exit_topic_for(LOT, record.serial), encode(record)) == record


@given(snapshots(), st.sampled_from(["P", "P1G2", "ZZZZZZZZZZZZ"]))
def test_encode_refuses_what_peers_would_reject(snapshot: Snapshot, box: str) -> None:
    if box != prefix_of(snapshot.serial):
        with pytest.raises(ValueError, match="wrong_box"):
            encode(replace(snapshot, box=box))


def test_encode_refuses_an_inconsistent_snapshot() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        encode(replace(OPEN, exit_timestamp=T + 1))


# -- revisions ----------------------------------------------------------------------------------------


def test_newer_keeps_the_highest_rev_and_drops_repeats() -> None:
    assert newer(None, 1)
    assert newer(3, 4)
    assert not newer(4, 4)  # a bridge's echo, or a periodic re-publish
    assert not newer(4, 3)  # a stale retained copy handed over after the newer one


@given(st.lists(st.integers(1, 50), max_size=40))
def test_any_delivery_order_ends_at_the_highest_rev(revs: list[int]) -> None:
    kept: int | None = None
    taken = 0
    for rev in revs:
        if newer(kept, rev):
            kept, taken = rev, taken + 1
    assert kept == (max(revs) if revs else None)
    assert taken <= len(set(revs))  # every rev taken at most once, however often it was echoed


def test_a_writer_that_lost_its_counter_continues_above_what_it_hears() -> None:
    # A journal restored from a backup holds rev 2 for a topic whose retained copy says 7: its next
    # message must beat the 7 that every peer kept.
    assert next_rev(2, 7) == 8
    assert newer(7, next_rev(2, 7))
    assert next_rev(7, 2) == 8
    assert next_rev(0) == 1
