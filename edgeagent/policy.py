"""Answers → outcomes, and the life of a request: the one place that decides what happens next (SPEC §5).

Pure: values in, values out; time, keys and randomness are passed in.

    reading   `read(spec, reply, keys, now)` says what an answer IS: accepted, refused by the API for
              the request's own data or for a config value, a duplicate number, a transient failure,
              an answer that does not verify, …  (a `Verdict`)
    deciding  `decide(verdict, attempts, history, now, rng)` says what to DO, as a typed `Outcome`:
              `Sent`, `Retry(at, reason)`, `Pause(scope, reason)`, `Dead(code, message, detail)`,
              given the run of answers before it (`History`: the same 400 code on several different
              requests in a row, or a run of 2xx answers that fail verification, is the lot's or the
              key's problem, not each request's)
    pacing    `Throttle`: the delivery loop's global hold (repeated failures, Retry-After) and pause
              (escalating 5 s → 5 min while a config, key or clock problem stands)
    states    `TRANSITIONS`: every state change a journaled request may make, in one table; the
              journal's SQL is derived from it (`sources`)

By what fixes it:
    Sent      verified 2xx of the kind's expected shape; or a duplicate-number refusal (the number is
              minted from this journal's random epoch and this box's prefix, so only an earlier
              attempt of ours can have used it: that attempt was accepted, its serial_number unknown)
    Retry     network, timeout, dropped connection, 202, 429, 5xx, unexpected status, 2xx that does
              not verify (once or twice): full-jitter backoff 1 s → 5 min, never before Retry-After
    Pause     401, 403, 404, an untrusted TLS certificate, a 400 naming a config value (parking_id,
              an entrance's number or name, a discount template), the same 400 code on REPEAT_RUN
              different requests in a row, REPEAT_RUN 2xx answers in a row that fail verification:
              everything stays pending, no attempt counted; status shows the cause
    Dead      any other 400: the API's code, message and detail, for `edgeagent retry` after a fix
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from edgeagent import wechatpay
from edgeagent.errors import ResponseUnverified
from edgeagent.requests import Expect, KindSpec

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
PAUSE_BASE_S = 5.0
PAUSE_CAP_S = 300.0
HOLD_AFTER_FAILURES = 3  # failures in a row before the whole loop slows down
HOLD_CAP_S = 30.0
REPEAT_RUN = 3  # the same 400 code on this many different requests in a row: not the requests' fault
DUPLICATE_WORDS = ("重复", "duplicate")  # "…订单号重复": a number the API has already seen


# -- what came back ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer as received: status, headers (lower-case names), raw body, where and when."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    base_url: str = ""
    sent_at: float = 0.0  # system clock when the request left, and when the answer was in
    received_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Failure:
    """No answer: the connection failed, timed out or was dropped. `blocked`: an untrusted certificate."""

    reason: str
    blocked: bool = False


Reply = Answer | Failure


class Verdict(enum.StrEnum):
    """What an answer is, before history is taken into account."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # refused as an already used number
    REFUSED = "refused"  # 400 about the request's own data
    CONFIG = "config"  # 400 naming a value that comes from the config
    BLOCKED = "blocked"  # 401, 403, 404, untrusted TLS
    TRANSIENT = "transient"  # network, 202, 429, 5xx, unexpected
    UNVERIFIED = "unverified"  # a 2xx that does not verify


@dataclass(frozen=True, slots=True)
class Reading:
    """`read`'s account of one reply: the verdict and the API's own words."""

    verdict: Verdict
    summary: str
    status: int | None = None
    code: str = ""
    message: str = ""
    detail: str = ""
    field: str = ""
    request_id: str = ""
    retry_after: float | None = None
    serial_number: str | None = None
    document: Mapping[str, object] | None = None
    server_time: int | None = None  # a Wechatpay-Timestamp whose signature verified
    server_time_fresh: bool = False  # … and within 300 s of our clock
    unknown_serial: str | None = None  # signed with a key we do not hold (refresh certificates)


# -- what to do ----------------------------------------------------------------------------------


class Scope(enum.StrEnum):
    """What a pause holds back."""

    ALL = "all"  # every request: a key, clock, auth, TLS or lot-config problem


@dataclass(frozen=True, slots=True)
class Sent:
    """Delivered: verified, or refused as a duplicate of an earlier accepted attempt (`duplicate`)."""

    serial_number: str | None = None
    duplicate: bool = False
    request_id: str = ""
    document: Mapping[str, object] | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """Try the same request again at `at` (the corrected clock); `counted`: an attempt was spent."""

    at: float
    reason: str
    request_id: str = ""
    unverified: bool = False


