"""WeChat Pay API v3 for `POST /v3/parking/reminders/entry`: body, signature, verification, outcome.

Pure protocol code (STYLE §3): values in, values out. Nothing here touches the network, the clock or
files; timestamps, nonces and `now` are passed in (only `new_nonce` draws randomness). Section
numbers `§n` refer to shared/reference/wechatpay-api.md.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeagent.errors import Blocked, KeyFileError, Permanent, ResponseUnverified, Retryable
from edgeagent.model import CarType, PlateColor, VehicleType

ENTRY_PATH = "/v3/parking/reminders/entry"
SCHEME = "WECHATPAY2-SHA256-RSA2048"
FRESHNESS_S = 300  # §3.6: answers more than 5 minutes off are rejected (and requests, §2.5)

_NONCE_ALPHABET = string.ascii_letters + string.digits
_ENTRANCE_NUMBER = re.compile(r"[A-Za-z0-9]{1,128}")
_FIELDS = (  # §1.2 order; the first seven are required
    "out_serial_number", "parking_id", "plate_number", "enter_timestamp", "plate_color", "car_type",
    "vehicle_type", "entrance_number", "entrance_name", "discount_template_id",
)  # fmt: skip
_AUTH_ITEM = r'\s*[a-z_]+="[^"]*"\s*'
_AUTH_PARAMS = re.compile(rf"{_AUTH_ITEM}(?:,{_AUTH_ITEM})*")
_AUTH_KEYS = frozenset({"mchid", "nonce_str", "signature", "timestamp", "serial_no"})
_PROBE_PREFIX = "WECHATPAY/SIGNTEST/"  # §3.5: probe traffic, verified (and failed) like anything else

_E = TypeVar("_E", bound=StrEnum)
_ENUMS: tuple[tuple[str, type[StrEnum]], ...] = (
    ("plate_color", PlateColor), ("car_type", CarType), ("vehicle_type", VehicleType),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class EntryRequest:
    """The fields of one entry notification (§1.2). Empty optional fields are left out of the body."""

    out_serial_number: str
    parking_id: str
    plate_number: str
    enter_timestamp: int
    plate_color: PlateColor
    car_type: CarType
    vehicle_type: VehicleType
    entrance_number: str = ""
    entrance_name: str = ""
    discount_template_id: tuple[int, ...] = ()


class BodyError(ValueError):
    """An entry body field that the API would refuse; `str()` reads "field: problem"."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Accepted:
    """A verified 2xx answer: the entry is known to WeChat Pay under `serial_number`."""

    serial_number: str
    request_id: str


class UnknownSerial(ResponseUnverified):
    """The answer is signed with a key we do not hold; refresh platform certificates, then retry."""

    def __init__(self, serial: str) -> None:
        super().__init__(f"response unverified: unknown Wechatpay-Serial {serial}")
        self.unknown_serial = serial


