"""The keys that may sign WeChat Pay's answers: the public key (公钥模式) or platform certificates (§3.3, §3.4).

Certificate mode fetches `GET /v3/certificates`, decrypts them with the APIv3 key, verifies the
download with the certificates it carries, and caches the raw answer in the state dir, so a restart
without uplink still verifies answers. The download is retried in process a few times (tenacity): a
DNS hiccup must not leave the agent unable to verify anything until the next unknown serial.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from edgeagent import wechatpay
from edgeagent.clock import Clock
from edgeagent.config import Config
from edgeagent.errors import Blocked, DeliveryError, KeyFileError, Retryable
from edgeagent.policy import Answer
from edgeagent.uplink import USER_AGENT, Uplink

log = logging.getLogger(__name__)

CERT_CACHE = "platform_certificates.json"
CERTIFICATES_PATH = "/v3/certificates"


class PlatformKeys:
    """`keys` maps a `Wechatpay-Serial` to the key that verifies answers signed under it."""

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
        try:
            if wx.platform_public_key is not None:
                self.keys[wx.platform_public_key_id] = wechatpay.load_public_key(wx.platform_public_key.read_bytes())
                self.request_serial = wx.platform_public_key_id
            if wx.apiv3_key_file is not None:
                self._apiv3 = wx.apiv3_key_file.read_bytes().strip()
        except OSError as exc:
            raise KeyFileError(f"wechatpay: cannot read a platform key file: {exc}") from exc
        if self._apiv3 is not None:
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

    def ensure(self) -> None:
        """Fetch the platform certificates unless some are known already (one fetch for all callers)."""
        self.refresh(only_if_missing=True)

    def refresh(self, *, only_if_missing: bool = False) -> None:
        """Fetch the platform certificates now (certificate mode only). Raises DeliveryError kinds."""
        if self._apiv3 is None:
            return
        with self._lock:
            if only_if_missing and self.keys:
                return
            answer = self._download()
            fresh = wechatpay.parse_certificates(answer.body, self._apiv3)
            wechatpay.verify_response(answer.headers, answer.body, {**self.keys, **fresh}, self._clock.now())
            self.keys.update(fresh)
            tmp = self._cache_path().with_suffix(".tmp")
            tmp.write_bytes(answer.body)
            tmp.replace(self._cache_path())
            log.info("platform_certificates_refreshed serials=%s", ",".join(sorted(fresh)))

    @retry(
        retry=retry_if_exception_type(Retryable),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.5, max=4),
        reraise=True,
    )
    def _download(self) -> Answer:
        wx = self._config.wechatpay
        headers = wechatpay.request_headers(
            key=self._private_key,
            mchid=wx.mchid,
            serial_no=wx.merchant_serial_no,
            body=b"",
            timestamp=int(self._clock.now()),
            nonce=wechatpay.new_nonce(),
            wechatpay_serial="",
            user_agent=USER_AGENT,
            method="GET",
            target=CERTIFICATES_PATH,
        )
        del headers["Content-Type"]
        reply = self._uplink.request("GET", CERTIFICATES_PATH, headers)
        if not isinstance(reply, Answer):
            raise Retryable(reply.reason)
        if reply.status in (401, 403, 404):  # a key or account problem: retrying at once cannot help
            raise Blocked(f"HTTP {reply.status} from {CERTIFICATES_PATH}", status=reply.status)
        if reply.status != 200:
            raise Retryable(f"HTTP {reply.status} from {CERTIFICATES_PATH}", status=reply.status)
        return reply
