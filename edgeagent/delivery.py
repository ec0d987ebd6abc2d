"""The delivery loop: pending entries → signed requests → verified outcomes → journal (SPEC §5).

Oldest first; at most `max_in_flight` requests at once (a small worker pool) and at most
`max_rate_per_s` dispatches per second (strict spacing, with headroom). Every attempt signs afresh (new nonce,
timestamp from the corrected clock) over the body stored in the journal, so an entry keeps its
`out_serial_number` and its bytes for ever. Outcomes are written in batches on this loop's own
journal connection; next-attempt times live in the journal, so a restart resumes the schedule.

    sent          verified 2xx with serial_number
    retry         network, timeout, 202, 429, 5xx, unverified answer: full-jitter backoff 1 s → 5 min,
                  never earlier than Retry-After; repeated failures also slow the whole loop down
    dead          400: the API's code, message and detail, for `edgeagent retry` after a fix
    pause         401, 403, 404: entries stay pending untouched; the loop pauses with backoff and
                  `status` shows why (a key, config or clock problem, not the entry's)
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from edgeagent import wechatpay
from edgeagent.clock import Clock
from edgeagent.config import Config
from edgeagent.errors import Blocked, DeliveryError, JournalError, KeyFileError, Permanent, ResponseUnverified
from edgeagent.journal import Journal, Pending
from edgeagent.status import iso
from edgeagent.uplink import USER_AGENT, Uplink

if TYPE_CHECKING:
    from edgeagent.daemon import Daemon

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
PAUSE_BASE_S = 5.0
PAUSE_CAP_S = 300.0
EXPIRE_EVERY_S = 60.0
# The API counts arrivals, not our dispatches: at a spacing of exactly 1/max_rate_per_s, a request that
# arrives a few ms later than its successors (a TLS handshake, network jitter) puts max_rate_per_s + 1
# requests into one 1 s window at the server. Pacing 10 % below the ceiling absorbs 0.1 s of jitter.
RATE_HEADROOM = 1.1
CORRECT_TIMES_EVERY_S = 30.0
# Answers are written to the journal together (one fsync for many, and the delivery loop refills free
# slots before it commits): when nothing else is in flight, else once MARK_BATCH are waiting or the
# oldest has waited MARK_WINDOW_S. A crash in between re-sends those entries with the same
# out_serial_number and body, which the API answers idempotently (SPEC §1.2).
MARK_BATCH = 64
MARK_WINDOW_S = 0.1
CERT_CACHE = "platform_certificates.json"


def backoff(attempts: int, rng: random.Random) -> float:
    """Full jitter (AWS): uniform(0, min(cap, base·2^n)), floored at half the base so nothing spins."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempts, 20))
    return max(BACKOFF_BASE_S / 2, rng.uniform(0, ceiling))


@dataclass
class UplinkView:
    """What `status` shows of the uplink; written only by the delivery loop thread."""

    last_success_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    last_request_id: str | None = None
    paused_until: float | None = None
    pause_cause: str | None = None
    attempts: int = 0
    sent: int = 0
    response_unverified: int = 0
    in_flight: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class PlatformKeys:
    """The keys that may sign WeChat Pay's answers: the public key (公钥模式) or platform certificates.

    Certificate mode fetches `GET /v3/certificates`, decrypts them with the APIv3 key, verifies the
    download with the certificates it carries, and caches the raw answer in the state dir.
    """

    def __init__(self, config: Config, uplink: Uplink, private_key: RSAPrivateKey, clock: Clock) -> None:
        wx = config.wechatpay
        self._config = config
        self._uplink = uplink
        self._private_key = private_key
        self._clock = clock
        self._lock = threading.Lock()
        self.keys: dict[str, RSAPublicKey] = {}
        self.request_serial = ""
        self._apiv3: bytes | None = None
        if wx.platform_public_key is not None:
            self.keys[wx.platform_public_key_id] = wechatpay.load_public_key(wx.platform_public_key.read_bytes())
            self.request_serial = wx.platform_public_key_id
        if wx.apiv3_key_file is not None:
            self._apiv3 = wx.apiv3_key_file.read_bytes().strip()
            if len(self._apiv3) != 32:
                raise KeyFileError(f"wechatpay.apiv3_key_file: the APIv3 key must be 32 bytes, got {len(self._apiv3)}")
            self._load_cache()

    @property
    def certificate_mode(self) -> bool:
        return self._apiv3 is not None

    def _cache_path(self) -> Path:
        return self._config.state_dir / CERT_CACHE

    def _load_cache(self) -> None:
        assert self._apiv3 is not None
        try:
            body = self._cache_path().read_bytes()
            self.keys.update(wechatpay.parse_certificates(body, self._apiv3))
        except (OSError, DeliveryError, ValueError, KeyError):
            return

    def refresh(self) -> None:
        """Fetch the platform certificates now (certificate mode only). Raises DeliveryError kinds."""
        if self._apiv3 is None:
            return
        with self._lock:
            wx = self._config.wechatpay
            timestamp, nonce = int(self._clock.now()), wechatpay.new_nonce()
            headers = wechatpay.request_headers(
                key=self._private_key,
                mchid=wx.mchid,
                serial_no=wx.merchant_serial_no,
                body=b"",
                timestamp=timestamp,
                nonce=nonce,
                wechatpay_serial="",
                user_agent=USER_AGENT,
                method="GET",
                target="/v3/certificates",
            )
            del headers["Content-Type"]
            answer = self._uplink.request("GET", "/v3/certificates", headers)
            if answer.status != 200:
                wechatpay.classify(answer.status, answer.headers, answer.body, self.keys, self._clock.now())
            fresh = wechatpay.parse_certificates(answer.body, self._apiv3)
            wechatpay.verify_response(answer.headers, answer.body, {**self.keys, **fresh}, self._clock.now())
            self.keys.update(fresh)
            tmp = self._cache_path().with_suffix(".tmp")
            tmp.write_bytes(answer.body)
            tmp.replace(self._cache_path())
            log.info("platform_certificates_refreshed serials=%s", ",".join(sorted(fresh)))


