"""policy: what an answer is (`read`), what to do about it (`decide`), the loop's brakes (`Throttle`) and the
transition table of a journaled request (SPEC §5, DESIGN "One outbox, many kinds of request").

Answers are signed with a test platform key exactly as WeChat Pay signs them; time and randomness are
passed in, so every case is deterministic.
"""

from __future__ import annotations

import email.utils
import itertools
import random
from collections.abc import Mapping
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from edgeagent import policy
from edgeagent.policy import (
    Dead,
    Event,
    Failure,
    History,
    IllegalTransition,
    Pause,
    Reading,
    Retry,
    Sent,
    State,
    Throttle,
    Verdict,
)
from edgeagent.requests import KINDS, Kind
from tests.unit.outbox_fakes import KEY_ID, error_body, platform_key, rsa_key, signed

NOW = 1_800_000_000.0
ENTRY, EXIT, LOT = KINDS[Kind.ENTRY], KINDS[Kind.EXIT], KINDS[Kind.PARKING_LOT]


@pytest.fixture(scope="module")
def keys() -> Mapping[str, RSAPublicKey]:
    return {KEY_ID: platform_key().public_key()}


def rng() -> random.Random:
    return random.Random(9)


def outcome_of(
    reading: Reading, request: int = 1, attempts: int = 0, history: History | None = None
) -> tuple[policy.Outcome, History]:
    return policy.decide(reading, request=request, attempts=attempts, history=history or History(), now=NOW, rng=rng())


def answer_400(code: str, message: str, detail: object = None) -> policy.Answer:
    return signed(400, error_body(code, message, detail), timestamp=NOW)


# -- accepted ---------------------------------------------------------------------------------------


def test_verified_200_with_serial_number_is_sent(keys: Mapping[str, RSAPublicKey]) -> None:
    reading = policy.read(ENTRY, signed(200, {"serial_number": "WX123"}, timestamp=NOW), keys, NOW)
    assert reading.verdict is Verdict.ACCEPTED
    assert (reading.server_time, reading.server_time_fresh) == (int(NOW), True)
    outcome, history = outcome_of(reading)
    assert isinstance(outcome, Sent)
    assert (outcome.serial_number, outcome.duplicate) == ("WX123", False)
    assert history == History()


def test_verified_204_of_an_exit_is_sent(keys: Mapping[str, RSAPublicKey]) -> None:
    reading = policy.read(EXIT, signed(204, b"", timestamp=NOW), keys, NOW)
    outcome, _ = outcome_of(reading)
    assert outcome == Sent(None, duplicate=False, request_id=reading.request_id)


def test_verified_200_without_serial_number_is_not_sent(keys: Mapping[str, RSAPublicKey]) -> None:
    """An entry counts only with the answer it expects: 200 and a serial_number (SPEC §1)."""
    reading = policy.read(ENTRY, signed(200, {"other": 1}, timestamp=NOW), keys, NOW)
    outcome, _ = outcome_of(reading)
    assert isinstance(outcome, Retry)
    assert "without serial_number" in outcome.reason


def test_verified_202_is_retried(keys: Mapping[str, RSAPublicKey]) -> None:
    reading = policy.read(ENTRY, signed(202, b"", timestamp=NOW), keys, NOW)
    assert isinstance(outcome_of(reading)[0], Retry)


# -- unverified -------------------------------------------------------------------------------------


def test_unverified_2xx_is_a_counted_retry_and_a_run_of_them_pauses(keys: Mapping[str, RSAPublicKey]) -> None:
    """A 2xx signed with a key we do not trust never counts; three in a row are a wrong platform key."""
    forged = signed(200, {"serial_number": "WX1"}, timestamp=NOW, key=rsa_key("impostor"))
    history = History()
    for n in range(1, 3):
        reading = policy.read(ENTRY, forged, keys, NOW)
        assert reading.verdict is Verdict.UNVERIFIED
        outcome, history = outcome_of(reading, request=n, history=history)
        assert isinstance(outcome, Retry)
        assert outcome.unverified
        assert outcome.reason.startswith("response_unverified")
        assert outcome.at > NOW
    outcome, history = outcome_of(policy.read(ENTRY, forged, keys, NOW), request=99, history=history)
    assert isinstance(outcome, Pause)
    assert "platform_public_key" in outcome.reason
    assert history.unverified_run == 3


