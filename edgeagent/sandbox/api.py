"""The emulated WeChat Pay parking API behind the sandbox: checks, idempotency, signed answers, knobs.

Transport-free: `Api.respond(method, target, headers, body)` returns the `Reply` to send (or None:
drop the connection), so `server.py` only moves bytes. Routes follow `requests.KINDS` (one sandbox
handler per kind) plus the certificate download (§ = wechatpay-api.md):

    POST /v3/parking/reminders/entry   body read by `requests.parse_entry_body`, parking_id must be
                                       this merchant's; idempotent by out_serial_number (a different
                                       body under a used number: 400 PARAM_ERROR); 200 {"serial_number"}
    POST /v3/parking/reminders/exit    body read by `requests.parse_exit_body`; 400 (detail.field names
                                       the field) when the number has no accepted entry (INVALID_REQUEST
                                       out_serial_number), parking_id differs (PARAM_ERROR parking_id),
                                       plate_number differs or exit_timestamp < the entry's
                                       enter_timestamp (INVALID_REQUEST); idempotent for the same exit,
                                       a different exit under the same number refused; 204, empty body,
                                       signed over the empty body (§3.2)
    GET  /v3/parking/reminders/parking-lot?wx_parking_lot_id=…&out_parking_lot_id=…
                                       the lot (§1.5): 200 {wx_parking_lot_id, out_parking_lot_id,
                                       parking_lot_name, parking_lot_address, enabled_state, reason};
                                       400 PARAM_ERROR naming the parameter for an unknown id
    GET  /v3/certificates              the platform certificate under AES-256-GCM (§3.3)

Every API request is first checked as strictly as the real API: signature over the target exactly as
received (percent-encoding included), mchid, serial_no, timestamp (±300 s), nonce reuse, Accept,
Content-Type (POST), User-Agent, Wechatpay-Serial. Every answer, errors included, carries Request-ID,
Date and the Wechatpay-* signature headers (§3.1), signed under the WeChat Pay public key's id, or
under the platform certificate's serial when the request's Wechatpay-Serial names that certificate
or is absent (§3.4; one key pair serves both).

Control, unsigned (`Api.control`):

    POST /_sandbox/control    {"fail_status": 503, "fail_count": 2}  → the knobs now in force
    GET  /_sandbox/accepted   accepted entries, oldest first
    GET  /_sandbox/exits      accepted exits, oldest first
    GET  /_sandbox/requests   every API request seen (at, kind, method, path, status, code,
                              out_serial_number, request_id, replayed), oldest first

Knobs (`Knobs`; defaults behave like the real API):

    latency_s             wait this long before answering
    fail_status           answer this status instead (signed error; 2xx: empty body); 0 = off
    fail_count            how many requests the failure knobs hit; -1 = until changed
    retry_after           Retry-After seconds on a 429/503 from fail_status
    drop_connection       close the connection without answering
    non_json_error        answer 500 with an unsigned HTML page, as a broken proxy would
    bad_signature         sign answers with a wrong key
    no_signature          leave out the Wechatpay-* headers
    stale_timestamp_s     shift answers' Wechatpay-Timestamp by this many seconds
    date_offset_s         skew the sandbox clock: Date header and the request timestamp check
    lot_enabled_state     the lot's enabled_state, one of `requests.LOT_STATES` (ENABLED_STATE_ENABLED)
    lot_reason            the lot's reason, e.g. "进场时延过高" ("" by default)
    duplicate_refusal     refuse a repeated out_serial_number (entry or exit already accepted) with
                          400 INVALID_REQUEST "商户停车单号重复" instead of answering idempotently
    replay_answer         answer an entry with a recorded, correctly signed earlier answer (its
                          Wechatpay-* headers, Request-ID and body) under a fresh Date header; the
                          request itself is not processed, as when something between replays answers
    replay_age_s          0: replay the first entry answer ever given; N > 0: the newest answer
                          recorded at least N s ago (by the sandbox clock), or, when none is that old,
                          the first answer's body signed with a Wechatpay-Timestamp N s in the past

The failure knobs act before a request is processed, so a failed or dropped request is never
recorded as accepted — `bad_signature`, `no_signature` and `stale_timestamp_s` instead accept the
request and only spoil the answer: the client must retry and the sandbox must stay idempotent.
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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from edgeagent.requests import (
    LOT_ENABLED,
    LOT_STATES,
    BodyError,
    EntryRequest,
    ExitRequest,
    Kind,
    build_entry_body,
    build_exit_body,
    kind_of_path,
    parse_entry_body,
    parse_exit_body,
)
from edgeagent.sandbox.ca import Materials
from edgeagent.sandbox.nonces import NonceMemory
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
MAX_ANSWERS_KEPT = 1_000  # recorded entry answers for replay_answer (plus the first one ever)
OUT_PARKING_LOT_ID = "SANDBOX-LOT-001"  # the lot's merchant-side id (§1.5 out_parking_lot_id)
PARKING_LOT_NAME = "edgeagent 沙盒停车场"
PARKING_LOT_ADDRESS = "127.0.0.1"
MAX_LOT_REASON = 256  # [OAPI] reason maxLength
DUPLICATE_MESSAGE = "商户停车单号重复"  # duplicate_refusal; other v3 APIs answer "…订单号重复"
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
    fail_queries: bool = False  # the failure knobs also hit the lot query (by default only entries and exits)
    lot_enabled_state: str = LOT_ENABLED  # the lot query's enabled_state (one of LOT_STATES)
    lot_reason: str = ""  # the lot query's reason, e.g. "进场时延过高"
    duplicate_refusal: bool = False  # a repeated out_serial_number: 400 INVALID_REQUEST "…重复"
    replay_answer: bool = False  # answer entries with a recorded answer, fresh Date (not processed)
    replay_age_s: int = 0  # 0: the first answer; N: one recorded N s ago (see the module docstring)


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
        if name == "replay_age_s" and value < 0:
            raise ValueError("replay_age_s: seconds, 0 or more")
        return value
    if kind == "str" and isinstance(value, str):
        if name == "lot_enabled_state" and value not in LOT_STATES:
            raise ValueError(f"lot_enabled_state: one of {', '.join(LOT_STATES)}")
        if name == "lot_reason" and len(value) > MAX_LOT_REASON:
            raise ValueError(f"lot_reason: at most {MAX_LOT_REASON} characters")
        return value
    raise ValueError(f"{name}: expected {kind}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer, ready to send."""

    status: int
    headers: dict[str, str]
    body: bytes
    code: str = ""  # the API error code in the body, for the request log
    replayed: bool = False  # a recorded earlier answer (replay_answer), for the request log


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
    repeats: int = 0  # re-sends of the same entry (answered idempotently, or refused by duplicate_refusal)


