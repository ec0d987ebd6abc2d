"""The uplink adapter: one `httpx.Client` to the WeChat Pay API, TLS always verified.

It sends exactly the bytes it is given to exactly the target it was given (already percent-encoded:
the signature covers it as sent), fails over from `base_url` to `backup_base_url` when the primary
cannot be reached (and goes back after a while), and returns what came back as a `policy.Answer`,
or a `policy.Failure` when nothing did. It learns nothing from an answer: judging it, and learning
the API's clock from it once its signature verified (SPEC §5), is `policy`'s and `clock`'s job.
"""

from __future__ import annotations

import logging
import ssl
import threading

import httpx

from edgeagent import __version__
from edgeagent.clock import Clock
from edgeagent.config import WeChatPayConfig
from edgeagent.policy import Answer, Failure, Reply

log = logging.getLogger(__name__)

FAILOVER_HOLD_S = 300.0  # stay on the backup domain this long before trying the primary again
USER_AGENT = f"edgeagent/{__version__} (parking-gate agent; python-httpx/{httpx.__version__})"


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
            if self._on_backup_since is not None and self._clock.monotonic() - self._on_backup_since > FAILOVER_HOLD_S:
                log.info("uplink_failback base_url=%s", self._config.base_url)
                self._on_backup_since = None
            return self._config.backup_base_url if self._on_backup_since is not None else self._config.base_url

    def _switch(self, failed: str) -> None:
        backup = self._config.backup_base_url
        if not backup:
            return
        with self._lock:
            if failed == self._config.base_url and self._on_backup_since is None:
                self._on_backup_since = self._clock.monotonic()
                log.warning("uplink_failover from=%s to=%s", failed, backup)
            elif failed == backup and self._on_backup_since is not None:
                self._on_backup_since = None  # the backup is down too: the primary is as good a bet
                log.warning("uplink_failover from=%s to=%s", failed, self._config.base_url)

    def request(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> Reply:
        """Send one request to the domain in use; never raises for the network's sake."""
        base = self.base_url_in_use
        sent_at = self._clock.system()
        try:
            # httpx.URL would re-encode a target it finds unencoded; ours is encoded already (requests.py),
            # so what goes on the wire is the text that was signed.
            response = self._client.request(method, base + target, headers=headers, content=body or None)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                # An untrusted certificate is a configuration (or interception) problem, not a flaky
                # network: pause delivery and say so, like a 401, instead of burning attempts.
                return Failure(f"{base}: {_reason(exc)}", blocked=True)
            self._switch(base)
            return Failure(f"cannot connect to {base}: {_reason(exc)}")
        except httpx.TimeoutException:
            return Failure(f"timeout after {self._config.timeout_s:g} s talking to {base}")
        except httpx.HTTPError as exc:
            return Failure(f"connection to {base} failed: {_reason(exc)}")
        return Answer(
            status=response.status_code,
            headers={k.lower(): v for k, v in response.headers.items()},
            body=response.content,
            base_url=base,
            sent_at=sent_at,
            received_at=self._clock.system(),
        )


def _reason(exc: Exception) -> str:
    """A short, specific reason: TLS verification failures are named as such."""
    text = str(exc) or exc.__class__.__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate not trusted (wrong CA? set wechatpay.ca_file for a private CA)"
    return text[:200]
