"""The uplink adapter: one `httpx.Client` to the WeChat Pay API, TLS always verified.

It sends exactly the bytes it is given, fails over from `base_url` to `backup_base_url` when the
primary cannot be reached (and goes back after a while), and turns every answer's `Date` header
into a clock offset (SPEC §5). httpx errors become `Retryable` here; judging an answer is
`wechatpay.classify`'s job, not this module's.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass

import httpx

from edgeagent import __version__
from edgeagent.clock import Clock, parse_http_date
from edgeagent.config import WeChatPayConfig
from edgeagent.errors import Blocked, Retryable

log = logging.getLogger(__name__)

FAILOVER_HOLD_S = 300.0  # stay on the backup domain this long before trying the primary again
USER_AGENT = f"edgeagent/{__version__} (parking-gate agent; python-httpx/{httpx.__version__})"


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer as received: status, headers (lower-case names), raw body, where and when."""

    status: int
    headers: dict[str, str]
    body: bytes
    base_url: str
    elapsed_s: float


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """System CAs plus `ca_file` when given (a private CA such as the sandbox's); always verifying."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


class Uplink:
    """Thread-safe: the delivery workers share one client and its small connection pool."""

    def __init__(self, config: WeChatPayConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._on_backup_since: float | None = None
        pool = max(1, config.max_in_flight)
        self._client = httpx.Client(
            verify=tls_context(str(config.ca_file) if config.ca_file else None),
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool, keepalive_expiry=30.0),
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )

    def close(self) -> None:
        self._client.close()

    @property
    def base_url_in_use(self) -> str:
        with self._lock:
            if self._on_backup_since is not None and time.monotonic() - self._on_backup_since > FAILOVER_HOLD_S:
                log.info("uplink_failback base_url=%s", self._config.base_url)
                self._on_backup_since = None
            return self._config.backup_base_url if self._on_backup_since is not None else self._config.base_url

    def _switch(self, failed: str) -> None:
        backup = self._config.backup_base_url
        if not backup:
            return
        with self._lock:
            if failed == self._config.base_url and self._on_backup_since is None:
                self._on_backup_since = time.monotonic()
                log.warning("uplink_failover from=%s to=%s", failed, backup)
            elif failed == backup and self._on_backup_since is not None:
                self._on_backup_since = None  # the backup is down too: the primary is as good a bet
                log.warning("uplink_failover from=%s to=%s", failed, self._config.base_url)

    def request(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> Answer:
        """Send one request to the domain in use. Connection-level failures raise `Retryable`."""
        base = self.base_url_in_use
        sent_at = time.time()
        started = time.monotonic()
        try:
            response = self._client.request(method, base + target, headers=headers, content=body or None)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                # An untrusted certificate is a configuration (or interception) problem, not a flaky
                # network: pause delivery and say so, like a 401, instead of burning attempts.
                raise Blocked(f"{base}: {_reason(exc)}") from exc
            self._switch(base)
            raise Retryable(f"cannot connect to {base}: {_reason(exc)}") from exc
        except httpx.TimeoutException as exc:
            raise Retryable(f"timeout after {self._config.timeout_s:g} s talking to {base}") from exc
        except httpx.HTTPError as exc:
            raise Retryable(f"connection to {base} failed: {_reason(exc)}") from exc
        received_at = time.time()
        server_time = parse_http_date(response.headers.get("date", ""))
        if server_time is not None:
            self._clock.learn(server_time, sent_at, received_at)
        return Answer(
            status=response.status_code,
            headers={k.lower(): v for k, v in response.headers.items()},
            body=response.content,
            base_url=base,
            elapsed_s=time.monotonic() - started,
        )


def _reason(exc: Exception) -> str:
    """A short, specific reason: TLS verification failures are named as such."""
    text = str(exc) or exc.__class__.__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate not trusted (wrong CA? set wechatpay.ca_file for a private CA)"
    return text[:200]
