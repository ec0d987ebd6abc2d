"""Key material for the sandbox, minted with `cryptography` and kept in one directory.

`ensure_materials(dir)` creates what is missing and reuses what is there, so a restarted sandbox
keeps its keys and an agent configured against it keeps working. What it holds:

    ca.pem                              private test CA (EC P-256) that signs the TLS certificate;
                                        its key is never written: a lost server.pem means a new CA
    server.pem, server.key              TLS server certificate for 127.0.0.1, ::1 and localhost
    apiclient_key.pem                   merchant API private key (RSA 2048, PKCS#8) — the agent's
    wechatpay_pub.pem                   WeChat Pay public key (公钥模式) — the agent's
    wechatpay_platform_private_key.pem  the private half, which only the sandbox signs with
    platform_cert.pem                   self-signed platform certificate over the same key pair,
                                        served by GET /v3/certificates (platform-certificate mode)
    apiv3.key                           APIv3 key: 32 characters, encrypts that download
    materials.json                      mchid, merchant serial, public key id, parking_id (editable)

Private keys and the APIv3 key are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import string
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeagent.errors import KeyFileError
from edgeagent.wechatpay import certificate_serial

DEFAULT_MCHID = "1900000001"
DEFAULT_PARKING_ID = "WXPARK001"
_RENEW_BEFORE = dt.timedelta(days=30)  # re-mint the TLS certificate this long before it expires


@dataclass(frozen=True, slots=True)
class Materials:
    """Where the sandbox's files are (absolute) and the identifiers that go with them."""

    dir: Path
    mchid: str
    merchant_serial_no: str
    platform_public_key_id: str
    platform_cert_serial: str
    parking_id: str

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def server_cert_file(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key_file(self) -> Path:
        return self.dir / "server.key"

    @property
    def merchant_private_key_file(self) -> Path:
        return self.dir / "apiclient_key.pem"

    @property
    def platform_public_key_file(self) -> Path:
        return self.dir / "wechatpay_pub.pem"

    @property
    def platform_private_key_file(self) -> Path:
        return self.dir / "wechatpay_platform_private_key.pem"

    @property
    def platform_cert_file(self) -> Path:
        return self.dir / "platform_cert.pem"

    @property
    def apiv3_key_file(self) -> Path:
        return self.dir / "apiv3.key"

    @property
    def config_file(self) -> Path:
        """The `[wechatpay]` fragment the running sandbox writes (it knows the port)."""
        return self.dir / "edgeagent-wechatpay.toml"


def write_file(path: Path, data: bytes, *, secret: bool = False) -> None:
    """Write atomically (temp file + rename), 0600 for secrets, so a crash never leaves half a key."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeagent sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """keyCertSign + cRLSign for the CA, digitalSignature for the TLS leaf (what strict verifiers want)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def hex_serial() -> int:
    """A positive 160-bit serial printing as 40 upper-case hex digits, like WeChat Pay's (§2.3).

    The top nibble stays in 1..7 so the DER integer fits the 20 octets of RFC 5280 §4.1.2.2.
    """
    return secrets.randbits(159) | (1 << 156)


def mint_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh test CA (EC P-256, ten years) that may sign only end-entity certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("edgeagent sandbox test CA"))
        .issuer_name(_name("edgeagent sandbox test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def mint_server(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for 127.0.0.1, ::1 and localhost, signed by the test CA (two years)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def mint_platform_certificate(key: rsa.RSAPrivateKey) -> x509.Certificate:
    """A self-signed WeChat Pay platform certificate over `key`, five years like the real ones (§3.3)."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name("edgeagent sandbox WeChat Pay platform"))
        .issuer_name(_name("edgeagent sandbox WeChat Pay platform"))
        .public_key(key.public_key())
        .serial_number(hex_serial())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=5 * 365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _tls_ok(m: Materials) -> bool:
    """The CA, server certificate and key all exist, belong together and are not about to expire."""
    try:
        ca = x509.load_pem_x509_certificate(m.ca_file.read_bytes())
        cert = x509.load_pem_x509_certificate(m.server_cert_file.read_bytes())
        key = serialization.load_pem_private_key(m.server_key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    fresh = cert.not_valid_after_utc - _RENEW_BEFORE > dt.datetime.now(dt.UTC)
    return fresh and cert.issuer == ca.subject and cert.public_key() == key.public_key()


def _rsa_key(path: Path) -> rsa.RSAPrivateKey:
    """The RSA key in `path`, minted (RSA 2048, PKCS#8, 0600) when the file does not exist yet."""
    if path.exists():
        try:  # the sandbox validates its keys when it loads them for use; here only the kind matters
            key = serialization.load_pem_private_key(path.read_bytes(), None, unsafe_skip_rsa_key_validation=True)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: not an unencrypted PEM private key") from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyFileError(f"{path}: not an RSA private key")
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_file(path, _pkcs8(key), secret=True)
    return key


def ensure_materials(dir: Path) -> Materials:
    """Create whatever is missing in `dir`, reuse what exists, and describe it.

    Raises:
        KeyFileError: an existing key file is unreadable or not what it should be.
        OSError: the directory cannot be created or written.
    """
    dir = dir.resolve()  # the config fragment names absolute paths
    dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    info_file = dir / "materials.json"
    try:
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
    except ValueError as exc:
        raise KeyFileError(f"{info_file}: not JSON ({exc})") from exc
    if not isinstance(info, dict):
        raise KeyFileError(f"{info_file}: must hold a JSON object")
    m = Materials(
        dir=dir,
        mchid=str(info.get("mchid") or DEFAULT_MCHID),
        merchant_serial_no=str(info.get("merchant_serial_no") or format(hex_serial(), "X")),
        platform_public_key_id=str(
            info.get("platform_public_key_id")
            or "PUB_KEY_ID_" + "".join(secrets.choice(string.digits) for _ in range(32))  # §3.4
        ),
        platform_cert_serial="",
        parking_id=str(info.get("parking_id") or DEFAULT_PARKING_ID),
    )
    if not _tls_ok(m):
        ca_key, ca_cert = mint_ca()
        server_key, server_cert = mint_server(ca_key, ca_cert)
        write_file(m.server_key_file, _pkcs8(server_key), secret=True)
        write_file(m.server_cert_file, server_cert.public_bytes(serialization.Encoding.PEM))
        write_file(m.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    _rsa_key(m.merchant_private_key_file)
    platform = _rsa_key(m.platform_private_key_file)
    public_pem = platform.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not m.platform_public_key_file.exists() or m.platform_public_key_file.read_bytes() != public_pem:
        write_file(m.platform_public_key_file, public_pem)
    try:
        cert = x509.load_pem_x509_certificate(m.platform_cert_file.read_bytes())
        matches = cert.public_key() == platform.public_key()
    except (OSError, ValueError):
        matches = False
    if not matches:
        cert = mint_platform_certificate(platform)
        write_file(m.platform_cert_file, cert.public_bytes(serialization.Encoding.PEM))
    if not m.apiv3_key_file.exists():
        apiv3 = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
        write_file(m.apiv3_key_file, apiv3.encode(), secret=True)
    if len(m.apiv3_key_file.read_bytes().strip()) != 32:  # §3.3: the APIv3 key is 32 bytes
        raise KeyFileError(f"{m.apiv3_key_file}: must hold exactly 32 characters")
    serial = certificate_serial(m.platform_cert_file.read_bytes())
    m = replace(m, platform_cert_serial=serial)
    described = {
        "mchid": m.mchid,
        "merchant_serial_no": m.merchant_serial_no,
        "platform_public_key_id": m.platform_public_key_id,
        "platform_cert_serial": m.platform_cert_serial,
        "parking_id": m.parking_id,
    }
    if described != info:
        write_file(info_file, (json.dumps(described, indent=2) + "\n").encode())
    return m