def test_a_verified_answer_breaks_the_unverified_run(keys: Mapping[str, RSAPublicKey]) -> None:
    forged = signed(200, {"serial_number": "WX1"}, timestamp=NOW, key=rsa_key("impostor"))
    good = signed(200, {"serial_number": "WX2"}, timestamp=NOW)
    history = History()
    for n, answer in enumerate([forged, forged, good, forged, forged]):
        outcome, history = outcome_of(policy.read(ENTRY, answer, keys, NOW), request=n, history=history)
        assert not isinstance(outcome, Pause)


def test_unknown_serial_is_retried_but_never_pauses(keys: Mapping[str, RSAPublicKey]) -> None:
    """Signed under a certificate we do not hold yet: fetch certificates and retry, not the key's fault."""
    answer = signed(200, {"serial_number": "WX1"}, timestamp=NOW, serial="NEWCERT01")
    history = History()
    for n in range(5):
        reading = policy.read(ENTRY, answer, keys, NOW)
        assert reading.unknown_serial == "NEWCERT01"
        outcome, history = outcome_of(reading, request=n, history=history)
        assert isinstance(outcome, Retry)


def test_stale_but_signed_answer_tells_the_time_without_counting(keys: Mapping[str, RSAPublicKey]) -> None:
    """A correctly signed answer an hour old (a replay, or the API's clock far from ours) is not a success,
    but its signed timestamp is evidence about the clock (`server_time`, not fresh)."""
    old = NOW - 3600
    reading = policy.read(ENTRY, signed(200, {"serial_number": "WX1"}, timestamp=old), keys, NOW)
    assert reading.verdict is Verdict.UNVERIFIED
    assert (reading.server_time, reading.server_time_fresh) == (int(old), False)
    assert isinstance(outcome_of(reading)[0], Retry)


def test_an_unsigned_answer_tells_nothing_about_the_time(keys: Mapping[str, RSAPublicKey]) -> None:
    forged = signed(200, {"serial_number": "WX1"}, timestamp=NOW - 3600, key=rsa_key("impostor"))
    reading = policy.read(ENTRY, forged, keys, NOW)
    assert reading.server_time is None


# -- 400 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "detail",
    [
        {"field": "parking_id", "value": "WXPARK001", "issue": "停车场不存在", "location": "body"},
        {"field": "/parking_id", "value": "WXPARK001", "location": "body"},
        {"detail": {"field": "/parking_id", "issue": "invalid"}},
    ],
    ids=["field", "json-pointer", "nested"],
)
def test_400_naming_parking_id_pauses_and_names_the_field(keys: Mapping[str, RSAPublicKey], detail: object) -> None:
    reading = policy.read(ENTRY, answer_400("PARAM_ERROR", "参数错误", detail), keys, NOW)
    assert (reading.verdict, reading.field) == (Verdict.CONFIG, "parking_id")
    outcome, history = outcome_of(reading)
    assert isinstance(outcome, Pause)
    assert outcome.field == "parking_id"
    assert "parking_id" in outcome.reason and "config" in outcome.reason
    assert (outcome.code, outcome.message) == ("PARAM_ERROR", "参数错误")
    assert history.revive == ()


def test_400_whose_message_names_a_config_field_pauses(keys: Mapping[str, RSAPublicKey]) -> None:
    reading = policy.read(ENTRY, answer_400("PARAM_ERROR", "entrance_name长度超过限制"), keys, NOW)
    outcome, _ = outcome_of(reading)
    assert isinstance(outcome, Pause)
    assert outcome.field == "entrance_name"