def _text(field: str, value: object, max_len: int) -> str:
    if not isinstance(value, str):
        raise BodyError(field, "must be a string")
    if not value:
        raise BodyError(field, "must not be empty")
    if len(value) > max_len:  # §1.2 string(N); counted in characters (§8 item 6)
        raise BodyError(field, f"longer than {max_len} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise BodyError(field, "contains a control character")
    if any(ord(c) > 0xFFFF or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise BodyError(field, "contains a character outside the 1-3 byte UTF-8 subset (§2.4)")
    return value


def _int(field: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value < high:  # bool is not an int here
        raise BodyError(field, f"must be an integer in [{low}, {high})")
    return value


def _enum(field: str, cls: type[_E], value: object) -> _E:
    if isinstance(value, str) and value in cls._value2member_map_:
        return cls(value)
    raise BodyError(field, f"not one of {', '.join(cls)}")


def _fields(req: EntryRequest) -> dict[str, object]:
    """Validate every field of `req` and return the body as an ordered dict."""
    doc: dict[str, object] = {
        "out_serial_number": _text("out_serial_number", req.out_serial_number, 64),
        "parking_id": _text("parking_id", req.parking_id, 64),
        "plate_number": _text("plate_number", req.plate_number, 16),
        # Unix seconds (§1.2); 10^10 is year 2286, so a millisecond value cannot pass.
        "enter_timestamp": _int("enter_timestamp", req.enter_timestamp, 1, 10**10),
    }
    for name, cls in _ENUMS:
        doc[name] = _enum(name, cls, getattr(req, name)).value
    if req.entrance_number != "":
        number = _text("entrance_number", req.entrance_number, 128)
        if not _ENTRANCE_NUMBER.fullmatch(number):
            raise BodyError("entrance_number", "must be 1-128 letters A-Z, a-z or digits")
        doc["entrance_number"] = number
    if req.entrance_name != "":
        doc["entrance_name"] = _text("entrance_name", req.entrance_name, 64)
    ids = req.discount_template_id
    if not isinstance(ids, tuple):
        raise BodyError("discount_template_id", "must be a list of integers")
    if len(ids) > 3:  # maxItems 3 ([OAPI] only, §1.2)
        raise BodyError("discount_template_id", "at most 3 ids")
    if ids:
        doc["discount_template_id"] = [_int("discount_template_id", i, 0, 2**63) for i in ids]
    return doc


def build_entry_body(req: EntryRequest) -> bytes:
    """The exact bytes to sign and send: compact UTF-8 JSON in §1.2 field order (SPEC §5).

    Raises BodyError for a field the API would refuse (§9 checklist).
    """
    return json.dumps(_fields(req), ensure_ascii=False, separators=(",", ":")).encode()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    doc: dict[str, object] = {}
    for key, value in pairs:
        if key in doc:
            raise BodyError(key, "appears twice")
        doc[key] = value
    return doc


def parse_entry_body(body: bytes) -> EntryRequest:
    """Read an entry body as strictly as the API would: the inverse of `build_entry_body`.

    Raises BodyError naming the field ("body" when it is not a JSON object at all).
    """
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise BodyError("body", "not UTF-8") from None
    except BodyError:
        raise
    except ValueError:
        raise BodyError("body", "not JSON") from None
    if not isinstance(doc, dict):
        raise BodyError("body", "not a JSON object")
    for name in doc:
        if name not in _FIELDS:
            raise BodyError(name, "unknown field")
    for name in _FIELDS[:7]:
        if name not in doc:
            raise BodyError(name, "required")
    for name in _FIELDS[7:]:
        if name in doc and doc[name] in ("", []):  # we never send empty optional fields
            raise BodyError(name, "must not be empty (leave the field out instead)")
    ids = doc.get("discount_template_id", [])
    if not isinstance(ids, list):
        raise BodyError("discount_template_id", "must be a list of integers")
    enums = {name: _enum(name, cls, doc[name]) for name, cls in _ENUMS}
    req = EntryRequest(**{**doc, **enums, "discount_template_id": tuple(ids)})
    _fields(req)  # the same checks as on the way out
    return req


def _pem_label(pem: bytes) -> str:
    """The first PEM label ("PRIVATE KEY", "CERTIFICATE", …): safe to name in a message, unlike the bytes."""
    match = re.search(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----", pem)
    return match.group(1).decode() if match else "no PEM block"


def _not_rsa2048(key: object) -> KeyFileError:
    if isinstance(key, RSAPrivateKey | RSAPublicKey):  # the scheme is SHA256-RSA2048 (§2.2)
        return KeyFileError(f"RSA key of {key.key_size} bits; 2048 or more needed")
    return KeyFileError(f"not an RSA key but {type(key).__name__.lstrip('_')}")


def load_private_key(pem: bytes) -> RSAPrivateKey:
    """Load the merchant's RSA (≥ 2048 bit) private key from an unencrypted PKCS#8 or PKCS#1 PEM (§2.2).

    Raises KeyFileError otherwise; the message names what was found, never the key material.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:
        raise KeyFileError("private key is encrypted; give an unencrypted PEM") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"not a PEM private key (found {_pem_label(pem)})") from exc
    if isinstance(key, RSAPrivateKey) and key.key_size >= 2048:
        return key
    raise _not_rsa2048(key)


def load_public_key(pem: bytes) -> RSAPublicKey:
    """Load a WeChat Pay key from "PUBLIC KEY", PKCS#1 "RSA PUBLIC KEY" or a certificate PEM (§3.3, §3.4).

    Raises KeyFileError for anything but an RSA (≥ 2048 bit) key.
    """
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: object = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"not a PEM public key or certificate (found {_pem_label(pem)})") from exc
    if isinstance(key, RSAPublicKey) and key.key_size >= 2048:
        return key
    raise _not_rsa2048(key)


def certificate_serial(pem: bytes) -> str:
    """Upper-case hex serial of an X.509 certificate PEM, as WeChat Pay writes it (`%X`, §3.3)."""
    try:
        return format(x509.load_pem_x509_certificate(pem).serial_number, "X")
    except ValueError as exc:
        raise KeyFileError(f"not a PEM certificate (found {_pem_label(pem)})") from exc


def new_nonce() -> str:
    """A fresh 32-character [0-9A-Za-z] nonce, as the official SDKs make them (§2.1)."""
    return "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(32))


def request_message(method: str, target: str, timestamp: int, nonce: str, body: bytes) -> bytes:
    """The request message to sign: five lines, each ending in LF, the body's own bytes (§2.1)."""
    return f"{method}\n{target}\n{timestamp}\n{nonce}\n".encode() + body + b"\n"


def sign(key: RSAPrivateKey, message: bytes) -> str:
    """Base64 RSASSA-PKCS1-v1_5 / SHA-256 signature of `message` (§2.2)."""
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


def verify_signature(key: RSAPublicKey, message: bytes, signature: str) -> bool:
    """Whether `signature` (Base64) is `key`'s RSASSA-PKCS1-v1_5 / SHA-256 signature of `message`."""
    try:
        key.verify(base64.b64decode(signature, validate=True), message, padding.PKCS1v15(), hashes.SHA256())
    except (binascii.Error, InvalidSignature):
        return False
    return True


def authorization(mchid: str, serial_no: str, timestamp: int, nonce: str, signature: str) -> str:
    """The Authorization header value, items in the order of the official example (§2.3, §6.2 V1)."""
    return (
        f'{SCHEME} mchid="{mchid}",nonce_str="{nonce}",signature="{signature}",'
        f'timestamp="{timestamp}",serial_no="{serial_no}"'
    )


def parse_authorization(value: str) -> dict[str, str]:
    """Split an Authorization header into its five items (§2.3; item order is free).

    Raises ValueError for another scheme, bad syntax, or items missing, repeated or unknown.
    """
    scheme, _, params = value.strip().partition(" ")
    if scheme != SCHEME:
        raise ValueError(f"authorization scheme must be {SCHEME}")
    if not _AUTH_PARAMS.fullmatch(params):
        raise ValueError('authorization items must read key="value",key="value"')
    items = re.findall(r'([a-z_]+)="([^"]*)"', params)
    found = dict(items)
    if len(found) != len(items) or set(found) != _AUTH_KEYS:
        raise ValueError(f"authorization needs each of {', '.join(sorted(_AUTH_KEYS))} exactly once")
    return found


def request_headers(
    *,
    key: RSAPrivateKey,
    mchid: str,
    serial_no: str,
    body: bytes,
    timestamp: int,
    nonce: str,
    wechatpay_serial: str,
    user_agent: str,
    method: str = "POST",
    target: str = ENTRY_PATH,
) -> dict[str, str]:
    """All headers of a signed request (§2.4, SPEC §5). Send `body` byte for byte as signed.

    `wechatpay_serial` picks the key WeChat Pay signs its answer with (§3.4): the public key id, or
    a platform certificate serial; "" leaves the header out (platform-certificate default).
    """
    signature = sign(key, request_message(method, target, timestamp, nonce, body))
    headers = {
        "Authorization": authorization(mchid, serial_no, timestamp, nonce, signature),
        "Accept": "application/json",
        "Content-Type": "application/json",
        "User-Agent": user_agent,
    }
    if wechatpay_serial:
        headers["Wechatpay-Serial"] = wechatpay_serial
    return headers


def response_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    """The answer message: three LF-terminated lines over the raw body (§3.2; 204 → empty line)."""
    return f"{timestamp}\n{nonce}\n".encode() + body + b"\n"


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def verify_response(headers: Mapping[str, str], body: bytes, keys: Mapping[str, RSAPublicKey], now: float) -> None:
    """Check an answer's Wechatpay-* signature and freshness (§3, SPEC §5); `keys` maps serial → key.

    Raises:
        UnknownSerial: `Wechatpay-Serial` names no key in `keys` (see `.unknown_serial`).
        ResponseUnverified: a header missing, wrong signature type, stale timestamp, bad signature.
    """
    found = _lower(headers)
    values = []
    for name in ("Wechatpay-Timestamp", "Wechatpay-Nonce", "Wechatpay-Signature", "Wechatpay-Serial"):
        if not found.get(name.lower()):
            raise ResponseUnverified(f"response unverified: missing header {name}")
        values.append(found[name.lower()])
    timestamp, nonce, signature, serial = values
    kind = found.get("wechatpay-signature-type")
    if kind is not None and kind != SCHEME:
        raise ResponseUnverified(f"response unverified: Wechatpay-Signature-Type {kind!r}, not {SCHEME}")
    if serial not in keys:
        raise UnknownSerial(serial)
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise ResponseUnverified(f"response unverified: Wechatpay-Timestamp {timestamp!r} is not Unix seconds")
    skew = int(int(timestamp) - now)  # > 0: the answer is ahead of our clock
    if abs(skew) >= FRESHNESS_S:  # same bound as the official Go and Java SDKs (§3.6)
        raise ResponseUnverified(f"response unverified: Wechatpay-Timestamp {skew:+d} s off")
    if not verify_signature(keys[serial], response_message(timestamp, nonce, body), signature):
        probe = " (WECHATPAY/SIGNTEST/ probe)" if signature.startswith(_PROBE_PREFIX) else ""
        raise ResponseUnverified(f"response unverified: bad signature{probe}")


def _retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from `now`: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def classify(
    status: int, headers: Mapping[str, str], body: bytes, keys: Mapping[str, RSAPublicKey], now: float
) -> Accepted:
    """Turn one answer into an outcome (SPEC §5, §4.2): `Accepted`, or the DeliveryError to raise.

    Raises:
        ResponseUnverified: a 2xx whose signature or timestamp does not verify.
        Retryable: 202, 429, 5xx, any unexpected status, a verified 2xx without serial_number.
        Permanent: 400 (PARAM_ERROR, INVALID_REQUEST, …): dead-letter with the API's words.
        Blocked: 401, 403, 404: fixed by config, key or clock, not by the entry.
    """
    found = _lower(headers)
    request_id = found.get("request-id", "")
    if 200 <= status < 300 and status != 202:
        try:
            verify_response(headers, body, keys, now)
        except ResponseUnverified as exc:  # only verified answers count (§3.2)
            exc.status, exc.request_id = status, request_id
            raise
        try:
            serial = json.loads(body).get("serial_number")
        except (ValueError, AttributeError):
            serial = None
        if isinstance(serial, str) and serial:
            return Accepted(serial_number=serial, request_id=request_id)
        raise Retryable(f"HTTP {status} without serial_number", status=status, request_id=request_id)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        code, message = (v if isinstance(v := doc.get(k), str) else "" for k in ("code", "message"))
        detail = "" if doc.get("detail") is None else json.dumps(doc["detail"], ensure_ascii=False)
        summary = f"HTTP {status} {code}".rstrip() + (f": {message}" if message else "")
    else:
        code = message = detail = ""
        text = " ".join(body.decode("utf-8", "replace").split())[:200]
        summary = f"HTTP {status} with a non-JSON body: {text}" if text else f"HTTP {status} with an empty body"
    words = {"code": code, "message": message, "detail": detail, "request_id": request_id}
    if status == 400:
        raise Permanent(summary, status=status, retry_after=None, **words)
    if status in (401, 403, 404):
        raise Blocked(summary, status=status, retry_after=None, **words)
    # 202, 429, 5xx and anything unexpected: the same entry again later (§4.3)
    raise Retryable(summary, status=status, retry_after=_retry_after(found.get("retry-after"), now), **words)


def _aes(apiv3_key: bytes) -> AESGCM:
    if len(apiv3_key) != 32:  # §3.3 "长度必须为32个字节"
        raise ValueError("the APIv3 key must be 32 bytes")
    return AESGCM(apiv3_key)


def aes_gcm_decrypt(apiv3_key: bytes, nonce: str, associated_data: str, ciphertext_b64: str) -> bytes:
    """AEAD_AES_256_GCM decryption with the APIv3 key; the ciphertext ends in the 16-byte tag (§3.3).

    Raises ValueError for a key that is not 32 bytes, bad Base64, or a tag that does not match.
    """
    try:
        data = base64.b64decode(ciphertext_b64, validate=True)
        return _aes(apiv3_key).decrypt(nonce.encode(), data, associated_data.encode())
    except binascii.Error:
        raise ValueError("ciphertext is not Base64") from None
    except InvalidTag:
        raise ValueError("decryption failed (wrong APIv3 key or altered data)") from None


def aes_gcm_encrypt(apiv3_key: bytes, nonce: str, associated_data: str, plaintext: bytes) -> str:
    """The inverse of `aes_gcm_decrypt`, for the sandbox: Base64 of ciphertext ‖ tag."""
    sealed = _aes(apiv3_key).encrypt(nonce.encode(), plaintext, associated_data.encode())
    return base64.b64encode(sealed).decode()


def parse_certificates(body: bytes, apiv3_key: bytes) -> dict[str, RSAPublicKey]:
    """Decrypt a `GET /v3/certificates` answer into {serial_no: key} (§3.3).

    The download is signed by one of the certificates it carries: verify it afterwards with
    `verify_response(headers, body, parse_certificates(body, key), now)`.

    Raises:
        Blocked: a certificate does not decrypt (wrong APIv3 key: a config fix, not a retry).
        ResponseUnverified: the answer does not have the documented shape.
    """
    keys: dict[str, RSAPublicKey] = {}
    try:
        for item in json.loads(body)["data"]:
            serial, sealed = item["serial_no"], item["encrypt_certificate"]
            if sealed["algorithm"] != "AEAD_AES_256_GCM":
                raise ResponseUnverified(f"certificate {serial}: algorithm {sealed['algorithm']!r}")
            try:
                pem = aes_gcm_decrypt(apiv3_key, sealed["nonce"], sealed["associated_data"], sealed["ciphertext"])
            except ValueError as exc:
                raise Blocked(f"certificate {serial}: {exc}") from exc
            if certificate_serial(pem) != serial.upper():
                raise ResponseUnverified(f"certificate {serial}: serial does not match its certificate")
            keys[serial] = load_public_key(pem)
    except (ValueError, KeyError, TypeError, AttributeError, KeyFileError) as exc:
        raise ResponseUnverified(f"certificate list unreadable: {exc!r}") from exc
    if not keys:
        raise ResponseUnverified("certificate list is empty")
    return keys
