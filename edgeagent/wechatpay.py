"""WeChat Pay API v3 signing: request signatures, answer verification, keys, AES-GCM (§2, §3).

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
from collections.abc import Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeagent.errors import Blocked, KeyFileError, ResponseUnverified

SCHEME = "WECHATPAY2-SHA256-RSA2048"
FRESHNESS_S = 300  # §3.6: answers more than 5 minutes off are rejected (and requests, §2.5)

_AUTH_ITEM = r'\s*[a-z_]+="[^"]*"\s*'
_AUTH_PARAMS = re.compile(rf"{_AUTH_ITEM}(?:,{_AUTH_ITEM})*")
_AUTH_KEYS = frozenset({"mchid", "nonce_str", "signature", "timestamp", "serial_no"})
_PROBE_PREFIX = "WECHATPAY/SIGNTEST/"  # §3.5: probe traffic, verified (and failed) like anything else


class UnknownSerial(ResponseUnverified):
    """The answer is signed with a key we do not hold; refresh platform certificates, then retry."""

    def __init__(self, serial: str) -> None:
        super().__init__(f"response unverified: unknown Wechatpay-Serial {serial}")
        self.unknown_serial = serial


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
    """A fresh 32-character nonce of [0-9a-f], within the [0-9A-Za-z] of the official SDKs (§2.1)."""
    return secrets.token_hex(16)  # one call: 32 characters of [0-9a-f], a subset of the SDKs' alphabet


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
    method: str,
    target: str,
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


class StaleAnswer(ResponseUnverified):
    """An answer correctly signed by WeChat Pay whose `Wechatpay-Timestamp` is more than 300 s off ours.

    Not a success (it may be a replay), but evidence about the API's clock (SPEC §5): see `.timestamp`.
    """

    def __init__(self, skew: int, timestamp: int) -> None:
        super().__init__(f"response unverified: Wechatpay-Timestamp {skew:+d} s off")
        self.timestamp = timestamp


def verify_response(headers: Mapping[str, str], body: bytes, keys: Mapping[str, RSAPublicKey], now: float) -> int:
    """Check an answer's Wechatpay-* signature and freshness (§3, SPEC §5); `keys` maps serial → key.

    Returns the verified `Wechatpay-Timestamp` (Unix seconds: the API's clock, signed).

    Raises:
        UnknownSerial: `Wechatpay-Serial` names no key in `keys` (see `.unknown_serial`).
        StaleAnswer: signed correctly, but more than 300 s off `now` (the signature is checked first).
        ResponseUnverified: a header missing, wrong signature type, malformed timestamp, bad signature.
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
    if not verify_signature(keys[serial], response_message(timestamp, nonce, body), signature):
        probe = " (WECHATPAY/SIGNTEST/ probe)" if signature.startswith(_PROBE_PREFIX) else ""
        raise ResponseUnverified(f"response unverified: bad signature{probe}")
    skew = int(int(timestamp) - now)  # > 0: the answer is ahead of our clock
    if abs(skew) >= FRESHNESS_S:  # same bound as the official Go and Java SDKs (§3.6)
        raise StaleAnswer(skew, int(timestamp))
    return int(timestamp)


def retry_after(value: str | None, now: float) -> float | None:
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
