"""The emulated WeChat Pay parking API behind the sandbox: checks, idempotency, signed answers, knobs.

Transport-free: `Api.respond(method, target, headers, body)` returns the `Reply` to send (or None:
drop the connection), so `server.py` only moves bytes. What it serves (§ = wechatpay-api.md):

    POST /v3/parking/reminders/entry   checked as strictly as the real API: signature, mchid,
                                       serial_no, timestamp (±300 s), nonce reuse, Accept,
                                       Content-Type, User-Agent, body, parking_id; idempotent by
                                       out_serial_number; answers 200 {"serial_number": "WX…"}
    GET  /v3/certificates              the platform certificate under AES-256-GCM (§3.3)

Every answer, errors included, carries Request-ID, Date and the Wechatpay-* signature headers
(§3.1), signed under the WeChat Pay public key's id, or under the platform certificate's serial when
the request's Wechatpay-Serial names that certificate or is absent (§3.4; one key pair serves both).

Control, unsigned (`Api.control`):

    POST /_sandbox/control    {"fail_status": 503, "fail_count": 2}  → the knobs now in force
    GET  /_sandbox/accepted   accepted entries, oldest first
    GET  /_sandbox/requests   every API request seen (time, status, out_serial_number), oldest first

Knobs (see `Knobs`) act before an entry is accepted, so a failed or dropped request is never
recorded as accepted — except `bad_signature`, `no_signature` and `stale_timestamp_s`, which accept
the entry and only spoil the answer: the client must retry and the sandbox must stay idempotent.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from edgeagent.requests import ENTRY_PATH, BodyError, EntryRequest, build_entry_body, parse_entry_body
from edgeagent.sandbox.ca import Materials
from edgeagent.wechatpay import (
    FRESHNESS_S,
    SCHEME,
    aes_gcm_encrypt,
    load_private_key,
    new_nonce,
    parse_authorization,
    request_message,
    response_message,
    sign,
    verify_signature,
)

log = logging.getLogger(__name__)

CERTIFICATES_PATH = "/v3/certificates"
CONTROL_PREFIX = "/_sandbox/"
MAX_REQUESTS_KEPT = 10_000  # the request log is a ring: a sandbox left running stays small
_BEIJING = dt.timezone(dt.timedelta(hours=8))
_FAILURE_KNOBS = frozenset({"fail_status", "drop_connection", "non_json_error"})
_FAIL_WORDS = {  # §4.2: the code and message the real API gives with each status
    400: ("INVALID_REQUEST", "HTTP 请求不符合微信支付 APIv3 接口规则"),
    401: ("SIGN_ERROR", "签名错误"),
    403: ("NO_AUTH", "商户无权限"),
    404: ("NOT_FOUND", "资源不存在"),
    429: ("RATELIMIT_EXCEEDED", "请求超过频率限制"),
    500: ("SYSTEM_ERROR", "系统异常,请稍后重试"),
    502: ("SERVICE_UNAVAILABLE", "服务下线,暂时不可用"),
    503: ("SERVICE_UNAVAILABLE", "服务不可用,过载保护"),
}
_HTML_500 = (
    b"<html>\r\n<head><title>500 Internal Server Error</title></head>\r\n<body>\r\n"
    b"<center><h1>500 Internal Server Error</h1></center>\r\n<hr><center>stgw</center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(slots=True)
class Knobs:
    """Misbehaviour on request. The defaults behave like the real API."""

    latency_s: float = 0.0  # wait this long before answering an API request
    fail_status: int = 0  # answer this status (a signed API error; 2xx: empty body); 0 = off
    fail_count: int = -1  # how many requests the failure knobs hit; -1 = until changed
    retry_after: int | None = None  # Retry-After seconds on a 429 or 503 from fail_status
    bad_signature: bool = False  # sign answers with a wrong key (the entry is accepted)
    no_signature: bool = False  # leave out the Wechatpay-* headers (the entry is accepted)
    stale_timestamp_s: int = 0  # shift answers' Wechatpay-Timestamp (the entry is accepted)
    date_offset_s: float = 0.0  # skew the sandbox clock: Date header and request timestamp check
    drop_connection: bool = False  # close the connection without answering
    non_json_error: bool = False  # answer 500 with an HTML page, as a broken proxy would


def _knob(name: str, value: object) -> object:
    """`value` checked against the knob's type and range; ValueError says what is expected."""
    kinds = {f.name: str(f.type) for f in fields(Knobs)}
    if name not in kinds:
        raise ValueError(f"unknown knob {name!r} (known: {', '.join(kinds)})")
    kind = kinds[name]
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        if name == "latency_s" and not 0 <= value <= 600:
            raise ValueError("latency_s: seconds in 0..600")
        return float(value)
    if kind == "int | None" and (value is None or (type(value) is int and value >= 0)):
        return value
    if kind == "int" and type(value) is int:
        if name == "fail_status" and value != 0 and not 100 <= value <= 599:
            raise ValueError("fail_status: 0 (off) or an HTTP status 100-599")
        if name == "fail_count" and value < -1:
            raise ValueError("fail_count: -1 (until changed) or a count of requests")
        return value
    raise ValueError(f"{name}: expected {kind}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer, ready to send."""

    status: int
    headers: dict[str, str]
    body: bytes
    code: str = ""  # the API error code in the body, for the request log


@dataclass(frozen=True, slots=True)
class _Call:
    """One API request and what the sandbox decided about it when it arrived."""

    method: str
    target: str  # path and query exactly as received: what the client signed (§2.1)
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    clock: float  # the sandbox's own time (date_offset_s applied)
    request_id: str
    knobs: Knobs


@dataclass(slots=True)
class _Entry:
    request: EntryRequest
    serial_number: str
    received_at: float
    request_id: str
    repeats: int = 0  # idempotent re-sends of the same entry


class Api:
    """The stand-in API's state and rules. Thread-safe; knobs change while it runs."""

    def __init__(self, materials: Materials, **knobs: object) -> None:
        self.materials = m = materials
        self._merchant_key = load_private_key(m.merchant_private_key_file.read_bytes()).public_key()
        self._platform_key = load_private_key(m.platform_private_key_file.read_bytes())
        self._apiv3_key = m.apiv3_key_file.read_bytes().strip()
        self._platform_cert = m.platform_cert_file.read_bytes()
        self._wrong_key: RSAPrivateKey | None = None
        self._lock = threading.Lock()
        self._knobs = Knobs()
        self._entries: dict[str, _Entry] = {}
        self._requests: deque[dict[str, Any]] = deque(maxlen=MAX_REQUESTS_KEPT)
        self._nonces: dict[str, int] = {}  # nonce → sandbox time after which it may come again
        self.set(**knobs)

    def set(self, **knobs: object) -> None:
        """Change knobs (all or none). Setting a failure knob without `fail_count` means "until changed".

        Raises:
            ValueError: an unknown knob or a value of the wrong type.
        """
        checked = {name: _knob(name, value) for name, value in knobs.items()}
        if _FAILURE_KNOBS & checked.keys() and "fail_count" not in checked:
            checked["fail_count"] = -1
        with self._lock:
            updated = replace(self._knobs)
            for name, value in checked.items():
                setattr(updated, name, value)
            self._knobs = updated

    def knobs(self) -> dict[str, Any]:
        with self._lock:
            return asdict(self._knobs)

    def accepted(self) -> list[dict[str, Any]]:
        """Accepted entries, oldest first: the body's fields plus serial_number, received_at, repeats."""
        with self._lock:
            entries = list(self._entries.values())
        return [
            json.loads(build_entry_body(e.request))
            | {"serial_number": e.serial_number, "received_at": e.received_at, "request_id": e.request_id,
               "repeats": e.repeats}
            for e in entries
        ]  # fmt: skip

    def requests(self) -> list[dict[str, Any]]:
        """Every API request seen, oldest first: at, method, path, status (None: dropped), code, out_serial_number."""
        with self._lock:
            return [dict(r) for r in self._requests]

    def _take_failure(self) -> Knobs | None:
        """The knobs of a failure to inject into this request, if one is due (counts it down)."""
        with self._lock:
            k = self._knobs
            if not (k.fail_status or k.drop_connection or k.non_json_error) or k.fail_count == 0:
                return None
            due = replace(k)
            if k.fail_count > 0:
                k.fail_count -= 1
                if k.fail_count == 0:  # used up: back to normal
                    self._knobs = replace(k, fail_status=0, drop_connection=False, non_json_error=False, fail_count=-1)
            return due

    # -- the API -----------------------------------------------------------------------------------

    def respond(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Answer one API request; None means: close the connection without answering."""
        arrived = time.time()
        with self._lock:
            knobs = replace(self._knobs)
        if knobs.latency_s:
            time.sleep(knobs.latency_s)  # the knob's whole point: a slow server
        failure = self._take_failure()
        call = _Call(method, target, headers, body, time.time() + knobs.date_offset_s, _request_id(), knobs)
        reply: Reply | None
        if failure is None:
            reply = self._route(call)
        elif failure.drop_connection:
            reply = None
        elif failure.non_json_error:
            headers = {"Content-Type": "text/html", "Request-ID": call.request_id, "Date": _http_date(call.clock)}
            reply = Reply(500, headers, _HTML_500)  # unsigned, like a gateway's own error page
        else:
            reply = self._injected(call, failure)
        code = "" if reply is None else reply.code
        record = {
            "at": arrived,
            "method": method,
            "path": target,
            "status": None if reply is None else reply.status,
            "code": code,
            "out_serial_number": _peek_serial(body),
            "request_id": call.request_id,
        }
        with self._lock:
            self._requests.append(record)
        log.info(
            "sandbox_request method=%s path=%s status=%s code=%s out_serial_number=%s",
            method, target, record["status"] or "dropped", code or "-", record["out_serial_number"] or "-",
        )  # fmt: skip
        return reply

    def _route(self, call: _Call) -> Reply:
        path = urlsplit(call.target).path
        routes = {("POST", ENTRY_PATH): self._entry, ("GET", CERTIFICATES_PATH): self._certificates}
        handler = routes.get((call.method, path))
        if handler is None:
            return self._error(call, 404, "NOT_FOUND", f"no such API in the sandbox: {call.method} {path}")
        return self._authenticate(call) or self._check_headers(call) or handler(call)

    def _authenticate(self, call: _Call) -> Reply | None:
        """401 SIGN_ERROR unless the Authorization header is the merchant's, fresh, unique and signed (§2)."""
        m = self.materials
        try:
            auth = parse_authorization(call.headers.get("authorization", ""))
        except ValueError as exc:
            return self._sign_error(
                call, "Authorization header missing" if "authorization" not in call.headers else str(exc)
            )
        if auth["mchid"] != m.mchid:
            return self._sign_error(call, f"mchid {auth['mchid']!r} is not this merchant ({m.mchid})")
        if auth["serial_no"].upper() != m.merchant_serial_no:
            return self._sign_error(call, f"serial_no {auth['serial_no']!r} is not the merchant API certificate serial")
        stamp, nonce = auth["timestamp"], auth["nonce_str"]
        if not (stamp.isdigit() and len(stamp) <= 10):
            return self._sign_error(call, f"timestamp {stamp!r} is not Unix seconds")
        skew = int(stamp) - int(call.clock)
        if abs(skew) >= FRESHNESS_S:
            return self._sign_error(
                call, f"timestamp {stamp} is {skew:+d} s off the server clock (limit {FRESHNESS_S} s): check the clock"
            )
        if not nonce:
            return self._sign_error(call, "nonce_str is empty")
        message = request_message(call.method, call.target, int(stamp), nonce, call.body)
        if not verify_signature(self._merchant_key, message, auth["signature"]):
            shown = message[:120].decode("utf-8", "replace")
            details = {"method": call.method, "url": call.target, "sign_message_length": len(message),
                       "truncated_sign_message": shown}  # fmt: skip
            return self._sign_error(call, "signature does not verify with the merchant key", details)
        with self._lock:
            self._nonces = {n: until for n, until in self._nonces.items() if until > call.clock}
            reused = nonce in self._nonces
            self._nonces.setdefault(nonce, int(stamp) + FRESHNESS_S)
        return self._sign_error(call, f"nonce_str {nonce!r} was already used (replay)") if reused else None

    def _check_headers(self, call: _Call) -> Reply | None:
        """400 INVALID_REQUEST for the header rules of §2.4 and an unknown Wechatpay-Serial (§3.4)."""
        accept = {part.split(";")[0].strip().lower() for part in call.headers.get("accept", "").split(",")}
        if not accept & {"application/json", "application/*", "*/*"}:
            return self._error(call, 400, "INVALID_REQUEST", "Http头缺少Accept或User-Agent: Accept: application/json")
        if not call.headers.get("user-agent", "").strip():
            return self._error(call, 400, "INVALID_REQUEST", "Http头缺少Accept或User-Agent: User-Agent is empty")
        content_type = call.headers.get("content-type", "").split(";")[0].strip().lower()
        if call.method == "POST" and content_type != "application/json":
            return self._error(call, 400, "INVALID_REQUEST", "Content-Type must be application/json")
        wanted = call.headers.get("wechatpay-serial")
        if wanted is not None and wanted not in (
            self.materials.platform_public_key_id,
            self.materials.platform_cert_serial,
        ):
            return self._error(
                call,
                400,
                "INVALID_REQUEST",
                f"Wechatpay-Serial {wanted!r} is neither the public key id nor the platform certificate",
            )
        return None

    def _entry(self, call: _Call) -> Reply:
        try:
            req = parse_entry_body(call.body)
        except BodyError as exc:
            detail = {"field": exc.field, "location": "body", "issue": exc.problem}
            return self._error(call, 400, "PARAM_ERROR", f"参数错误: {exc}", detail)
        if req.parking_id != self.materials.parking_id:
            detail = {"field": "parking_id", "location": "body", "issue": "unknown parking lot"}
            return self._error(
                call, 400, "PARAM_ERROR", f"parking_id {req.parking_id!r} is not this merchant's", detail
            )
        with self._lock:
            entry = self._entries.get(req.out_serial_number)
            if entry is None:
                serial = "WX" + secrets.token_hex(10).upper()
                entry = self._entries[req.out_serial_number] = _Entry(req, serial, time.time(), call.request_id)
            elif entry.request == req:
                entry.repeats += 1
            else:
                entry = None
        if entry is None:  # one out_serial_number, one entry (§1.2: unique under the merchant)
            detail = {"field": "out_serial_number", "location": "body", "issue": "already used for another entry"}
            return self._error(call, 400, "PARAM_ERROR", "out_serial_number already used with a different body", detail)
        return self._answer(call, 200, {"serial_number": entry.serial_number})

    def _certificates(self, call: _Call) -> Reply:
        """The platform certificate, sealed with the APIv3 key as the real download is (§3.3)."""
        cert = x509.load_pem_x509_certificate(self._platform_cert)
        nonce = new_nonce()[:12]
        item = {
            "serial_no": self.materials.platform_cert_serial,
            "effective_time": cert.not_valid_before_utc.astimezone(_BEIJING).isoformat(),
            "expire_time": cert.not_valid_after_utc.astimezone(_BEIJING).isoformat(),
            "encrypt_certificate": {
                "algorithm": "AEAD_AES_256_GCM",
                "nonce": nonce,
                "associated_data": "certificate",
                "ciphertext": aes_gcm_encrypt(self._apiv3_key, nonce, "certificate", self._platform_cert),
            },
        }
        return self._answer(call, 200, {"data": [item]})

    # -- answers -----------------------------------------------------------------------------------

    def _injected(self, call: _Call, failure: Knobs) -> Reply:
        status = failure.fail_status
        if status < 300:
            reply = self._answer(call, status, None)
        else:
            code, message = _FAIL_WORDS.get(status, ("SYSTEM_ERROR", "系统异常"))
            reply = self._error(call, status, code, f"{message} (sandbox fail_status)")
        if status in (429, 503) and failure.retry_after is not None:
            reply.headers["Retry-After"] = str(failure.retry_after)
        return reply

    def _sign_error(self, call: _Call, issue: str, sign_information: dict[str, Any] | None = None) -> Reply:
        detail: dict[str, Any] = {"field": "signature", "location": "authorization", "issue": issue}
        if sign_information:
            detail["sign_information"] = sign_information
        return self._error(call, 401, "SIGN_ERROR", f"错误的签名,验签失败: {issue}", detail)

    def _error(self, call: _Call, status: int, code: str, message: str, detail: object = None) -> Reply:
        doc: dict[str, object] = {"code": code, "message": message}
        if detail is not None:
            doc["detail"] = detail
        return replace(self._answer(call, status, doc), code=code)

    def _answer(self, call: _Call, status: int, doc: object) -> Reply:
        """A JSON answer with Request-ID, Date and, unless a knob spoils them, the Wechatpay-* headers (§3.1)."""
        body = b"" if doc is None else json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"Request-ID": call.request_id, "Date": _http_date(call.clock)}
        if body:
            headers["Content-Type"] = "application/json; charset=utf-8"
        if call.knobs.no_signature:
            return Reply(status, headers, body)
        m = self.materials
        wanted = call.headers.get("wechatpay-serial")
        serial = m.platform_public_key_id if wanted == m.platform_public_key_id else m.platform_cert_serial
        key = self._wrong() if call.knobs.bad_signature else self._platform_key
        stamp, nonce = str(int(call.clock) + call.knobs.stale_timestamp_s), new_nonce()
        headers["Wechatpay-Timestamp"] = stamp
        headers["Wechatpay-Nonce"] = nonce
        headers["Wechatpay-Signature"] = sign(key, response_message(stamp, nonce, body))
        headers["Wechatpay-Serial"] = serial
        headers["Wechatpay-Signature-Type"] = SCHEME
        return Reply(status, headers, body)

    def _wrong(self) -> RSAPrivateKey:
        with self._lock:
            if self._wrong_key is None:
                self._wrong_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            return self._wrong_key

    # -- control -----------------------------------------------------------------------------------

    def control(self, method: str, path: str, body: bytes) -> Reply:
        """The unsigned /_sandbox/ endpoints: change knobs, read accepted entries and requests."""
        if (method, path) == ("POST", CONTROL_PREFIX + "control"):
            try:
                doc = json.loads(body or b"{}")
                if not isinstance(doc, dict):
                    raise ValueError("the control body must be a JSON object of knobs")
                self.set(**doc)
            except ValueError as exc:
                return json_reply(400, {"error": str(exc)})
            return json_reply(200, self.knobs())
        if (method, path) == ("GET", CONTROL_PREFIX + "accepted"):
            return json_reply(200, self.accepted())
        if (method, path) == ("GET", CONTROL_PREFIX + "requests"):
            return json_reply(200, self.requests())
        return json_reply(404, {"error": f"no control endpoint {method} {path}"})


def _request_id() -> str:
    return secrets.token_hex(16).upper()


def _http_date(clock: float) -> str:
    return email.utils.formatdate(clock, usegmt=True)  # RFC 7231 IMF-fixdate


def _peek_serial(body: bytes) -> str | None:
    try:
        serial = json.loads(body).get("out_serial_number")
    except (ValueError, AttributeError):
        return None
    return serial if isinstance(serial, str) else None


def json_reply(status: int, doc: object) -> Reply:
    body = json.dumps(doc, ensure_ascii=False).encode()
    return Reply(status, {"Content-Type": "application/json; charset=utf-8"}, body)