def test_config_400_on_several_requests_kills_none(keys: Mapping[str, RSAPublicKey]) -> None:
    answer = answer_400("PARAM_ERROR", "参数错误", {"field": "parking_id"})
    history = History()
    for n in range(1, 6):
        outcome, history = outcome_of(policy.read(ENTRY, answer, keys, NOW), request=n, history=history)
        assert isinstance(outcome, Pause)
        assert history.revive == ()


def test_400_about_the_request_itself_is_dead_with_the_apis_words(keys: Mapping[str, RSAPublicKey]) -> None:
    detail = {"field": "plate_number", "value": "粤B1", "issue": "车牌格式错误", "location": "body"}
    reading = policy.read(ENTRY, answer_400("PARAM_ERROR", "车牌号格式错误", detail), keys, NOW)
    outcome, _ = outcome_of(reading)
    assert isinstance(outcome, Dead)
    assert (outcome.code, outcome.message) == ("PARAM_ERROR", "车牌号格式错误")
    assert "plate_number" in outcome.detail and "车牌格式错误" in outcome.detail
    line = policy.dead_reason(outcome)
    assert "PARAM_ERROR" in line and "车牌号格式错误" in line and "plate_number" in line
    assert reading.request_id and reading.request_id in line


def test_the_same_400_on_three_different_requests_pauses_and_revives_the_earlier(
    keys: Mapping[str, RSAPublicKey],
) -> None:
    answer = answer_400("INVALID_REQUEST", "商户号未开通该权限")
    history = History()
    for n in range(1, 3):
        outcome, history = outcome_of(policy.read(ENTRY, answer, keys, NOW), request=n, history=history)
        assert isinstance(outcome, Dead)
    outcome, history = outcome_of(policy.read(ENTRY, answer, keys, NOW), request=3, history=history)
    assert isinstance(outcome, Pause)
    assert "3 different requests" in outcome.reason
    assert history.revive == tuple(range(1, 3))


def test_the_same_request_refused_twice_counts_once(keys: Mapping[str, RSAPublicKey]) -> None:
    answer = answer_400("INVALID_REQUEST", "商户号未开通该权限")
    history = History()
    for request in [1, 1, 2, 2]:  # after `retry`, the same request refused again
        outcome, history = outcome_of(policy.read(ENTRY, answer, keys, NOW), request=request, history=history)
        assert isinstance(outcome, Dead)
    assert history.revive == ()


def test_a_different_code_starts_a_new_run(keys: Mapping[str, RSAPublicKey]) -> None:
    a = answer_400("INVALID_REQUEST", "商户号未开通该权限")
    b = answer_400("PARAM_ERROR", "车牌号格式错误")
    history = History()
    for request, answer in enumerate([a, a, b, a]):
        outcome, history = outcome_of(policy.read(ENTRY, answer, keys, NOW), request=request, history=history)
        assert isinstance(outcome, Dead)


def test_a_success_ends_the_refusal_run(keys: Mapping[str, RSAPublicKey]) -> None:
    a = answer_400("INVALID_REQUEST", "商户号未开通该权限")
    ok = signed(200, {"serial_number": "WX1"}, timestamp=NOW)
    history = History()
    for request, answer in enumerate([a, a, ok, a]):
        outcome, history = outcome_of(policy.read(ENTRY, answer, keys, NOW), request=request, history=history)
        assert not isinstance(outcome, Pause)


@pytest.mark.parametrize("message", ["商户订单号重复", "out_serial_number duplicate"])
def test_a_duplicate_number_refusal_counts_as_delivered(keys: Mapping[str, RSAPublicKey], message: str) -> None:
    """The number is ours alone: refused as already used means an earlier attempt was accepted (SPEC §5)."""
    reading = policy.read(ENTRY, answer_400("INVALID_REQUEST", message), keys, NOW)
    assert reading.verdict is Verdict.DUPLICATE
    outcome, _ = outcome_of(reading)
    assert isinstance(outcome, Sent)
    assert (outcome.duplicate, outcome.serial_number) == (True, None)