@dataclass(frozen=True, slots=True)
class Pause:
    """Hold delivery (`scope`) until the cause is fixed; the request stays pending, no attempt counted."""

    scope: Scope
    reason: str
    code: str = ""
    message: str = ""
    field: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Dead:
    """The API refused this request for good; `edgeagent retry` after a fix."""

    code: str
    message: str
    detail: str
    reason: str
    request_id: str = ""


Outcome = Sent | Retry | Pause | Dead


@dataclass(frozen=True, slots=True)
class History:
    """The run of answers that came before: what makes a repeated refusal the lot's problem."""

    refusal_code: str = ""  # the 400 code of the current run of refusals
    refused_ids: frozenset[int] = field(default_factory=frozenset)  # the different requests in that run
    unverified_run: int = 0  # 2xx answers in a row that did not verify
    revive: tuple[int, ...] = ()  # requests dead-lettered earlier in a run that turned into a pause


def backoff(attempts: int, rng: random.Random) -> float:
    """Full jitter (AWS): uniform(0, min(cap, base·2^n)), floored at half the base so nothing spins."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempts, 20))
    return max(BACKOFF_BASE_S / 2, rng.uniform(0, ceiling))


def _words(body: bytes) -> tuple[str, str, str, str]:
    """(code, message, detail as JSON text, field) from an error body; fields may be missing or odd (§4.1)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return "", "", "", ""
    if not isinstance(doc, dict):
        return "", "", "", ""
    code, message = (v if isinstance(v := doc.get(k), str) else "" for k in ("code", "message"))
    raw = doc.get("detail")
    detail = "" if raw is None else json.dumps(raw, ensure_ascii=False)
    name = ""
    while isinstance(raw, dict) and not name:  # `detail` may be nested (a real SIGN_ERROR: detail.detail)
        found = raw.get("field")
        name = found.lstrip("/").split("/")[0] if isinstance(found, str) else ""  # a JSON pointer or a name
        raw = raw.get("detail")
    return code, message, detail, name


def read(spec: KindSpec, reply: Reply, keys: Mapping[str, RSAPublicKey], now: float) -> Reading:
    """What one reply to a request of kind `spec` is (verification included), as a `Reading`."""
    if isinstance(reply, Failure):
        return Reading(Verdict.BLOCKED if reply.blocked else Verdict.TRANSIENT, reply.reason)
    status, request_id = reply.status, reply.headers.get("request-id", "")
    server_time, fresh, unknown = None, False, None
    unverified = ""
    try:
        server_time, fresh = wechatpay.verify_response(reply.headers, reply.body, keys, now), True
    except wechatpay.StaleAnswer as exc:
        server_time, unverified = exc.timestamp, exc.summary
    except wechatpay.UnknownSerial as exc:
        unknown, unverified = exc.unknown_serial, exc.summary
    except ResponseUnverified as exc:
        unverified = exc.summary
    base = Reading(
        Verdict.TRANSIENT, "", status, request_id=request_id, server_time=server_time,
        server_time_fresh=fresh, unknown_serial=unknown,
    )  # fmt: skip
    if 200 <= status < 300 and status != 202:
        if not fresh:  # only verified answers count (§3.2)
            return replace(base, verdict=Verdict.UNVERIFIED, summary=f"HTTP {status} {unverified}")
        return _accepted(spec, base, reply.body)
    code, message, detail, name = _words(reply.body)
    if code or message:
        summary = f"HTTP {status} {code}".rstrip() + (f": {message}" if message else "")
    else:
        text = " ".join(reply.body.decode("utf-8", "replace").split())[:200]
        summary = f"HTTP {status} with a non-JSON body: {text}" if text else f"HTTP {status} with an empty body"
    words = replace(base, summary=summary, code=code, message=message, detail=detail, field=name)
    if status == 400:
        if any(word in message for word in DUPLICATE_WORDS):
            return replace(words, verdict=Verdict.DUPLICATE)
        named = name or next((f for f in sorted(spec.config_fields) if f in message), "")
        if named in spec.config_fields:
            return replace(words, verdict=Verdict.CONFIG, field=named)
        return replace(words, verdict=Verdict.REFUSED)
    if status in (401, 403, 404):
        return replace(words, verdict=Verdict.BLOCKED)
    # 202, 429, 5xx and anything unexpected: the same request again later (§4.3); a 5xx may carry
    # SYSTEM_ERROR for a wrong mchid or serial (§4.2), so its words are kept for status.
    return replace(words, retry_after=wechatpay.retry_after(reply.headers.get("retry-after"), now))


