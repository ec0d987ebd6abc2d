"""The delivery loop: the outbox's pending requests → signed requests → typed outcomes → journal (SPEC §5).

Oldest first; at most `max_in_flight` requests at once (a small worker pool) and at most
`max_rate_per_s` dispatches per second (strict spacing, with headroom). Every attempt signs afresh (new
nonce, timestamp from the corrected clock) over the body stored in the journal, so a request keeps its
`out_serial_number` and its bytes for ever. What an answer means, and what happens next, is `policy`'s
decision; this loop only carries it out: it reads answers in its own thread, one at a time, so the
history of answers (a run of refusals, of unverified answers) is seen in order.

Steppable: `step()` does one round and returns how long the loop may sleep; every time read goes through
the injected `Clock`, and the worker pool is injectable, so tests drive it by hand (tests/unit).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from edgeagent import policy, requests, wechatpay
from edgeagent.clock import Clock
from edgeagent.config import Config
from edgeagent.errors import DeliveryError, JournalError
from edgeagent.journal import Due, Journal, Marked
from edgeagent.platform_keys import PlatformKeys
from edgeagent.policy import Answer, Failure, Reply
from edgeagent.requests import KINDS
from edgeagent.status import iso as _iso
from edgeagent.uplink import USER_AGENT

log = logging.getLogger(__name__)

EXPIRE_EVERY_S = 60.0
# The API counts arrivals, not our dispatches: at a spacing of exactly 1/max_rate_per_s, a request that
# arrives a few ms later than its successors (a TLS handshake, network jitter) puts max_rate_per_s + 1
# requests into one 1 s window at the server. Pacing 10 % below the ceiling absorbs 0.1 s of jitter.
RATE_HEADROOM = 1.1
CORRECT_TIMES_EVERY_S = 30.0
REQUEUE_LOOK_EVERY_S = 1.0  # while paused: did a technician re-queue after a fix?
# Answers are written to the journal together (one fsync for many, and the delivery loop refills free
# slots before it commits): when nothing else is in flight, else once MARK_BATCH are waiting or the
# oldest has waited MARK_WINDOW_S. A crash in between re-sends those requests with the same
# out_serial_number and body, which the API answers idempotently (SPEC §1.2), or refuses as a duplicate
# number, which `policy` counts as delivered.
MARK_BATCH = 64
MARK_WINDOW_S = 0.1

Send = Callable[[str, str, dict[str, str], bytes], Reply]


@dataclass
class UplinkView:
    """What `status` shows of the uplink; written only by the delivery loop thread."""

    last_success_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    last_error_code: str | None = None
    last_error_message: str | None = None
    last_request_id: str | None = None
    attempts: int = 0
    sent: int = 0
    duplicates: int = 0
    response_unverified: int = 0


@dataclass(frozen=True, slots=True)
class _Answered:
    """A finished attempt, as the worker hands it to the loop thread."""

    due: Due
    reply: Reply


class DeliveryLoop:
    """Named, stoppable loop; `step()` does one round so tests can drive it by hand."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        send: Send,
        keys: PlatformKeys,
        private_key: RSAPrivateKey,
        clock: Clock,
        *,
        executor: Executor | None = None,
        base_url: Callable[[], str] | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.journal = journal
        self.send = send
        self.keys = keys
        self.private_key = private_key
        self.clock = clock
        self.view = UplinkView()
        self._base_url = base_url or (lambda: config.wechatpay.base_url)
        self._rng = random.Random(seed)
        self.throttle = policy.Throttle(rng=self._rng)
        self.history = policy.History()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._results: queue.Queue[_Answered] = queue.Queue()
        self._fresh: deque[Due] = deque()  # journaled a moment ago by ingest, handed over directly
        self._ready: deque[Due] = deque()  # taken for sending, waiting for their rate slots
        self._backlog = True  # until due() says otherwise, older requests may be waiting
        self._in_flight: set[int] = set()
        self._unmarked: dict[int, Marked] = {}  # answered, not yet journaled
        self._unmarked_since = 0.0
        self._executor = executor or ThreadPoolExecutor(
            max_workers=config.wechatpay.max_in_flight, thread_name_prefix="deliver"
        )
        self._spacing = RATE_HEADROOM / config.wechatpay.max_rate_per_s
        self._next_slot = 0.0
        self._paused_at_system: float | None = None
        self._next_expire = 0.0
        self._next_time_check = 0.0
        self._next_requeue_look = 0.0
        self.times_corrected = 0
        self._progress = clock.monotonic()
        self.journal_error: str | None = None

    # -- Worker protocol -----------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def last_progress(self) -> float:
        return self._progress

    def wake(self) -> None:
        """Look for due requests now."""
        self._wake.set()

    def offer(self, fresh: list[Due]) -> None:
        """Requests ingest has just committed: sent at once when nothing older waits (no `due()` query)."""
        self._fresh.extend(fresh)
        self._wake.set()

    def runtime_status(self) -> dict[str, Any]:
        v, t = self.view, self.throttle
        mono = self.clock.monotonic()
        paused_until, cause, field = t.paused_until, t.pause_cause, t.pause_field  # one consistent reading
        paused = paused_until is not None and paused_until > mono and cause is not None
        until = self.clock.system() + (paused_until - mono) if paused and paused_until is not None else None
        return {
            "last_success_at": _iso(v.last_success_at),
            "last_error": v.last_error,
            "last_error_at": _iso(v.last_error_at),
            "last_error_code": v.last_error_code,
            "last_error_message": v.last_error_message,
            "last_request_id": v.last_request_id,
            "base_url_in_use": self._base_url(),
            "paused": paused,
            "pause_cause": cause if paused else None,
            "pause_field": (field or None) if paused else None,
            "paused_until": _iso(until),
            "in_flight": len(self._in_flight),
            "attempts": v.attempts,
            "sent": v.sent,
            "duplicates": v.duplicates,
            "response_unverified": v.response_unverified,
            "mode": "platform_certificate" if self.keys.certificate_mode else "public_key",
            "journal_error": self.journal_error,
            "times_corrected": self.times_corrected,
        }

    def run(self) -> None:
        log.info(
            "delivery_started max_in_flight=%d max_rate_per_s=%g",
            self.config.wechatpay.max_in_flight,
            self.config.wechatpay.max_rate_per_s,
        )
        if self.keys.certificate_mode:
            try:
                self.keys.ensure()
            except DeliveryError as exc:
                log.warning("platform_certificates_refresh_failed error=%s", exc.summary)
        while not self._stop.is_set():
            wait = self.step()
            self._wake.wait(wait)
            self._wake.clear()
        self._executor.shutdown(wait=True, cancel_futures=False)
        self._collect_results()
        self._mark(force=True)
        log.info("delivery_stopped sent=%d", self.view.sent)

    # -- one round -------------------------------------------------------------------------------

    def step(self) -> float:
        """Take finished attempts, dispatch due requests, journal the answers; returns how long the loop may sleep."""
        self._progress = self.clock.monotonic()
        self._collect_results()
        wait = self._dispatch()
        self._mark(force=False)
        if self._unmarked:
            wait = min(wait, max(0.0, self._unmarked_since + MARK_WINDOW_S - self.clock.monotonic()))
        return wait

    def _housekeeping(self, mono: float) -> None:
        if mono >= self._next_expire:
            self._next_expire = mono + EXPIRE_EVERY_S
            # received_at is the system clock's reading at receipt: measure the age on that clock. On
            # the API's clock, a board that booted days behind would expire entries seconds old.
            self._expire(self.clock.system())
        if mono >= self._next_time_check and self.clock.offset is not None:
            # Entries skipped because they were on the wire are looked at again next round, not in 30 s:
            # the answer that taught us the offset is usually about one of them.
            skipped = self._correct_times()
            self._next_time_check = mono + (0.0 if skipped else CORRECT_TIMES_EVERY_S)
        if self.throttle.paused(mono) and mono >= self._next_requeue_look and self._paused_at_system is not None:
            self._next_requeue_look = mono + REQUEUE_LOOK_EVERY_S
            try:
                requeued = self.journal.requeued_since(self._paused_at_system)
            except JournalError:
                requeued = False
            if requeued:  # `edgeagent retry` after a fix: try again now, not at the end of the pause
                log.info("delivery_pause_lifted cause=requeued")
                self.throttle.lift()
                self._paused_at_system = None

    def _dispatch(self) -> float:
        mono = self.clock.monotonic()
        self._housekeeping(mono)
        if self.throttle.paused(mono) or self.throttle.told(mono):
            # A pause (a key, clock, auth or config problem) stops even the round in progress: every
            # request would meet the same refusal. So does a Retry-After: the API asked us to wait.
            # They stay pending; due() finds them again afterwards.
            self._fresh.clear()
            self._ready.clear()
            return min(1.0, self.throttle.wait(mono))
        hold = self.throttle.wait(mono)
        if hold > 0 and not self._ready:
            # Our own hold after repeated failures delays the next round; the round already taken goes
            # out at its rate slots, as it would have had its answers come back a little later.
            self._fresh.clear()
            return min(1.0, hold)
        free = self.config.wechatpay.max_in_flight - len(self._in_flight)
        if free <= 0:
            return 1.0
        busy = {*self._in_flight, *self._unmarked}
        if not self._ready:
            self._ready.extend(self._take(free, busy))
        dispatched = 0
        while self._ready and dispatched < free:
            mono = self.clock.monotonic()
            if self._next_slot > mono:
                # Not yet: the rest of this batch goes at the next slots, in order, without a new query
                # (a request answered meanwhile, e.g. paused and due again at once, must not jump ahead).
                return self._next_slot - mono
            due = self._ready.popleft()
            if due.id in busy:
                continue
            self._next_slot = max(self._next_slot, mono) + self._spacing
            self._in_flight.add(due.id)
            self._executor.submit(self._attempt, due)
            dispatched += 1
        if dispatched:
            return 0.0 if dispatched == free else 0.05
        next_at = self.journal.next_due_at()
        return 1.0 if next_at is None else max(0.01, min(1.0, next_at - self.clock.now()))

    def _take(self, free: int, busy: set[int]) -> list[Due]:
        """The next requests to send: fresh entries handed over by ingest when nothing older waits, else
        the journal's due requests, oldest first."""
        batch: list[Due] = []
        if self._fresh and not self._backlog:
            while self._fresh and len(batch) < free:
                item = self._fresh.popleft()
                if item.id not in busy:
                    batch.append(item)
        self._fresh.clear()  # the rest (if any) is older work's turn: due() has them
        if batch:
            return batch
        try:
            if self.throttle.troubled():
                # The uplink is down: one probe at a time, and always the oldest pending request, so that
                # when it comes back the backlog drains oldest first (SPEC §5).
                return self.journal.oldest(exclude=tuple(busy))
            batch = self.journal.due(self.clock.now(), free, exclude=tuple(busy))
        except JournalError as exc:
            self.journal_error = str(exc)
            return []
        self._backlog = len(batch) == free
        return batch

    def _attempt(self, due: Due) -> None:
        """One signed request of one row, in a pool thread. Never raises: the reply goes on the queue."""
        try:
            reply = self._send(due)
            serial = reply.headers.get("wechatpay-serial") if isinstance(reply, Answer) else None
            if serial and self.keys.certificate_mode and serial not in self.keys.keys:
                # Signed under a certificate we do not hold yet: fetch them before the loop reads the answer.
                self._refresh_certificates()
        except Exception as exc:  # a bug must not lose the request: it stays pending and is retried
            log.exception("delivery_attempt_crashed id=%d", due.id)
            reply = Failure(f"internal error: {exc}")
        self._results.put(_Answered(due, reply))
        self._wake.set()

    def _send(self, due: Due) -> Reply:
        wx = self.config.wechatpay
        spec = KINDS[due.kind]
        headers = wechatpay.request_headers(
            key=self.private_key,
            mchid=wx.mchid,
            serial_no=wx.merchant_serial_no,
            body=due.body,
            timestamp=int(self.clock.now()),
            nonce=wechatpay.new_nonce(),
            wechatpay_serial=self.keys.request_serial,
            user_agent=USER_AGENT,
            method=spec.method,
            target=spec.path,
        )
        return self.send(spec.method, spec.path, headers, due.body)

    def _refresh_certificates(self) -> None:
        try:
            self.keys.refresh()
        except DeliveryError as exc:
            log.warning("platform_certificates_refresh_failed error=%s", exc.summary)

    # -- outcomes --------------------------------------------------------------------------------

    def _collect_results(self) -> None:
        """Finished attempts leave the in-flight set (their slots are free), are judged in arrival order,
        and wait in `_unmarked`, out of `due()`'s reach, until `_mark` journals them."""
        while True:
            try:
                answered = self._results.get_nowait()
            except queue.Empty:
                return
            self._in_flight.discard(answered.due.id)
            self.view.attempts += 1
            if not self._unmarked:
                self._unmarked_since = self.clock.monotonic()
            self._unmarked[answered.due.id] = self._judge(answered)

    def _judge(self, answered: _Answered) -> Marked:
        due, reply = answered.due, answered.reply
        spec = KINDS[due.kind]
        now = self.clock.now()
        reading = policy.read(spec, reply, self.keys.keys, now)
        corrected = False
        if isinstance(reply, Answer) and policy.teaches_clock(reading):
            # Only a verified signature teaches us the API's clock (SPEC §5); a stale one needs company.
            corrected = self.clock.witness(
                reading.server_time or 0, reply.sent_at, reply.received_at, fresh=reading.server_time_fresh
            )
            if corrected and self.throttle.paused(self.clock.monotonic()):
                # Our clock was the cause of the 401s: sign again now with the corrected time.
                log.info("delivery_pause_lifted cause=clock_corrected offset_s=%.1f", self.clock.offset or 0.0)
                self.throttle.lift()
            now = self.clock.now()
        outcome, self.history = policy.decide(
            reading, request=due.id, attempts=due.attempts, history=self.history, now=now, rng=self._rng
        )
        if isinstance(outcome, policy.Sent) and outcome.serial_number:
            outcome = self._unique_serial(due, outcome, now)
        mono = self.clock.monotonic()
        was_paused = self.throttle.paused(mono)
        if isinstance(outcome, policy.Sent) and self.throttle.troubled():
            # The first success after an outage: the backlog is due now, and goes out oldest first.
            self._wake_backlog(now)
        if not (corrected and isinstance(outcome, policy.Pause)):
            # (A refusal that corrected our clock is already answered: the request is due again at once,
            # signed with the right time; pausing for it would only wait out the cause just removed.)
            self.throttle.record(outcome, mono, reading.retry_after, offline=isinstance(reply, Failure))
        if isinstance(outcome, policy.Pause) and not was_paused and self.throttle.paused(mono):
            self._paused_at_system = self.clock.system()
            log.warning("delivery_paused cause=%r", outcome.reason)
        if self.history.revive:
            # The run's earlier members may have been answered in this same round, their Dead outcomes
            # not journaled yet: journal them first, or revive() finds nothing dead and they stay dead.
            self._mark(force=True)
            self._revive(self.history.revive)
            self.history = dataclasses.replace(self.history, revive=())
        self._account(due, reading, outcome)
        uncertain = isinstance(outcome, policy.Retry) and reading.verdict in (
            policy.Verdict.TRANSIENT,
            policy.Verdict.UNVERIFIED,
        )
        # On the API's clock, like the camera times we report: latency as WeChat measures it.
        answered_at = reply.received_at + (self.clock.offset or 0.0) if isinstance(reply, Answer) else None
        return Marked(due.id, outcome, answered_at, uncertain)

    def _unique_serial(self, due: Due, sent: policy.Sent, now: float) -> policy.Outcome:
        """A serial_number WeChat gave another request cannot confirm this one: a replayed answer."""
        owner = next(
            (
                i
                for i, m in self._unmarked.items()
                if i != due.id and isinstance(m.outcome, policy.Sent) and m.outcome.serial_number == sent.serial_number
            ),
            None,
        )
        if owner is None:
            try:
                owner = self.journal.serial_owner(sent.serial_number or "")
            except JournalError:
                owner = None
        if owner is None or owner == due.id:
            return sent
        reason = (
            f"response_unverified: serial_number {sent.serial_number} already belongs to #{owner} (a replayed answer?)"
        )
        log.warning("answer_refused id=%d reason=%r", due.id, reason)
        return policy.Retry(now + policy.backoff(due.attempts, self._rng), reason, sent.request_id, True)

    def _account(self, due: Due, reading: policy.Reading, outcome: policy.Outcome) -> None:
        v = self.view
        status = reading.status if reading.status is not None else "-"
        if isinstance(outcome, policy.Sent):
            v.sent += 1
            v.duplicates += int(outcome.duplicate)
            v.last_success_at = self.clock.system()
            v.last_error = v.last_error_code = v.last_error_message = None
            log.info(
                "delivery_attempt id=%d kind=%s out_serial_number=%s status=%s result=sent serial_number=%s%s",
                due.id,
                due.kind,
                due.out_serial_number,
                status,
                outcome.serial_number,
                " (duplicate number: accepted by an earlier attempt)" if outcome.duplicate else "",
            )
            return
        v.last_error = reading.summary
        v.last_error_code = reading.code or None
        v.last_error_message = reading.message or None
        v.last_error_at = self.clock.system()
        v.last_request_id = reading.request_id or v.last_request_id
        v.response_unverified += int(reading.verdict is policy.Verdict.UNVERIFIED)
        result = type(outcome).__name__.lower()
        log.info(
            "delivery_attempt id=%d kind=%s out_serial_number=%s status=%s result=%s error=%r",
            due.id,
            due.kind,
            due.out_serial_number,
            status,
            result,
            reading.summary,
        )

    def _wake_backlog(self, now: float) -> None:
        self._mark(force=True)  # answers gathered in this round first: their rows must not be woken twice
        try:
            woken = self.journal.wake_backlog(now)
        except JournalError as exc:
            log.warning("backlog_wake_failed error=%s", exc)
            return
        if woken:
            log.info("uplink_back backlog_due=%d", woken)

    def _revive(self, ids: tuple[int, ...]) -> None:
        try:
            revived = self.journal.revive(ids, self.clock.now())
        except JournalError as exc:
            log.warning("revive_failed ids=%s error=%s", ids, exc)
            return
        if revived:
            log.warning("requests_revived ids=%s cause=the same refusal on several requests", revived)

    def _mark(self, force: bool) -> None:
        """Journal the gathered answers in one transaction when due (see MARK_BATCH), or now if `force`."""
        if not self._unmarked:
            return
        waited = self.clock.monotonic() - self._unmarked_since
        if not (force or not self._in_flight or len(self._unmarked) >= MARK_BATCH or waited >= MARK_WINDOW_S):
            return
        marks = list(self._unmarked.values())
        while True:
            try:
                self.journal.mark_outcomes(marks, self.clock.now())
                self.journal_error = None
                self._unmarked.clear()
                return
            except JournalError as exc:
                # The answers are lost only from memory: the requests stay pending and are re-sent with
                # the same out_serial_number, which the API treats idempotently.
                if self.journal_error != str(exc):
                    log.error("journal_mark_failed error=%s rows=%d", exc, len(marks))
                self.journal_error = str(exc)
                # Waiting for disk space is progress of a kind: a restart would not help (no crash loop).
                self._progress = self.clock.monotonic()
                if self._stop.wait(1.0):
                    return

    def _correct_times(self) -> bool:
        """Re-time entries journaled with an unsynchronised clock, now that the API's clock is known.

        Only entries never attempted are touched (their body has never reached the API, so the same
        out_serial_number with a new body cannot conflict), and only within the boot they were
        received in: true receipt time = corrected now − (monotonic now − monotonic at receipt).
        Returns whether an entry was skipped because it was in flight or its answer not yet journaled.
        """
        skipped = False
        try:
            rows = self.journal.uncorrected_agent_times()
            mono_now, true_now = self.clock.monotonic(), self.clock.now()
            for row in rows:
                if row["id"] in self._in_flight or row["id"] in self._unmarked:
                    skipped = True
                    continue  # its old body may be on the wire right now, or already answered
                when = int(true_now - (mono_now - float(row["received_mono"])))
                request = dataclasses.replace(requests.parse_entry_body(bytes(row["body"])), enter_timestamp=when)
                if self.journal.correct_time(row["id"], when, requests.build_entry_body(request), true_now):
                    self.times_corrected += 1
                    log.info(
                        "entry_time_corrected id=%d out_serial_number=%s from=%d to=%d",
                        row["id"],
                        row["out_serial_number"],
                        row["enter_timestamp"],
                        when,
                    )
        except (JournalError, ValueError) as exc:
            log.warning("entry_time_correction_failed error=%s", exc)
        return skipped

    def _expire(self, now: float) -> None:
        try:
            expired = self.journal.expire(now, self.config.parking.max_entry_age_s)
        except JournalError as exc:
            self.journal_error = str(exc)
            return
        if expired:
            log.warning("entries_expired count=%d max_entry_age_s=%g", expired, self.config.parking.max_entry_age_s)