class DeliveryLoop:
    """Named, stoppable loop; `step()` does one round so tests can drive it by hand."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        uplink: Uplink,
        keys: PlatformKeys,
        private_key: RSAPrivateKey,
        clock: Clock,
        *,
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.journal = journal
        self.uplink = uplink
        self.keys = keys
        self.private_key = private_key
        self.clock = clock
        self.view = UplinkView()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._results: queue.Queue[tuple[int, str, dict[str, Any]]] = queue.Queue()
        self._in_flight: set[int] = set()
        self._unmarked: dict[int, tuple[int, str, dict[str, Any]]] = {}  # answered, not yet journaled
        self._unmarked_since = 0.0
        self._pool = ThreadPoolExecutor(max_workers=config.wechatpay.max_in_flight, thread_name_prefix="deliver")
        self._spacing = RATE_HEADROOM / config.wechatpay.max_rate_per_s
        self._next_slot = 0.0
        self._hold_until = 0.0  # global slow-down after repeated failures or a Retry-After
        self._failures = 0
        self._pause_level = 0
        self._next_expire = 0.0
        self._next_time_check = 0.0
        self.times_corrected = 0
        self._progress = time.monotonic()
        self.journal_error: str | None = None

    # -- Worker protocol -----------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def last_progress(self) -> float:
        return self._progress

    def wake(self) -> None:
        """Look for due entries now: ingest calls this when it has journaled new entries."""
        self._wake.set()

    def runtime_status(self) -> dict[str, Any]:
        v = self.view
        paused = v.paused_until is not None and v.paused_until > time.time()
        return {
            "last_success_at": iso(v.last_success_at),
            "last_error": v.last_error,
            "last_error_at": iso(v.last_error_at),
            "last_request_id": v.last_request_id,
            "base_url_in_use": self.uplink.base_url_in_use,
            "paused": paused,
            "pause_cause": v.pause_cause if paused else None,
            "paused_until": iso(v.paused_until) if paused else None,
            "in_flight": len(self._in_flight),
            "attempts": v.attempts,
            "sent": v.sent,
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
        if self.keys.certificate_mode and not self.keys.keys:
            self._refresh_certificates()
        while not self._stop.is_set():
            wait = self.step()
            self._wake.wait(wait)
            self._wake.clear()
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._collect_results()
        self._mark(force=True)
        self.uplink.close()
        log.info("delivery_stopped sent=%d", self.view.sent)

    # -- one round -------------------------------------------------------------------------------

    def step(self) -> float:
        """Take finished attempts, dispatch due entries, journal the answers; returns how long the loop may sleep."""
        self._progress = time.monotonic()
        self._collect_results()
        wait = self._dispatch()
        self._mark(force=False)
        if self._unmarked:
            wait = min(wait, max(0.0, self._unmarked_since + MARK_WINDOW_S - time.monotonic()))
        return wait

    def _dispatch(self) -> float:
        now = self.clock.now()
        mono = time.monotonic()
        if mono >= self._next_expire:
            self._next_expire = mono + EXPIRE_EVERY_S
            # received_at is the system clock's reading at receipt: measure the age on that clock. On
            # the API's clock, a board that booted days behind would expire entries seconds old.
            self._expire(time.time())
        if mono >= self._next_time_check and self.clock.offset is not None:
            # Entries skipped because they were on the wire are looked at again next round, not in 30 s:
            # the answer that taught us the offset is usually about one of them.
            skipped = self._correct_times()
            self._next_time_check = mono + (0.0 if skipped else CORRECT_TIMES_EVERY_S)
        if self.view.paused_until is not None and self.view.paused_until > time.time():
            return min(1.0, self.view.paused_until - time.time())
        if mono < self._hold_until:
            return min(1.0, self._hold_until - mono)
        free = self.config.wechatpay.max_in_flight - len(self._in_flight)
        if free <= 0:
            return 1.0
        try:
            due = self.journal.due(now, free, exclude=(*self._in_flight, *self._unmarked))
        except JournalError as exc:
            self.journal_error = str(exc)
            return 1.0
        for entry in due:
            mono = time.monotonic()
            if self._next_slot > mono and self._stop.wait(self._next_slot - mono):
                break
            self._next_slot = max(self._next_slot, time.monotonic()) + self._spacing
            self._in_flight.add(entry.id)
            self._pool.submit(self._attempt, entry)
        if due:
            return 0.0 if len(due) == free else 0.05
        next_at = self.journal.next_due_at()
        return 1.0 if next_at is None else max(0.01, min(1.0, next_at - now))

    def _attempt(self, entry: Pending) -> None:
        """One signed POST of one entry, in a pool thread. Never raises: the outcome goes on the queue."""
        try:
            outcome = self._send(entry)
        except Exception as exc:  # a bug must not lose the entry: it stays pending and is retried
            log.exception("delivery_attempt_crashed id=%d", entry.id)
            outcome = (entry.id, "retry", {"error": f"internal error: {exc}", "kind": "retry"})
        self._results.put(outcome)
        self._wake.set()

    def _send(self, entry: Pending) -> tuple[int, str, dict[str, Any]]:
        wx = self.config.wechatpay
        timestamp, nonce = int(self.clock.now()), wechatpay.new_nonce()
        headers = wechatpay.request_headers(
            key=self.private_key,
            mchid=wx.mchid,
            serial_no=wx.merchant_serial_no,
            body=entry.body,
            timestamp=timestamp,
            nonce=nonce,
            wechatpay_serial=self.keys.request_serial,
            user_agent=USER_AGENT,
        )
        started = time.monotonic()
        status: int | str = "-"
        try:
            answer = self.uplink.request("POST", wechatpay.ENTRY_PATH, headers, entry.body)
            status = answer.status
            try:
                accepted = wechatpay.classify(
                    answer.status, answer.headers, answer.body, self.keys.keys, self.clock.now()
                )
            except wechatpay.UnknownSerial:
                if not self.keys.certificate_mode:
                    raise
                self._refresh_certificates()
                accepted = wechatpay.classify(
                    answer.status, answer.headers, answer.body, self.keys.keys, self.clock.now()
                )
        except DeliveryError as exc:
            kind = "dead" if isinstance(exc, Permanent) else "pause" if isinstance(exc, Blocked) else "retry"
            error = exc.summary
            if isinstance(exc, ResponseUnverified):
                error = f"response_unverified: {exc.summary}"
            if exc.detail:
                error += f" detail={exc.detail}"
            if exc.request_id:
                error += f" request_id={exc.request_id}"
            log.info(
                "delivery_attempt id=%d out_serial_number=%s status=%s result=%s ms=%d error=%r",
                entry.id,
                entry.out_serial_number,
                exc.status or status,
                kind,
                (time.monotonic() - started) * 1000,
                error,
            )
            return (
                entry.id,
                kind,
                {
                    "error": error,
                    "retry_after": exc.retry_after,
                    "request_id": exc.request_id,
                    "unverified": isinstance(exc, ResponseUnverified),
                    "kind": kind,
                    "attempts": entry.attempts,
                },
            )
        log.info(
            "delivery_attempt id=%d out_serial_number=%s status=%s result=sent serial_number=%s ms=%d",
            entry.id,
            entry.out_serial_number,
            status,
            accepted.serial_number,
            (time.monotonic() - started) * 1000,
        )
        return entry.id, "sent", {"serial_number": accepted.serial_number, "request_id": accepted.request_id}

    def _refresh_certificates(self) -> None:
        try:
            self.keys.refresh()
        except DeliveryError as exc:
            log.warning("platform_certificates_refresh_failed error=%s", exc.summary)

    # -- outcomes --------------------------------------------------------------------------------

    def _collect_results(self) -> None:
        """Finished attempts leave the in-flight set (their slots are free) and wait in `_unmarked`,
        out of `due()`'s reach, until `_mark` journals them."""
        now = self.clock.now()
        while True:
            try:
                row_id, kind, data = self._results.get_nowait()
            except queue.Empty:
                return
            self._in_flight.discard(row_id)
            self.view.attempts += 1
            if not self._unmarked:
                self._unmarked_since = time.monotonic()
            self._unmarked[row_id] = self._journal_row(row_id, kind, data, now)

    def _mark(self, force: bool) -> None:
        """Journal the gathered answers in one transaction when due (see MARK_BATCH), or now if `force`."""
        if not self._unmarked:
            return
        waited = time.monotonic() - self._unmarked_since
        if not (force or not self._in_flight or len(self._unmarked) >= MARK_BATCH or waited >= MARK_WINDOW_S):
            return
        rows = list(self._unmarked.values())
        now = self.clock.now()
        while True:
            try:
                self.journal.mark_outcomes(rows, now)
                self.journal_error = None
                self._unmarked.clear()
                return
            except JournalError as exc:
                # The answers are lost only from memory: the entries stay pending and are re-sent with
                # the same out_serial_number, which the API treats idempotently.
                if self.journal_error != str(exc):
                    log.error("journal_mark_failed error=%s rows=%d", exc, len(rows))
                self.journal_error = str(exc)
                # Waiting for disk space is progress of a kind: a restart would not help (no crash loop).
                self._progress = time.monotonic()
                if self._stop.wait(1.0):
                    return

    def _journal_row(self, row_id: int, kind: str, data: dict[str, Any], now: float) -> tuple[int, str, dict[str, Any]]:
        v = self.view
        if kind == "sent":
            v.sent += 1
            v.last_success_at = time.time()
            v.last_error = None
            self._failures = 0
            self._pause_level = 0
            v.paused_until = v.pause_cause = None
            return row_id, "sent", {"serial_number": data["serial_number"]}
        v.last_error = data["error"]
        v.last_error_at = time.time()
        v.last_request_id = data.get("request_id") or v.last_request_id
        if kind == "dead":
            return row_id, "dead", {"error": data["error"]}
        if kind == "pause":
            wall = time.time()
            if v.paused_until is None or v.paused_until <= wall:
                pause = min(PAUSE_CAP_S, PAUSE_BASE_S * 2**self._pause_level) * self._rng.uniform(0.8, 1.0)
                self._pause_level = min(self._pause_level + 1, 10)
                v.paused_until = wall + pause
                log.warning("delivery_paused for_s=%.0f cause=%r", pause, data["error"])
            # else: a request already in flight when the loop paused met the same cause. It joins the
            # pause in force; escalating once per concurrent answer would turn 5 s into 5·2^max_in_flight.
            v.pause_cause = data["error"]
            # Not the entry's fault: no attempt counted and no per-entry backoff. The pause lives in this
            # process only, so the restart that follows a key or config fix retries at once instead of
            # waiting out a pause (up to PAUSE_CAP_S) that the journal would otherwise remember.
            return row_id, "retry", {"next_at": now, "error": data["error"], "counted": 0}
        if data.get("unverified"):
            v.response_unverified += 1
        if time.monotonic() >= self._hold_until:
            # Answers to requests already in flight when the hold began are the same round of trouble:
            # counting each would step the hold up max_in_flight times per round, straight to its cap.
            self._failures += 1
        delay = backoff(int(data.get("attempts", 0)), self._rng)
        retry_after = data.get("retry_after")
        if retry_after is not None:
            delay = max(delay, float(retry_after))
            self._hold_until = max(self._hold_until, time.monotonic() + float(retry_after))
        if self._failures >= 3:
            # Several failures in a row: the API or the uplink is in trouble, slow down everything.
            hold = backoff(self._failures - 3, self._rng)
            self._hold_until = max(self._hold_until, time.monotonic() + min(hold, 30.0))
        return row_id, "retry", {"next_at": now + delay, "error": data["error"]}

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
            mono_now, true_now = time.monotonic(), self.clock.now()
            for row in rows:
                if row["id"] in self._in_flight or row["id"] in self._unmarked:
                    skipped = True
                    continue  # its old body may be on the wire right now, or already answered
                when = int(true_now - (mono_now - float(row["received_mono"])))
                request = dataclasses.replace(wechatpay.parse_entry_body(bytes(row["body"])), enter_timestamp=when)
                if self.journal.correct_time(row["id"], when, wechatpay.build_entry_body(request), true_now):
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


def make(daemon: Daemon) -> DeliveryLoop:
    """Build the delivery loop for a daemon: its own journal connection, the uplink, the keys."""
    config = daemon.config
    uplink = Uplink(config.wechatpay, daemon.clock)
    try:
        keys = PlatformKeys(config, uplink, daemon.private_key, daemon.clock)
    except OSError as exc:
        raise KeyFileError(f"wechatpay: cannot read a platform key file: {exc}") from exc
    loop = DeliveryLoop(config, Journal(config.journal_path), uplink, keys, daemon.private_key, daemon.clock)
    daemon.ingest.listeners.append(loop.wake)
    return loop