def _accepted(spec: KindSpec, base: Reading, body: bytes) -> Reading:
    """A verified 2xx of the shape `spec` expects, or a transient failure that says what was wrong."""
    status = base.status
    if spec.expect is Expect.EMPTY:
        if status == 204 or not body.strip(b" \r\n{}"):
            return replace(base, verdict=Verdict.ACCEPTED, summary=f"HTTP {status}")
        return replace(base, summary=f"HTTP {status} with a body where none was expected")
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return replace(base, summary=f"HTTP {status} without a JSON document")
    if spec.expect is Expect.DOCUMENT:
        return replace(base, verdict=Verdict.ACCEPTED, summary=f"HTTP {status}", document=doc)
    serial = doc.get("serial_number")
    if isinstance(serial, str) and serial:
        return replace(base, verdict=Verdict.ACCEPTED, summary=f"HTTP {status}", serial_number=serial)
    return replace(base, summary=f"HTTP {status} without serial_number")


def teaches_clock(reading: Reading) -> bool:
    """Whether `reading` may teach us the API's clock (SPEC §5): its signature verified, and, when its
    timestamp is stale, it is not a 2xx. The API accepts a request only when our timestamp is within
    300 s of its clock, so a 2xx signed more than 300 s off ours contradicts itself: a replayed or
    broken answer, never evidence. A stale refusal (401: "timestamp off") is the API telling us."""
    if reading.server_time is None:
        return False
    return reading.server_time_fresh or not (reading.status is not None and 200 <= reading.status < 300)


def decide(
    reading: Reading, *, request: int, attempts: int, history: History, now: float, rng: random.Random
) -> tuple[Outcome, History]:
    """What to do with request `request` after `reading`, and the history that follows (SPEC §5)."""
    v = reading.verdict
    ids = reading.request_id
    if v is Verdict.ACCEPTED:
        return Sent(reading.serial_number, request_id=ids, document=reading.document), History()
    if v is Verdict.DUPLICATE:
        return Sent(None, duplicate=True, request_id=ids), History()
    if v is Verdict.CONFIG:
        reason = f"{reading.summary} (field {reading.field} comes from the config: fix it, then retry --rebuild)"
        return _pause(reading, reason), replace(history, refusal_code="", refused_ids=frozenset())
    if v is Verdict.BLOCKED:
        return _pause(reading, reading.summary), history
    if v is Verdict.REFUSED:
        same = history.refusal_code == reading.code
        run = (history.refused_ids if same else frozenset()) | {request}
        if len(run) >= REPEAT_RUN:
            reason = (
                f"{reading.summary} (the same refusal for {len(run)} different requests in a row: "
                "a config or account problem, not the requests')"
            )
            revive = tuple(sorted(run - {request}))
            return _pause(reading, reason), History(reading.code, run, history.unverified_run, revive)
        dead = Dead(reading.code, reading.message, reading.detail, reading.summary, ids)
        return dead, History(reading.code, run, history.unverified_run)
    if v is Verdict.UNVERIFIED:
        unverified = history.unverified_run + 1
        if unverified >= REPEAT_RUN and reading.unknown_serial is None:
            reason = (
                f"{reading.summary} ({unverified} accepted-looking answers in a row failed verification: "
                "check wechatpay.platform_public_key and platform_public_key_id)"
            )
            return _pause(reading, reason), replace(history, unverified_run=unverified)
        delay = backoff(attempts, rng)
        retry = Retry(now + delay, f"response_unverified: {reading.summary}", ids, True)
        return retry, replace(history, unverified_run=unverified)
    delay = backoff(attempts, rng)
    if reading.retry_after is not None:
        delay = max(delay, reading.retry_after)
    reason = reading.summary + (f" request_id={ids}" if ids else "")
    return Retry(now + delay, reason, ids), history


def _pause(reading: Reading, reason: str) -> Pause:
    return Pause(Scope.ALL, reason, reading.code, reading.message, reading.field, reading.request_id)


def dead_reason(dead: Dead) -> str:
    """The one line kept in the journal for a dead request: the API's words and where to find it."""
    text = dead.reason
    if dead.detail:
        text += f" detail={dead.detail}"
    if dead.request_id:
        text += f" request_id={dead.request_id}"
    return text


# -- pacing --------------------------------------------------------------------------------------


