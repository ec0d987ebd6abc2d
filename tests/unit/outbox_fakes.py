"""Stand-ins for stepping the outbox loops by hand (issue 9): a clock moved by the test, executors that run
an attempt at once or when told, a platform key that signs scripted answers, real journal files.

Only the world is faked (time, the network, the worker pool); the journal is a real SQLite file and the
policy, signing and verification are the product's own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from edgeagent import requests, wechatpay
from edgeagent.clock import Clock
from edgeagent.config import Config, load
from edgeagent.journal import Journal, Record
from edgeagent.model import CarType, Entry, Inbound, PlateColor, TimeSource, VehicleType
from edgeagent.platform_keys import PlatformKeys
from edgeagent.policy import Answer
from edgeagent.uplink import Uplink
from tests.unit.test_config import config_text

T0 = 1_800_000_000.0  # the fake system clock's start (2027): entries are journaled at this time
KEY_ID = "PUB_KEY_ID_0119000000012024112700000000000042"  # the platform_public_key_id of test_config's config
PARKING_ID = "WXPARK001"


# -- time -------------------------------------------------------------------------------------------


class FakeClock(Clock):
    """A `Clock` whose system and monotonic readings move only when the test says so."""

    def __init__(self, system: float = T0, monotonic: float = 1000.0) -> None:
        super().__init__()
        self.t_system = system
        self.t_mono = monotonic

    def system(self) -> float:
        return self.t_system

    def monotonic(self) -> float:
        return self.t_mono

    def synchronized(self) -> tuple[bool, str]:
        return True, "test"

    def advance(self, seconds: float) -> None:
        self.t_system += seconds
        self.t_mono += seconds


# -- the worker pool --------------------------------------------------------------------------------


class InlineExecutor(Executor):
    """Runs each submitted attempt at once, in the caller's thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class HeldExecutor(Executor):
    """Keeps submitted attempts on the wire until the test lets them finish (`finish`)."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.submitted: list[Any] = []  # the first argument of every submission (the delivery loop's Due)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.held.append((functools.partial(fn, **kwargs), args))
        self.submitted.append(args[0] if args else None)
        return Future()

    def finish(self, count: int | None = None) -> None:
        """Let the oldest `count` held attempts (all by default) reach the API and come back."""
        count = len(self.held) if count is None else count
        now, self.held = self.held[:count], self.held[count:]
        for fn, args in now:
            fn(*args)


# -- keys -------------------------------------------------------------------------------------------


@functools.cache
def rsa_key(name: str) -> RSAPrivateKey:
    """A 2048-bit RSA key per name, generated once per test session."""
    del name
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def platform_key() -> RSAPrivateKey:
    return rsa_key("platform")


def merchant_key() -> RSAPrivateKey:
    return rsa_key("merchant")


def write_key_files(directory: Path) -> tuple[Path, Path]:
    """The merchant's private key and the platform's public key as PEM files (what a config names)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, pub = directory / "apiclient_key.pem", directory / "wechatpay_pub.pem"
    key.write_bytes(
        merchant_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key.chmod(0o600)  # a group- or world-readable private key is refused (issue 12)
    pub.write_bytes(
        platform_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key, pub


def gate_config(tmp_path: Path, *, max_in_flight: int = 4, max_rate_per_s: float = 10.0) -> Config:
    """A complete SPEC §3 config (test_config's) with real key files and the given delivery limits."""
    key, pub = write_key_files(tmp_path / "keys")
    path = tmp_path / "edgeagent.toml"
    path.write_text(config_text(key, pub, state_dir=str(tmp_path / "state")), encoding="utf-8")
    config = load(path)
    wx = dataclasses.replace(config.wechatpay, max_in_flight=max_in_flight, max_rate_per_s=max_rate_per_s)
    return dataclasses.replace(config, wechatpay=wx)


def platform_keys(config: Config, clock: Clock) -> PlatformKeys:
    """The real `PlatformKeys` of a public-key config: it never calls the uplink in that mode."""
    return PlatformKeys(config, cast(Uplink, None), merchant_key(), clock)


# -- answers ----------------------------------------------------------------------------------------


def signed(
    status: int,
    body: bytes | Mapping[str, object] = b"",
    *,
    timestamp: float,
    nonce: str = "",
    key: RSAPrivateKey | None = None,
    serial: str = KEY_ID,
    headers: Mapping[str, str] | None = None,
    at: float | None = None,
) -> Answer:
    """An answer signed as WeChat Pay signs it (§3.2): over `<timestamp>\\n<nonce>\\n<body>\\n`."""
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    ts = str(int(timestamp))
    nonce = nonce or wechatpay.new_nonce()
    signature = wechatpay.sign(key or platform_key(), wechatpay.response_message(ts, nonce, raw))
    found = {
        "wechatpay-timestamp": ts,
        "wechatpay-nonce": nonce,
        "wechatpay-signature": signature,
        "wechatpay-serial": serial,
        "request-id": f"req-{nonce[:8]}",
        **{k.lower(): v for k, v in (headers or {}).items()},
    }
    when = timestamp if at is None else at
    return Answer(status, found, raw, "https://api.test", when, when)


def error_body(code: str, message: str, detail: object = None) -> dict[str, object]:
    doc: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        doc["detail"] = detail
    return doc


# -- journal ----------------------------------------------------------------------------------------


def make_entry(n: int, *, when: int = int(T0), parking_id: str = PARKING_ID) -> Entry:
    """The n-th car through entrance A01 (a fresh plate and dedup key per n)."""
    return Entry(
        camera="south-1",
        lane="1",
        dedup_key=f"south-1|id|read{n}",
        plate_number=f"粤B{n:05d}",
        plate_color=PlateColor.BLUE,
        vehicle_type=VehicleType.SMALL,
        car_type=CarType.TEMPORARY,
        enter_timestamp=when,
        time_source=TimeSource.CAMERA,
        clock_synced=True,
        entrance_number="A01",
        entrance_name="南门入口",
        parking_id=parking_id,
    )


def no_repeats(entry: Entry, recent: Callable[[str, float, float], int | None]) -> None:
    """A repeat rule that never finds a repeat (each test's plates are distinct anyway)."""
    del entry, recent


def record_entries(journal: Journal, numbers: range | list[int], now: float, **kw: Any) -> list[Record]:
    """Journal one entry per number in one batch, as ingest does."""
    items: list[tuple[Entry | Any, Inbound]] = [
        (make_entry(n, **kw), Inbound("anpr/south-1/plate", now, "0" * 64, 10, b"{}")) for n in numbers
    ]
    return journal.record_batch(
        items, serial_prefix="P1G1", build_body=requests.entry_body, repeat_rule=no_repeats, now=now
    )


@dataclass
class Call:
    """One request as the fake API saw it."""

    at_mono: float
    at_now: float  # the corrected clock (what the request was signed with)
    at_system: float
    out_serial_number: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeApi:
    """The `send` of a delivery loop: records each request and answers with `script(call, n)`."""

    clock: FakeClock
    script: Callable[[Call, int], Answer | Any]
    calls: list[Call] = field(default_factory=list)

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        doc = json.loads(body)
        number = str(doc["out_serial_number"])
        call = Call(self.clock.monotonic(), self.clock.now(), self.clock.system(), number, path, headers)
        self.calls.append(call)
        return self.script(call, len(self.calls))

    def numbers(self) -> list[str]:
        return [c.out_serial_number for c in self.calls]