# -- 401, 403, 404, TLS -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"), [(401, "SIGN_ERROR"), (403, "NO_AUTH"), (404, "RESOURCE_NOT_EXISTS")], ids=str
)
def test_auth_and_not_found_pause_everything(keys: Mapping[str, RSAPublicKey], status: int, code: str) -> None:
    answer = signed(status, error_body(code, "签名错误"), timestamp=NOW)
    reading = policy.read(ENTRY, answer, keys, NOW)
    outcome, history = outcome_of(reading, history=History("X", frozenset({7}), 1))
    assert isinstance(outcome, Pause)
    assert outcome.scope is policy.Scope.ALL
    assert code in outcome.reason and str(status) in outcome.reason
    assert history == History("X", frozenset({7}), 1)  # not a refusal of this request: the runs are untouched


def test_an_untrusted_certificate_pauses() -> None:
    outcome, _ = outcome_of(policy.read(ENTRY, Failure("certificate verify failed", blocked=True), {}, NOW))
    assert isinstance(outcome, Pause)
    assert "certificate" in outcome.reason


# -- transient --------------------------------------------------------------------------------------


def test_a_network_failure_is_retried_with_backoff() -> None:
    outcome, _ = outcome_of(policy.read(ENTRY, Failure("timed out"), {}, NOW), attempts=3)
    assert isinstance(outcome, Retry)
    assert NOW + policy.BACKOFF_BASE_S / 2 <= outcome.at <= NOW + 8
    assert "timed out" in outcome.reason
    assert not outcome.unverified


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_keeps_the_apis_code_and_message(keys: Mapping[str, RSAPublicKey], status: int) -> None:
    answer = signed(status, error_body("SYSTEM_ERROR", "系统繁忙，请稍后重试"), timestamp=NOW)
    reading = policy.read(ENTRY, answer, keys, NOW)
    outcome, _ = outcome_of(reading)
    assert isinstance(outcome, Retry)
    assert str(status) in outcome.reason
    assert "SYSTEM_ERROR" in outcome.reason and "系统繁忙" in outcome.reason
    assert reading.request_id in outcome.reason


def test_5xx_with_a_non_json_body_says_so(keys: Mapping[str, RSAPublicKey]) -> None:
    outcome, _ = outcome_of(policy.read(ENTRY, signed(502, b"<html>Bad Gateway</html>", timestamp=NOW), keys, NOW))
    assert isinstance(outcome, Retry)
    assert "non-JSON" in outcome.reason and "Bad Gateway" in outcome.reason


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_is_not_retried_before_retry_after(keys: Mapping[str, RSAPublicKey], form: str) -> None:
    value = "120" if form == "seconds" else email.utils.formatdate(NOW + 120, usegmt=True)
    answer = signed(429, error_body("FREQUENCY_LIMITED", "频率超限"), timestamp=NOW, headers={"Retry-After": value})
    reading = policy.read(ENTRY, answer, keys, NOW)
    assert reading.retry_after == pytest.approx(120, abs=1)
    for attempts in range(4):  # backoff alone would be a few seconds at most
        outcome, _ = outcome_of(reading, attempts=attempts)
        assert isinstance(outcome, Retry)
        assert outcome.at >= NOW + 119
        assert "FREQUENCY_LIMITED" in outcome.reason


def test_retry_after_does_not_shorten_a_longer_backoff(keys: Mapping[str, RSAPublicKey]) -> None:
    answer = signed(429, b"", timestamp=NOW, headers={"Retry-After": "1"})
    reading = policy.read(ENTRY, answer, keys, NOW)
    ats = [outcome_of(reading, attempts=12)[0] for _ in range(3)]
    assert all(isinstance(o, Retry) and o.at >= NOW + 1 for o in ats)


# -- backoff ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [0, 1, 2, 3, 5, 8, 9, 12, 40])
def test_backoff_is_full_jitter_from_1s_doubling_to_5min(attempts: int) -> None:
    r = random.Random(attempts)
    ceiling = min(policy.BACKOFF_CAP_S, policy.BACKOFF_BASE_S * 2**attempts)
    delays = [policy.backoff(attempts, r) for _ in range(400)]
    assert all(policy.BACKOFF_BASE_S / 2 <= d <= ceiling for d in delays)
    assert max(delays) > 0.9 * ceiling  # spread up to the ceiling …
    if ceiling >= 8:
        assert min(delays) < 0.1 * ceiling  # … and down towards 0 (full jitter, not "equal jitter")