@dataclass
class Throttle:
    """The delivery loop's global brakes, on the monotonic clock (`mono`) passed in.

    hold    after HOLD_AFTER_FAILURES failed answers in a row, or a Retry-After, nothing is sent
            until `hold_until`; answers to requests already in flight when a hold began are the
            same round of trouble and do not step it up again
    pause   a `Pause` outcome stops sending for 5 s, doubling to 5 min while the cause stands;
            answers arriving while a pause is in force join it instead of escalating it
    """

    rng: random.Random = field(default_factory=random.Random)
    hold_until: float = 0.0
    told_until: float = 0.0  # the part of the hold the API asked for (Retry-After): not even a round goes on
    failures: int = 0
    offline: bool = False  # the last outcome came with no answer at all
    pause_level: int = 0
    paused_until: float | None = None
    pause_cause: str | None = None
    pause_field: str = ""

    def paused(self, mono: float) -> bool:
        return self.paused_until is not None and self.paused_until > mono

    def troubled(self) -> bool:
        """Whether the uplink is down: failures in a row have reached the hold, the last without any answer.
        (An API answering 429 or 5xx is not down: each request keeps its own backoff then.)"""
        return self.offline and self.failures >= HOLD_AFTER_FAILURES

    def told(self, mono: float) -> bool:
        """Whether the API asked us to wait (Retry-After) and that wait is not over."""
        return self.told_until > mono

    def wait(self, mono: float) -> float:
        """Seconds until sending may resume (0: it may now)."""
        until = max(self.hold_until, self.paused_until or 0.0)
        return max(0.0, until - mono)

    def record(self, outcome: Outcome, mono: float, retry_after: float | None = None, *, offline: bool = False) -> None:
        """Take one outcome into account; `offline`: no answer at all came back (the uplink is down)."""
        self.offline = offline
        if isinstance(outcome, Sent):
            self.failures = self.pause_level = 0
            self.paused_until = None
            self.pause_cause, self.pause_field = None, ""
            return
        if isinstance(outcome, Pause):
            # The cause first: another thread (the heartbeat) reading a pause must find its cause.
            self.pause_cause, self.pause_field = outcome.reason, outcome.field
            if not self.paused(mono):
                pause = min(PAUSE_CAP_S, PAUSE_BASE_S * 2**self.pause_level) * self.rng.uniform(0.8, 1.0)
                self.pause_level = min(self.pause_level + 1, 10)
                self.paused_until = mono + pause
            return
        if isinstance(outcome, Retry):
            if mono >= self.hold_until:
                self.failures += 1
            if retry_after is not None:
                self.hold_until = max(self.hold_until, mono + retry_after)
                self.told_until = max(self.told_until, mono + retry_after)
            if self.failures >= HOLD_AFTER_FAILURES:
                hold = backoff(self.failures - HOLD_AFTER_FAILURES, self.rng)
                self.hold_until = max(self.hold_until, mono + min(hold, HOLD_CAP_S))

    def lift(self) -> None:
        """End a pause now (the technician re-queued requests after a fix)."""
        self.paused_until = None
        self.pause_cause, self.pause_field = None, ""


# -- the states of a journaled request -----------------------------------------------------------


class State(enum.StrEnum):
    """Journal row states (SPEC §6). `in_flight` lives in the delivery loop's memory only."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    SENT = "sent"
    DEAD = "dead"


class Event(enum.StrEnum):
    DISPATCH = "dispatch"  # the loop takes a due request
    SENT = "sent"  # a Sent outcome
    RETRY = "retry"  # a Retry or a Pause outcome: back to pending, due later or at once
    DEAD = "dead"  # a Dead outcome
    EXPIRE = "expire"  # max_entry_age_s passed while pending
    REQUEUE = "requeue"  # `edgeagent retry`: dead (or pending, with --all) → pending, due at once
    REVIVE = "revive"  # a run of refusals turned out to be a lot problem: its dead members come back


TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (State.PENDING, Event.DISPATCH): State.IN_FLIGHT,
    (State.IN_FLIGHT, Event.SENT): State.SENT,
    (State.IN_FLIGHT, Event.RETRY): State.PENDING,
    (State.IN_FLIGHT, Event.DEAD): State.DEAD,
    (State.PENDING, Event.EXPIRE): State.DEAD,
    (State.DEAD, Event.REQUEUE): State.PENDING,
    (State.PENDING, Event.REQUEUE): State.PENDING,
    (State.DEAD, Event.REVIVE): State.PENDING,
}


class IllegalTransition(ValueError):
    """A state change the table does not allow."""


def transition(state: State, event: Event) -> State:
    """The state after `event`, or IllegalTransition."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} is not allowed from {state.value}") from None


def sources(event: Event) -> tuple[str, ...]:
    """The journal states (`in_flight` is `pending` on disk) from which `event` may move a row."""
    found = {State.PENDING if s is State.IN_FLIGHT else s for (s, e) in TRANSITIONS if e is event}
    return tuple(sorted(s.value for s in found))


def outcome_event(outcome: Outcome) -> Event:
    """The transition an outcome makes."""
    if isinstance(outcome, Sent):
        return Event.SENT
    if isinstance(outcome, Dead):
        return Event.DEAD
    return Event.RETRY