@dataclass(slots=True)
class _Exit:
    request: ExitRequest
    received_at: float
    request_id: str
    repeats: int = 0  # re-sends of the same exit (answered idempotently, or refused by duplicate_refusal)


@dataclass(frozen=True, slots=True)
class _Recorded:
    """An entry answer as it went out, kept for replay_answer."""

    clock: float  # the sandbox clock when it was given
    reply: Reply


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
        self._exits: dict[str, _Exit] = {}
        self._requests: deque[dict[str, Any]] = deque(maxlen=MAX_REQUESTS_KEPT)
        self._nonces = NonceMemory()  # nonce → sandbox time after which it may come again
        self._first_answer: _Recorded | None = None
        self._answers: deque[_Recorded] = deque(maxlen=MAX_ANSWERS_KEPT)
        self._handlers: dict[Kind, Callable[[_Call], Reply]] = {
            Kind.ENTRY: self._entry,
            Kind.EXIT: self._exit,
            Kind.PARKING_LOT: self._parking_lot,
        }
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

    def exits(self) -> list[dict[str, Any]]:
        """Accepted exits, oldest first: the body's fields plus received_at, request_id, repeats."""
        with self._lock:
            exits = list(self._exits.values())
        return [
            json.loads(build_exit_body(e.request))
            | {"received_at": e.received_at, "request_id": e.request_id, "repeats": e.repeats}
            for e in exits
        ]

    def requests(self) -> list[dict[str, Any]]:
        """Every API request seen, oldest first: at, kind, method, path, status (None: dropped), code,
        out_serial_number, request_id, replayed."""
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
        path = urlsplit(target).path
        spec = kind_of_path(method, path)
        # Failure knobs aim at the outbox's requests (entries, exits): an agent's lot query at start must
        # not use up a `fail_count` a test or a technician meant for them, unless `fail_queries` says so.
        query = spec is not None and not spec.journaled
        failure = None if query and not knobs.fail_queries else self._take_failure()
        call = _Call(method, target, headers, body, time.time() + knobs.date_offset_s, _request_id(), knobs)
        kind = spec.kind.value if spec else "certificates" if (method, path) == ("GET", CERTIFICATES_PATH) else None
        reply: Reply | None
        if failure is None:
            replayed = self._replay(call) if knobs.replay_answer and kind == Kind.ENTRY else None
            reply = replayed or self._route(call, path)
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
            "kind": kind,
            "method": method,
            "path": target,
            "status": None if reply is None else reply.status,
            "code": code,
            "out_serial_number": _peek_serial(body),
            "request_id": call.request_id if reply is None else reply.headers.get("Request-ID", call.request_id),
            "replayed": reply is not None and reply.replayed,
        }
        with self._lock:
            self._requests.append(record)
        log.info(
            "sandbox_request method=%s path=%s status=%s code=%s out_serial_number=%s",
            method, target, record["status"] or "dropped", code or "-", record["out_serial_number"] or "-",
        )  # fmt: skip
        return reply

    def _route(self, call: _Call, path: str) -> Reply:
        """The kinds table decides the handler (DESIGN "One outbox"); the certificate download is extra."""
        spec = kind_of_path(call.method, path)
        handler: Callable[[_Call], Reply] | None
        if spec is not None:
            handler = self._handlers.get(spec.kind)  # None: a kind the sandbox does not serve yet
        elif (call.method, path) == ("GET", CERTIFICATES_PATH):
            handler = self._certificates
        else:
            handler = None
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
            reused = self._nonces.seen(nonce, int(stamp) + FRESHNESS_S, call.clock)
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
            return self._body_error(call, exc)
        if req.parking_id != self.materials.parking_id:
            return self._unknown_lot(call)
        with self._lock:
            entry = self._entries.get(req.out_serial_number)
            repeated = entry is not None
            if entry is None:
                serial = "WX" + secrets.token_hex(10).upper()
                entry = self._entries[req.out_serial_number] = _Entry(req, serial, time.time(), call.request_id)
            elif entry.request == req:
                entry.repeats += 1
        if repeated and call.knobs.duplicate_refusal:
            return self._duplicate(call)
        if entry.request != req:  # one out_serial_number, one entry (§1.2: unique under the merchant)
            detail = {"field": "out_serial_number", "location": "body", "issue": "already used for another entry"}
            return self._error(call, 400, "PARAM_ERROR", "out_serial_number already used with a different body", detail)
        reply = self._answer(call, 200, {"serial_number": entry.serial_number})
        k = call.knobs
        if not (k.bad_signature or k.no_signature or k.stale_timestamp_s):  # only correctly signed answers
            recorded = _Recorded(call.clock, reply)
            with self._lock:
                self._first_answer = self._first_answer or recorded
                self._answers.append(recorded)
        return reply

    def _exit(self, call: _Call) -> Reply:
        """An exit closes an accepted entry: same number, parking_id and plate, not before it (SPEC §8, §10)."""
        try:
            req = parse_exit_body(call.body)
        except BodyError as exc:
            return self._body_error(call, exc)
        with self._lock:
            entry = self._entries.get(req.out_serial_number)
        if entry is None:
            if req.parking_id != self.materials.parking_id:
                return self._unknown_lot(call)
            return self._invalid(call, "out_serial_number", "停车入场id不存在: no accepted entry under this number")
        entered = entry.request
        if req.parking_id != entered.parking_id:  # [OFF-EXIT] "须与入场时…保持一致,不一致将报错"
            detail = {"field": "parking_id", "location": "body", "issue": "differs from the entry's parking_id"}
            return self._error(call, 400, "PARAM_ERROR", "parking_id 须与入场时保持一致", detail)
        if req.plate_number != entered.plate_number:
            return self._invalid(call, "plate_number", "differs from the entry's plate_number")
        if req.exit_timestamp < entered.enter_timestamp:
            return self._invalid(
                call, "exit_timestamp", f"before the entry's enter_timestamp {entered.enter_timestamp}"
            )
        with self._lock:
            known = self._exits.get(req.out_serial_number)
            if known is None:
                self._exits[req.out_serial_number] = _Exit(req, time.time(), call.request_id)
            elif known.request == req:
                known.repeats += 1
        if known is not None and call.knobs.duplicate_refusal:
            return self._duplicate(call)
        if known is not None and known.request != req:
            return self._invalid(call, "out_serial_number", "already exited with a different exit")
        return self._answer(call, 204, None)

    def _parking_lot(self, call: _Call) -> Reply:
        """The lot by either of its ids (§1.5); knobs set its enabled_state and reason."""
        query = urlsplit(call.target).query
        try:  # the signature already covered the target as received; here it is decoded
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), errors="strict")
        except ValueError as exc:  # UnicodeDecodeError included
            return self._param(call, "query", f"unreadable query string: {exc}", "query")
        m = self.materials
        lot_ids = {"wx_parking_lot_id": m.parking_id, "out_parking_lot_id": OUT_PARKING_LOT_ID}
        given: dict[str, str] = {}
        for name, value in pairs:
            if name not in lot_ids:
                return self._param(call, name, "unknown parameter", "query")
            if name in given:
                return self._param(call, name, "appears twice", "query")
            if not value or len(value) > 64 or len(value.encode()) > 64:
                return self._param(call, name, "must be 1-64 characters", "query")
            given[name] = value
        if not given:
            return self._param(call, "wx_parking_lot_id", "give wx_parking_lot_id or out_parking_lot_id", "query")
        for name, value in given.items():
            if value != lot_ids[name]:
                return self._param(call, name, f"no parking lot {value!r} under this merchant", "query")
        doc = lot_ids | {
            "parking_lot_name": PARKING_LOT_NAME,
            "parking_lot_address": PARKING_LOT_ADDRESS,
            "enabled_state": call.knobs.lot_enabled_state,
        }
        if call.knobs.lot_reason:
            doc["reason"] = call.knobs.lot_reason
        return self._answer(call, 200, doc)

    def _replay(self, call: _Call) -> Reply | None:
        """A recorded, correctly signed entry answer under a fresh Date (replay_answer); None: none to replay."""
        age = call.knobs.replay_age_s
        with self._lock:
            first = self._first_answer
            if age == 0:
                chosen = first
            else:
                cutoff = call.clock - age
                chosen = next((r for r in reversed(self._answers) if r.clock <= cutoff), None)
        if chosen is not None:
            headers = chosen.reply.headers | {"Date": _http_date(call.clock)}
            return replace(chosen.reply, headers=headers, replayed=True)
        if age == 0:
            return None  # nothing given yet: this request is answered for real (and recorded)
        # Nothing recorded that long ago: the answer it would have given then, signed then.
        doc = json.loads(first.reply.body) if first else {"serial_number": "WX" + secrets.token_hex(10).upper()}
        then = replace(call.knobs, stale_timestamp_s=-age, bad_signature=False, no_signature=False)
        return replace(self._answer(replace(call, knobs=then), 200, doc), replayed=True)

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

    def _body_error(self, call: _Call, exc: BodyError) -> Reply:
        detail = {"field": exc.field, "location": "body", "issue": exc.problem}
        return self._error(call, 400, "PARAM_ERROR", f"参数错误: {exc}", detail)

    def _param(self, call: _Call, field: str, issue: str, location: str = "body") -> Reply:
        detail = {"field": field, "location": location, "issue": issue}
        return self._error(call, 400, "PARAM_ERROR", f"参数错误: {field}: {issue}", detail)

    def _unknown_lot(self, call: _Call) -> Reply:
        detail = {"field": "parking_id", "location": "body", "issue": "unknown parking lot"}
        parking_id = _peek(call.body, "parking_id")
        return self._error(call, 400, "PARAM_ERROR", f"parking_id {parking_id!r} is not this merchant's", detail)

    def _invalid(self, call: _Call, field: str, issue: str) -> Reply:
        """400 INVALID_REQUEST: well-formed, but against the API's rules (§4.2)."""
        detail = {"field": field, "location": "body", "issue": issue}
        return self._error(call, 400, "INVALID_REQUEST", f"{field}: {issue}", detail)

    def _duplicate(self, call: _Call) -> Reply:
        detail = {"field": "out_serial_number", "location": "body", "issue": "already used"}
        return self._error(call, 400, "INVALID_REQUEST", DUPLICATE_MESSAGE, detail)

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
        if (method, path) == ("GET", CONTROL_PREFIX + "exits"):
            return json_reply(200, self.exits())
        if (method, path) == ("GET", CONTROL_PREFIX + "requests"):
            return json_reply(200, self.requests())
        return json_reply(404, {"error": f"no control endpoint {method} {path}"})


def _request_id() -> str:
    return secrets.token_hex(16).upper()


def _http_date(clock: float) -> str:
    return email.utils.formatdate(clock, usegmt=True)  # RFC 7231 IMF-fixdate


def _peek(body: bytes, field: str) -> str | None:
    """A string field of a JSON body, if there is one (for logs and messages)."""
    try:
        value = json.loads(body).get(field)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _peek_serial(body: bytes) -> str | None:
    return _peek(body, "out_serial_number")


def json_reply(status: int, doc: object) -> Reply:
    body = json.dumps(doc, ensure_ascii=False).encode()
    return Reply(status, {"Content-Type": "application/json; charset=utf-8"}, body)