def test_backoff_is_capped_at_five_minutes() -> None:
    r = random.Random(1)
    assert max(policy.backoff(n, r) for n in range(100) for _ in range(20)) <= 300.0
    assert policy.BACKOFF_CAP_S == 300.0


def test_backoff_is_reproducible_with_a_seed() -> None:
    a, b = random.Random(5), random.Random(5)
    assert [policy.backoff(n, a) for n in range(10)] == [policy.backoff(n, b) for n in range(10)]


# -- the throttle -----------------------------------------------------------------------------------

RETRY = Retry(NOW + 1, "HTTP 503")
PAUSE = Pause(policy.Scope.ALL, "HTTP 401 SIGN_ERROR", "SIGN_ERROR", "签名错误")


def test_no_hold_before_three_failures_in_a_row() -> None:
    t = Throttle(rng=rng())
    for _ in range(2):
        t.record(RETRY, 10.0)
        assert t.wait(10.0) == 0
    t.record(RETRY, 10.0)
    assert 0 < t.wait(10.0) <= policy.BACKOFF_BASE_S


def test_a_success_resets_the_failure_count() -> None:
    t = Throttle(rng=rng())
    outcomes: list[policy.Outcome] = [RETRY, RETRY, Sent("WX"), RETRY, RETRY]
    for outcome in outcomes:
        t.record(outcome, 10.0)
    assert t.wait(10.0) == 0


def test_holds_escalate_with_further_failures_and_are_capped() -> None:
    t = Throttle(rng=random.Random(3))
    mono, holds = 0.0, []
    for _ in range(40):
        t.record(RETRY, mono)
        hold = t.wait(mono)
        if hold:
            holds.append(hold)
            mono += hold  # the next answer arrives once the hold is over
    assert holds and max(holds) <= policy.HOLD_CAP_S + 1e-9
    assert max(holds[-10:]) > 4 * max(holds[:2])  # later holds can be much longer than the first


def test_answers_in_flight_during_a_hold_do_not_escalate_it() -> None:
    t = Throttle(rng=rng())
    for _ in range(3):
        t.record(RETRY, 10.0)
    failures = t.failures
    for _ in range(5):
        t.record(RETRY, 10.1)
    assert t.failures == failures
    # still the first level's hold (at most 1 s), measured from the last answer, not a longer one
    assert t.hold_until <= 10.1 + policy.BACKOFF_BASE_S


def test_retry_after_holds_everything_at_once() -> None:
    t = Throttle(rng=rng())
    t.record(RETRY, 10.0, retry_after=30.0)
    assert t.wait(10.0) == pytest.approx(30.0)
    assert t.wait(39.0) == pytest.approx(1.0)
    assert t.wait(40.0) == 0


def test_pause_escalates_doubling_from_5s_to_5min() -> None:
    t = Throttle(rng=random.Random(11))
    mono = 0.0
    for level in range(12):
        t.record(PAUSE, mono)
        assert t.paused(mono)
        length = t.wait(mono)
        full = min(policy.PAUSE_CAP_S, policy.PAUSE_BASE_S * 2**level)
        assert 0.8 * full <= length <= full, level
        mono += length  # the pause runs out; the next attempt is refused again
        assert not t.paused(mono)


def test_answers_arriving_during_a_pause_join_it() -> None:
    t = Throttle(rng=rng())
    t.record(PAUSE, 0.0)
    until = t.paused_until
    for n in range(5):
        t.record(replace(PAUSE, reason=f"in flight {n}", field="parking_id"), 1.0 + n * 0.1)
    assert t.paused_until == until
    assert (t.pause_cause, t.pause_field) == ("in flight 4", "parking_id")
    assert until is not None
    t.record(PAUSE, until)  # the next refusal after the pause: the second level (10 s)
    assert t.wait(until) >= 0.8 * 2 * policy.PAUSE_BASE_S


