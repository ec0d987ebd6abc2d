"""The lot's health at WeChat Pay: `GET /v3/parking/reminders/parking-lot` (SPEC §7 `lot`, §2 `check --online`).

One signed query proves the merchant key, its serial, the mchid and `parking_id` together, and says
whether WeChat has the lot enabled (`enabled_state`) and why not (`reason`, e.g. "进场时延过高": WeChat
takes lots offline whose entries arrive late). `check --online` asks once; the daemon asks at start
and hourly (`LotWatch`), and `status` is degraded while the answer is anything but enabled.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from tenacity import RetryCallState, retry, retry_if_result, stop_after_attempt, wait_exponential

from edgeagent import policy, requests, wechatpay
from edgeagent.clock import Clock
from edgeagent.config import Config
from edgeagent.errors import DeliveryError
from edgeagent.platform_keys import PlatformKeys
from edgeagent.requests import KINDS, BodyError, Kind
from edgeagent.status import iso
from edgeagent.uplink import USER_AGENT, Uplink

log = logging.getLogger(__name__)

POLL_EVERY_S = 3600.0
RETRY_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class LotAnswer:
    """What one lot query found: the lot's state, or why there is none (`error`)."""

    enabled_state: str | None
    reason: str | None
    name: str | None
    error: str | None
    checked_at: float
    transient: bool = False  # the error may pass by itself (network, 5xx)

    def view(self) -> dict[str, Any]:
        return {
            "enabled_state": self.enabled_state,
            "reason": self.reason,
            "checked_at": iso(self.checked_at),
            "error": self.error,
        }


def query(config: Config, uplink: Uplink, keys: PlatformKeys, private_key: RSAPrivateKey, clock: Clock) -> LotAnswer:
    """Ask once (a transient failure is retried twice in process); never raises for the API's sake."""
    return _query_with_retries(config, uplink, keys, private_key, clock)


def _last(state: RetryCallState) -> LotAnswer:
    """After the last try, the last answer (its error says what failed), not a tenacity exception."""
    assert state.outcome is not None
    answer: LotAnswer = state.outcome.result()
    return answer


@retry(
    retry=retry_if_result(lambda answer: answer.transient),
    stop=stop_after_attempt(3),
    wait=wait_exponential(multiplier=0.5, max=4),
    retry_error_callback=_last,
)
def _query_with_retries(
    config: Config, uplink: Uplink, keys: PlatformKeys, private_key: RSAPrivateKey, clock: Clock
) -> LotAnswer:
    wx = config.wechatpay
    spec = KINDS[Kind.PARKING_LOT]
    if keys.certificate_mode:
        try:
            keys.ensure()
        except DeliveryError as exc:
            return LotAnswer(None, None, None, f"platform certificates: {exc.summary}", clock.system(), True)
    target = requests.parking_lot_target(config.parking.parking_id)
    headers = wechatpay.request_headers(
        key=private_key,
        mchid=wx.mchid,
        serial_no=wx.merchant_serial_no,
        body=b"",
        timestamp=int(clock.now()),
        nonce=wechatpay.new_nonce(),
        wechatpay_serial=keys.request_serial,
        user_agent=USER_AGENT,
        method=spec.method,
        target=target,
    )
    del headers["Content-Type"]
    reply = uplink.request(spec.method, target, headers)
    reading = policy.read(spec, reply, keys.keys, clock.now())
    checked = clock.system()
    if isinstance(reply, policy.Answer) and policy.teaches_clock(reading):
        clock.witness(reading.server_time or 0, reply.sent_at, reply.received_at, fresh=reading.server_time_fresh)
    if reading.verdict is not policy.Verdict.ACCEPTED or reading.document is None:
        transient = reading.verdict in (policy.Verdict.TRANSIENT, policy.Verdict.UNVERIFIED)
        return LotAnswer(None, None, None, reading.summary, checked, transient)
    try:
        lot = requests.parse_lot(reading.document)
    except BodyError as exc:
        return LotAnswer(None, None, None, f"lot answer unreadable: {exc}", checked)
    return LotAnswer(lot.enabled_state, lot.reason or None, lot.name or None, None, checked)


class LotWatch:
    """The daemon's poller: asks at start and every hour (every minute after a failure)."""

    def __init__(self, ask: Any, clock: Clock) -> None:
        self._ask = ask
        self._clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.last: LotAnswer | None = None
        self._progress = clock.monotonic()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                answer: LotAnswer = self._ask()
            except Exception as exc:  # the poller must never take the agent down
                log.exception("lot_query_crashed")
                answer = LotAnswer(None, None, None, f"internal error: {exc}", self._clock.system(), True)
            with self._lock:
                self.last = answer
            if answer.error:
                log.warning("lot_query_failed error=%s", answer.error)
            else:
                log.info("lot_state enabled_state=%s reason=%s", answer.enabled_state, answer.reason or "-")
            self._stop.wait(RETRY_EVERY_S if answer.error else POLL_EVERY_S)

    def stop(self) -> None:
        self._stop.set()

    def view(self) -> dict[str, Any]:
        with self._lock:
            last = self.last
        if last is None:
            return {"enabled_state": None, "reason": None, "checked_at": None, "error": None}
        return last.view()
