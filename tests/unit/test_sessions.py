"""Parking sessions, pure (SPEC §10): matching, re-entry, the exit clamp, hold, repeats, the state table."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeagent import plates
from edgeagent.model import MatchMode, ReentryMode
from edgeagent.sessions import (
    CLOCK_TOLERANCE_S,
    CONFUSABLE_GROUPS,
    INITIAL,
    PROVINCES,
    TRANSITIONS,
    Difference,
    ExitTime,
    IllegalTransition,
    MatchKind,
    OpenSession,
    Row,
    SessionEvent,
    SessionState,
    confusable,
    exit_timestamp,
    hold_deadline,
    hold_expired,
    match_exit,
    one_difference,
    reentry,
    repeat_of,
    transition,
)

T = 1_720_078_200
CONFUSABLE = MatchMode.CONFUSABLE


def s(serial: str, plate: str, enter: int = T - 3600) -> OpenSession:
    return OpenSession(serial, plate, enter)


# -- the confusable table and one difference -------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"), [("0", "D"), ("D", "Q"), ("0", "Q"), ("8", "B"), ("2", "Z"), ("5", "S"), ("4", "A"), ("1", "7")]
)
def test_spec_pairs_are_confusable_both_ways(a: str, b: str) -> None:
    assert confusable(a, b) and confusable(b, a)


@pytest.mark.parametrize(("a", "b"), [("1", "I"), ("I", "7"), ("6", "G")])
def test_more_spec_pairs(a: str, b: str) -> None:
    assert confusable(a, b)


@pytest.mark.parametrize(("a", "b"), [("0", "8"), ("B", "D"), ("A", "A"), ("3", "E"), ("粤", "B"), ("", "0")])
def test_other_pairs_are_not(a: str, b: str) -> None:
    assert not confusable(a, b)


def test_groups_are_disjoint_and_provinces_are_what_plates_accept() -> None:
    chars = "".join(CONFUSABLE_GROUPS)
    assert len(chars) == len(set(chars))
    assert len(PROVINCES) == 31
    for province in PROVINCES:
        assert plates.classify(f"{province}B12345") is plates.PlateClass.VALID


@pytest.mark.parametrize(
    ("read", "session", "expected"),
    [
        ("粤B12345", "粤812345", Difference(1, "B", "8")),
        ("粤B1234S", "粤B12345", Difference(6, "S", "5")),
        ("京AD9203S", "京AD92035", Difference(7, "S", "5")),  # 8-character new-energy plate
        ("湘B12345", "粤B12345", Difference(0, "湘", "粤")),  # the province character
        ("粤B12345", "粤B12345", None),  # equal is exact, not a difference
        ("粤B12345", "粤B12346", None),  # 5/6 is not a pair
        ("粤B12345", "粤8Z2345", None),  # two positions
        ("粤B12345", "粤B123450", None),  # different length
        ("使014578", "京014578", None),  # 使 is no province
    ],
)
def test_one_difference(read: str, session: str, expected: Difference | None) -> None:
    assert one_difference(read, session) == expected


def test_province_flag() -> None:
    assert Difference(0, "湘", "粤").province
    assert not Difference(1, "B", "8").province


# -- match_exit ------------------------------------------------------------------------------------


def test_exact_match() -> None:
    a, b = s("P1", "粤B12345"), s("P2", "粤B12346")
    found = match_exit("粤B12345", T, [b, a], CONFUSABLE)
    assert (found.kind, found.session, found.difference, found.candidates) == (MatchKind.EXACT, a, None, ())


def test_exact_beats_a_fuzzy_candidate() -> None:
    exact, fuzzy = s("P1", "粤B12345"), s("P2", "粤812345")
    found = match_exit("粤B12345", T, [fuzzy, exact], CONFUSABLE)
    assert found.kind is MatchKind.EXACT and found.session is exact


def test_fuzzy_match_names_the_position_and_pair() -> None:
    only = s("P1", "粤812345")
    found = match_exit("粤B12345", T, [only, s("P2", "京A00000")], CONFUSABLE)
    assert found.kind is MatchKind.FUZZY and found.session is only
    assert found.difference == Difference(1, "B", "8")


def test_province_misread_matches() -> None:
    only = s("P1", "粤B12345")
    found = match_exit("湘B12345", T, [only], CONFUSABLE)
    assert found.kind is MatchKind.FUZZY and found.difference is not None and found.difference.province


def test_two_fuzzy_candidates_are_ambiguous_and_listed() -> None:
    a, b = s("P1", "粤812345", T - 100), s("P2", "粤B1234S", T - 200)
    found = match_exit("粤B12345", T, [a, b], CONFUSABLE)
    assert found.kind is MatchKind.AMBIGUOUS and found.session is None
    assert found.candidates == (b, a)  # oldest entry first


def test_exact_mode_never_guesses() -> None:
    found = match_exit("粤B12345", T, [s("P1", "粤812345")], MatchMode.EXACT)
    assert found.kind is MatchKind.NONE and found.session is None


def test_no_session_no_match() -> None:
    assert match_exit("粤B12345", T, [], CONFUSABLE).kind is MatchKind.NONE
    assert match_exit("粤B12345", T, [s("P1", "京A00000")], CONFUSABLE).kind is MatchKind.NONE


def test_a_session_that_entered_well_after_the_exit_does_not_fit() -> None:
    late = s("P1", "粤B12345", T + int(CLOCK_TOLERANCE_S) + 1)
    assert match_exit("粤B12345", T, [late], CONFUSABLE).kind is MatchKind.NONE
    assert match_exit("粤812345", T, [late], CONFUSABLE).kind is MatchKind.NONE


def test_a_session_a_little_after_the_exit_fits_within_the_clock_tolerance() -> None:
    skewed = s("P1", "粤B12345", T + 30)  # the entry camera's clock is 30 s ahead
    found = match_exit("粤B12345", T, [skewed], CONFUSABLE)
    assert found.kind is MatchKind.EXACT and found.session is skewed
    assert exit_timestamp(T, skewed.enter_timestamp) == ExitTime(T + 31, clamped=True)
    assert match_exit("粤B12345", T, [skewed], CONFUSABLE, clock_tolerance_s=0).kind is MatchKind.NONE


def test_of_several_exact_sessions_the_latest_entry_before_the_exit_wins() -> None:
    stale, current, skewed = s("P1", "粤B12345", T - 86400), s("P2", "粤B12345", T - 600), s("P3", "粤B12345", T + 20)
    found = match_exit("粤B12345", T, [skewed, stale, current], CONFUSABLE)
    assert found.kind is MatchKind.EXACT and found.session is current
    assert found.candidates == (stale, current, skewed)  # kept as evidence
    only_after = match_exit("粤B12345", T, [s("P4", "粤B12345", T + 50), skewed], CONFUSABLE)
    assert only_after.session is skewed  # none before: the nearest within the tolerance


def test_equal_entry_and_exit_time_fits() -> None:
    same = s("P1", "粤B12345", T)
    assert match_exit("粤B12345", T, [same], CONFUSABLE).session is same


def test_match_returns_the_callers_own_objects() -> None:
    @dataclass(frozen=True)
    class Row_:
        id: int
        out_serial_number: str
        plate_number: str
        enter_timestamp: int

    row = Row_(7, "P1", "粤B12345", T - 5)
    found = match_exit("粤B12345", T, [row], CONFUSABLE)
    assert found.session is row and found.session.id == 7


# -- properties ------------------------------------------------------------------------------------

PLATE_CHARS = "0123456789ABDGQSZ78"
plates_st = st.builds(
    lambda p, rest: p + "B" + rest, st.sampled_from("粤湘京"), st.text(PLATE_CHARS, min_size=5, max_size=6)
)
sessions_st = st.lists(
    st.builds(OpenSession, st.uuids().map(str), plates_st, st.integers(T - 10_000, T + 200)), max_size=8
)


@given(plate=plates_st, exit_at=st.integers(T - 100, T + 100), sessions=sessions_st)
def test_property_a_fuzzy_match_is_the_only_session_that_fits(
    plate: str, exit_at: int, sessions: list[OpenSession]
) -> None:
    found = match_exit(plate, exit_at, sessions, CONFUSABLE)
    fits = [x for x in sessions if x.enter_timestamp <= exit_at + CLOCK_TOLERANCE_S]
    near = [x for x in fits if one_difference(plate, x.plate_number) is not None]
    if found.kind is MatchKind.FUZZY:
        assert near == [found.session]
        assert not any(x.plate_number == plate for x in fits)
    if len(near) > 1 and not any(x.plate_number == plate for x in fits):
        assert found.kind is MatchKind.AMBIGUOUS and found.session is None


@given(plate=plates_st, exit_at=st.integers(T - 100, T + 100), sessions=sessions_st)
def test_property_exact_beats_fuzzy_and_exact_mode_is_exact(
    plate: str, exit_at: int, sessions: list[OpenSession]
) -> None:
    found = match_exit(plate, exit_at, sessions, CONFUSABLE)
    if any(x.plate_number == plate and x.enter_timestamp <= exit_at + CLOCK_TOLERANCE_S for x in sessions):
        assert found.kind is MatchKind.EXACT
    if found.session is not None:
        assert found.session in sessions
        assert found.session.enter_timestamp <= exit_at + CLOCK_TOLERANCE_S
    strict = match_exit(plate, exit_at, sessions, MatchMode.EXACT)
    assert strict.kind in (MatchKind.EXACT, MatchKind.NONE)
    assert strict.session is None or strict.session.plate_number == plate


@given(read_time=st.floats(T - 1000, T + 1000), enter=st.integers(T - 1000, T + 1000))
def test_property_exit_time_is_never_before_entry_plus_one(read_time: float, enter: int) -> None:
    got = exit_timestamp(read_time, enter)
    assert got.timestamp >= enter + 1
    assert got.clamped == (int(read_time) < enter + 1)
    assert got.clamped or got.timestamp == int(read_time)


# -- re-entry --------------------------------------------------------------------------------------


def test_reentry_closes_the_open_session_at_the_new_entry_time() -> None:
    old, other = s("P1", "粤B12345", T - 7200), s("P2", "粤812345", T - 100)
    decision = reentry("粤B12345", T, [old, other], ReentryMode.CLOSE_PREVIOUS)
    assert [(c.session, c.exit) for c in decision.close] == [(old, ExitTime(T, clamped=False))]
    assert decision.superseded_by is None  # and the confusable 粤812345 is another car: left alone


def test_reentry_keep_closes_nothing() -> None:
    assert reentry("粤B12345", T, [s("P1", "粤B12345", T - 60)], ReentryMode.KEEP).close == ()


def test_reentry_of_a_late_offline_resend() -> None:
    newer, same_second = s("P2", "粤B12345", T + 600), s("P3", "粤B12345", T)
    decision = reentry("粤B12345", T, [newer, same_second], ReentryMode.CLOSE_PREVIOUS)
    assert decision.close == ()  # neither the newer session nor the same-second one (a repeat) is closed
    assert decision.superseded_by is newer


# -- hold and repeats ------------------------------------------------------------------------------


def test_exit_hold() -> None:
    assert hold_deadline(1000.0, 30) == 1030.0
    assert not hold_expired(1000.0, 1029.9, 30)
    assert hold_expired(1000.0, 1030.0, 30)
    assert hold_expired(1000.0, 1000.0, 0)  # no hold: an orphan at once


@dataclass(frozen=True)
class Seen:
    plate_number: str
    exit_number: str
    read_at: float


def test_repeat_of_the_same_plate_at_the_same_exit() -> None:
    first, later = Seen("粤B12345", "X01", T), Seen("粤B12345", "X01", T + 100)
    recent = [first, later, Seen("粤B12345", "X02", T + 5), Seen("粤B12346", "X01", T + 5)]
    assert repeat_of("粤B12345", "X01", T + 10, recent, 120) is first  # the nearest in time
    assert repeat_of("粤B12345", "X01", T + 90, recent, 120) is later
    assert repeat_of("粤B12345", "X02", T + 200, recent, 120) is None  # outside the window
    assert repeat_of("粤B12345", "X03", T, recent, 120) is None  # another exit: another exit read
    assert repeat_of("粤B12399", "X01", T, recent, 120) is None


# -- the state machine -----------------------------------------------------------------------------

LEGAL = [
    (Row.SESSION, SessionState.OPEN, SessionEvent.EXIT_MATCHED, SessionState.EXIT_PENDING),
    (Row.SESSION, SessionState.OPEN, SessionEvent.EXIT_INFERRED, SessionState.EXIT_PENDING),
    (Row.SESSION, SessionState.OPEN, SessionEvent.CLOSED_MANUALLY, SessionState.EXIT_PENDING),
    (Row.SESSION, SessionState.OPEN, SessionEvent.CLOSED_BY_PEER, SessionState.CLOSED),
    (Row.SESSION, SessionState.EXIT_PENDING, SessionEvent.EXIT_SENT, SessionState.CLOSED),
    (Row.SESSION, SessionState.EXIT_PENDING, SessionEvent.CLOSED_BY_PEER, SessionState.CLOSED),
    (Row.EXIT, SessionState.EXIT_PENDING, SessionEvent.ATTACHED, SessionState.CLOSED),
    (Row.EXIT, SessionState.EXIT_PENDING, SessionEvent.HOLD_EXPIRED, SessionState.ORPHAN),
    (Row.EXIT, SessionState.ORPHAN, SessionEvent.ATTACHED, SessionState.CLOSED),
    (Row.EXIT, SessionState.ORPHAN, SessionEvent.DISMISSED, SessionState.DISMISSED),
]


@pytest.mark.parametrize(("row", "state", "event", "after"), LEGAL, ids=lambda v: str(v))
def test_each_legal_transition(row: Row, state: SessionState, event: SessionEvent, after: SessionState) -> None:
    assert transition(row, state, event) is after


def test_the_table_is_exactly_the_legal_list() -> None:
    table = {
        (r, st_, ev, to) for r, states in TRANSITIONS.items() for st_, evs in states.items() for ev, to in evs.items()
    }
    assert table == set(LEGAL)


ILLEGAL = [
    (row, state, event)
    for row in Row
    for state in SessionState
    for event in SessionEvent
    if not any(legal[:3] == (row, state, event) for legal in LEGAL)
]


@pytest.mark.parametrize(("row", "state", "event"), ILLEGAL, ids=lambda v: str(v))
def test_every_other_transition_raises(row: Row, state: SessionState, event: SessionEvent) -> None:
    with pytest.raises(IllegalTransition, match=f"{event} is not allowed"):
        transition(row, state, event)


def test_illegal_examples_that_matter() -> None:
    with pytest.raises(IllegalTransition):
        transition(Row.SESSION, SessionState.CLOSED, SessionEvent.EXIT_MATCHED)  # a closed session takes no exit
    with pytest.raises(IllegalTransition):
        transition(Row.EXIT, SessionState.DISMISSED, SessionEvent.ATTACHED)  # dismissed is final
    with pytest.raises(IllegalTransition):
        transition(Row.SESSION, SessionState.EXIT_PENDING, SessionEvent.HOLD_EXPIRED)  # a matched exit never orphans


def test_initial_states_and_every_state_reachable() -> None:
    assert INITIAL == {Row.SESSION: SessionState.OPEN, Row.EXIT: SessionState.EXIT_PENDING}
    reached = set(INITIAL.values()) | {after for *_, after in LEGAL}
    assert reached == set(SessionState)