def test_lift_ends_a_pause_now() -> None:
    t = Throttle(rng=rng())
    t.record(replace(PAUSE, field="parking_id"), 0.0)
    t.lift()
    assert not t.paused(0.0)
    assert t.wait(0.0) == 0
    assert (t.pause_cause, t.pause_field) == (None, "")


def test_a_success_ends_a_pause_and_its_escalation() -> None:
    t = Throttle(rng=rng())
    t.record(PAUSE, 0.0)
    t.record(PAUSE, 10.0)
    t.record(Sent("WX"), 11.0)
    assert not t.paused(11.0)
    t.record(PAUSE, 12.0)
    assert t.wait(12.0) <= policy.PAUSE_BASE_S


# -- transitions ------------------------------------------------------------------------------------

ALLOWED = {
    (State.PENDING, Event.DISPATCH): State.IN_FLIGHT,
    (State.IN_FLIGHT, Event.SENT): State.SENT,
    (State.IN_FLIGHT, Event.RETRY): State.PENDING,
    (State.IN_FLIGHT, Event.DEAD): State.DEAD,
    (State.PENDING, Event.EXPIRE): State.DEAD,
    (State.DEAD, Event.REQUEUE): State.PENDING,
    (State.PENDING, Event.REQUEUE): State.PENDING,
    (State.DEAD, Event.REVIVE): State.PENDING,
}


@pytest.mark.parametrize(("start", "event"), list(ALLOWED), ids=lambda x: str(x))
def test_allowed_transitions(start: State, event: Event) -> None:
    assert policy.transition(start, event) is ALLOWED[(start, event)]


@pytest.mark.parametrize(
    ("start", "event"),
    [pair for pair in itertools.product(State, Event) if pair not in ALLOWED],
    ids=lambda x: str(x),
)
def test_every_other_transition_is_illegal(start: State, event: Event) -> None:
    with pytest.raises(IllegalTransition, match=f"{event.value} is not allowed from {start.value}"):
        policy.transition(start, event)


def test_the_table_is_exactly_the_allowed_set() -> None:
    assert dict(policy.TRANSITIONS) == ALLOWED


def test_a_sent_request_never_changes_again() -> None:
    for event in Event:
        with pytest.raises(IllegalTransition):
            policy.transition(State.SENT, event)


def test_sources_are_journal_states() -> None:
    """`in_flight` is `pending` on disk; rejected rows (never requests) are in no event's sources."""
    assert policy.sources(Event.DISPATCH) == ("pending",)
    assert policy.sources(Event.SENT) == ("pending",)
    assert policy.sources(Event.RETRY) == ("pending",)
    assert policy.sources(Event.DEAD) == ("pending",)
    assert policy.sources(Event.EXPIRE) == ("pending",)
    assert policy.sources(Event.REQUEUE) == ("dead", "pending")
    assert policy.sources(Event.REVIVE) == ("dead",)
    assert all("rejected" not in policy.sources(e) and "sent" not in policy.sources(e) for e in Event)


@pytest.mark.parametrize(
    ("outcome", "event"),
    [(Sent("WX"), Event.SENT), (RETRY, Event.RETRY), (PAUSE, Event.RETRY), (Dead("C", "m", "", "r"), Event.DEAD)],
    ids=["sent", "retry", "pause", "dead"],
)
def test_each_outcome_makes_its_transition(outcome: policy.Outcome, event: Event) -> None:
    assert policy.outcome_event(outcome) is event


def test_the_lot_query_expects_a_document(keys: Mapping[str, RSAPublicKey]) -> None:
    doc = {"enabled_state": "ENABLED_STATE_ENABLED"}
    outcome, _ = outcome_of(policy.read(LOT, signed(200, doc, timestamp=NOW), keys, NOW))
    assert isinstance(outcome, Sent)
    assert outcome.document == doc
