"""The sandbox over real HTTPS: a real httpx client, our own request_headers, answers verified by verify_response."""

from __future__ import annotations

import email.utils
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from edgeagent import requests as rq
from edgeagent import wechatpay as wp
from edgeagent.errors import ResponseUnverified
from edgeagent.model import CarType, PlateColor, VehicleType
from edgeagent.sandbox import Sandbox, ensure_materials
from edgeagent.sandbox.ca import mint_ca
from tests.conftest import eventually


@pytest.fixture(scope="module")
def sandbox_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sandbox")
    ensure_materials(directory)  # keys once per module; every test gets a fresh Sandbox on them
    return directory


@pytest.fixture
def sandbox(sandbox_dir: Path) -> Iterator[Sandbox]:
    with Sandbox(sandbox_dir, port=0) as running:
        yield running


@dataclass
class Merchant:
    """The agent's side: the merchant key, the platform keys, and a client that trusts the test CA."""

    sandbox: Sandbox
    client: httpx.Client
    key: RSAPrivateKey
    keys: dict[str, RSAPublicKey]

    def entry(self, number: str = "P1G1-000001", **change: Any) -> bytes:
        req = rq.EntryRequest(
            out_serial_number=number,
            parking_id=self.sandbox.materials.parking_id,
            plate_number="粤B12345",
            enter_timestamp=int(time.time()),
            plate_color=PlateColor.BLUE,
            car_type=CarType.TEMPORARY,
            vehicle_type=VehicleType.SMALL,
            entrance_number="A01",
            entrance_name="南门入口",
        )
        return rq.build_entry_body(replace(req, **change))

    def exit(self, number: str = "P1G1-000001", **change: Any) -> bytes:
        entry = next((e for e in self.sandbox.accepted() if e["out_serial_number"] == number), None)
        req = rq.ExitRequest(
            out_serial_number=number,
            exit_timestamp=(entry["enter_timestamp"] if entry else int(time.time())) + 60,
            plate_number=entry["plate_number"] if entry else "粤B12345",
            plate_color=PlateColor(entry["plate_color"]) if entry else PlateColor.BLUE,
            parking_id=self.sandbox.materials.parking_id,
        )
        return rq.build_exit_body(replace(req, **change))

    def headers(self, body: bytes, **change: Any) -> dict[str, str]:
        m = self.sandbox.materials
        args: dict[str, Any] = {
            "key": self.key,
            "mchid": m.mchid,
            "serial_no": m.merchant_serial_no,
            "body": body,
            "timestamp": int(time.time()),
            "nonce": wp.new_nonce(),
            "wechatpay_serial": m.platform_public_key_id,
            "user_agent": "edgeagent/test",
            "method": "POST",
            "target": rq.ENTRY_PATH,
        }
        return wp.request_headers(**(args | change))

    def post(self, body: bytes, path: str = rq.ENTRY_PATH, **change: Any) -> httpx.Response:
        return self.client.post(path, content=body, headers=self.headers(body, target=path, **change))

    def post_exit(self, body: bytes, **change: Any) -> httpx.Response:
        return self.post(body, rq.EXIT_PATH, **change)

    def get(self, url: str, **change: Any) -> httpx.Response:
        """GET `url` as it goes on the wire, signed over `change["target"]` or else over `url`."""
        return self.client.get(url, headers=self.headers(b"", method="GET", **({"target": url} | change)))

    def verify(self, response: httpx.Response, now: float | None = None) -> int:
        """The answer's verified Wechatpay-Timestamp; raises ResponseUnverified (or StaleAnswer) otherwise."""
        return wp.verify_response(response.headers, response.content, self.keys, time.time() if now is None else now)

    def serial(self, response: httpx.Response, now: float | None = None) -> str:
        """The serial_number of a verified 200 answer to an entry."""
        assert response.status_code == 200, response.text
        self.verify(response, now)
        serial: str = response.json()["serial_number"]
        return serial


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tls_client(base_url: str, ca_file: Path) -> httpx.Client:
    return httpx.Client(base_url=base_url, verify=ssl.create_default_context(cafile=str(ca_file)), timeout=10)


@pytest.fixture
def merchant(sandbox: Sandbox) -> Iterator[Merchant]:
    m = sandbox.materials
    keys = {
        m.platform_public_key_id: wp.load_public_key(m.platform_public_key_file.read_bytes()),
        m.platform_cert_serial: wp.load_public_key(m.platform_cert_file.read_bytes()),
    }
    key = wp.load_private_key(m.merchant_private_key_file.read_bytes())
    with tls_client(sandbox.base_url, sandbox.ca_file) as client:
        yield Merchant(sandbox, client, key, keys)


def error(response: httpx.Response) -> tuple[int, str, str]:
    doc = response.json()
    return response.status_code, doc["code"], doc["message"]


# ---- the happy path and idempotency --------------------------------------------------------------


def test_accepted_entry_is_signed_and_verifies(merchant: Merchant) -> None:
    body = merchant.entry()
    response = merchant.post(body)
    serial = merchant.serial(response)
    assert serial.startswith("WX")
    assert abs(merchant.verify(response) - time.time()) < 5
    assert response.headers["Wechatpay-Serial"] == merchant.sandbox.materials.platform_public_key_id
    date = email.utils.parsedate_to_datetime(response.headers["Date"]).timestamp()
    assert abs(date - time.time()) < 5
    [entry] = merchant.sandbox.accepted()
    assert entry | {"received_at": 0} == json.loads(body) | {
        "serial_number": serial,
        "received_at": 0,
        "request_id": response.headers["Request-ID"],
        "repeats": 0,
    }


def test_same_number_same_body_is_idempotent_and_other_body_is_refused(merchant: Merchant) -> None:
    body = merchant.entry()
    first = merchant.serial(merchant.post(body))
    again = merchant.serial(merchant.post(body))  # a retry: fresh nonce and timestamp, same bytes
    assert again == first
    assert [e["repeats"] for e in merchant.sandbox.accepted()] == [1]
    other = merchant.post(merchant.entry(plate_number="粤B54321"))
    assert error(other)[:2] == (400, "PARAM_ERROR")
    merchant.verify(other)  # errors are signed too
    assert other.json()["detail"]["field"] == "out_serial_number"
    assert len(merchant.sandbox.accepted()) == 1


# ---- what the sandbox refuses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "issue"),
    [
        ({"key": rsa.generate_private_key(public_exponent=65537, key_size=2048)}, "does not verify"),
        ({"mchid": "1900000002"}, "is not this merchant"),
        ({"serial_no": "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"}, "not the merchant API certificate serial"),
        ({"timestamp": int(time.time()) * 1000}, "not Unix seconds"),
    ],
)
def test_bad_signatures_get_401(merchant: Merchant, change: dict[str, Any], issue: str) -> None:
    response = merchant.post(merchant.entry(), **change)
    status, code, message = error(response)
    assert (status, code) == (401, "SIGN_ERROR")
    assert issue in message
    assert merchant.sandbox.accepted() == []


def test_signature_must_cover_the_exact_bytes(merchant: Merchant) -> None:
    body = merchant.entry()
    resent = body.replace(b'"A01"', b'"A02"')  # same length, other bytes than were signed
    response = merchant.client.post(rq.ENTRY_PATH, content=resent, headers=merchant.headers(body))
    assert error(response)[:2] == (401, "SIGN_ERROR")
    detail = response.json()["detail"]
    assert detail["sign_information"]["url"] == rq.ENTRY_PATH
    assert detail["location"] == "authorization"


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer abc", 'WECHATPAY2-SHA256-RSA2048 mchid="1900000001"'],
)
def test_malformed_authorization_gets_401(merchant: Merchant, authorization: str) -> None:
    body = merchant.entry()
    headers = merchant.headers(body) | {"Authorization": authorization}
    response = merchant.client.post(rq.ENTRY_PATH, content=body, headers=headers)
    assert error(response)[:2] == (401, "SIGN_ERROR")


@pytest.mark.parametrize("skew", [-300, 300, -86400])
def test_stale_timestamp_gets_401(merchant: Merchant, skew: int) -> None:
    response = merchant.post(merchant.entry(), timestamp=int(time.time()) + skew)
    status, code, message = error(response)
    assert (status, code) == (401, "SIGN_ERROR")
    assert "off the server clock" in message
    inside = 290 if skew > 0 else -290
    assert merchant.post(merchant.entry(), timestamp=int(time.time()) + inside).status_code == 200


def test_reused_nonce_gets_401(merchant: Merchant) -> None:
    body = merchant.entry()
    headers = merchant.headers(body)
    assert merchant.client.post(rq.ENTRY_PATH, content=body, headers=headers).status_code == 200
    replay = merchant.client.post(rq.ENTRY_PATH, content=body, headers=headers)
    status, code, message = error(replay)
    assert (status, code) == (401, "SIGN_ERROR")
    assert "already used" in message


def test_wrong_parking_id_gets_400(merchant: Merchant) -> None:
    response = merchant.post(merchant.entry(parking_id="WXPARK999"))
    assert error(response)[:2] == (400, "PARAM_ERROR")
    assert response.json()["detail"] == {"field": "parking_id", "location": "body", "issue": "unknown parking lot"}


def test_bad_body_gets_400_naming_the_field(merchant: Merchant) -> None:
    doc = json.loads(merchant.entry()) | {"sub_mchid": "1900000009"}
    body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    response = merchant.post(body)
    assert error(response)[:2] == (400, "PARAM_ERROR")
    assert response.json()["detail"] == {"field": "sub_mchid", "location": "body", "issue": "unknown field"}


def test_missing_user_agent_gets_400(merchant: Merchant) -> None:
    body = merchant.entry()
    request = merchant.client.build_request("POST", rq.ENTRY_PATH, content=body, headers=merchant.headers(body))
    del request.headers["User-Agent"]
    response = merchant.client.send(request)
    status, code, message = error(response)
    assert (status, code) == (400, "INVALID_REQUEST")
    assert "User-Agent" in message


@pytest.mark.parametrize(
    ("header", "value", "status"),
    [
        ("Accept", "text/html", 400),
        ("Accept", "*/*", 200),
        ("Accept", "application/json, text/plain", 200),
        ("Content-Type", "text/plain", 400),
        ("Content-Type", "application/json; charset=utf-8", 200),
        ("Wechatpay-Serial", "PUB_KEY_ID_0000000000000000000000000000000000", 400),
    ],
)
def test_request_headers_are_checked(merchant: Merchant, header: str, value: str, status: int) -> None:
    body = merchant.entry()
    response = merchant.client.post(rq.ENTRY_PATH, content=body, headers=merchant.headers(body) | {header: value})
    assert response.status_code == status
    if status == 400:
        assert response.json()["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v3/parking/reminders/payment"), ("GET", rq.ENTRY_PATH), ("POST", rq.PARKING_LOT_PATH)],
)
def test_unknown_path_gets_404(merchant: Merchant, method: str, path: str) -> None:
    body = merchant.entry() if method == "POST" else b""
    headers = merchant.headers(body, method=method, target=path)
    response = merchant.client.request(method, path, content=body, headers=headers)
    assert error(response)[:2] == (404, "NOT_FOUND")
    merchant.verify(response)


def test_errors_are_signed_too(merchant: Merchant) -> None:
    response = merchant.post(merchant.entry(parking_id="WXPARK999"))
    wp.verify_response(response.headers, response.content, merchant.keys, time.time())
    assert response.headers["Request-ID"]
    assert response.headers["Date"]


# ---- platform-certificate mode -------------------------------------------------------------------


def test_certificates_round_trip(merchant: Merchant) -> None:
    m = merchant.sandbox.materials
    headers = merchant.headers(b"", method="GET", target="/v3/certificates", wechatpay_serial="")
    response = merchant.client.get("/v3/certificates", headers=headers)
    assert response.status_code == 200
    assert response.headers["Wechatpay-Serial"] == m.platform_cert_serial
    apiv3 = m.apiv3_key_file.read_bytes().strip()
    keys = wp.parse_certificates(response.content, apiv3)
    assert list(keys) == [m.platform_cert_serial]
    wp.verify_response(response.headers, response.content, keys, time.time())
    item = response.json()["data"][0]
    assert item["encrypt_certificate"]["associated_data"] == "certificate"
    assert item["effective_time"].endswith("+08:00")
    # an entry that asks for certificate signatures (or names no key) is answered under the certificate
    answer = merchant.post(merchant.entry(), wechatpay_serial="")
    assert answer.headers["Wechatpay-Serial"] == m.platform_cert_serial
    assert wp.verify_response(answer.headers, answer.content, keys, time.time())


# ---- knobs ---------------------------------------------------------------------------------------


def test_latency(merchant: Merchant) -> None:
    merchant.sandbox.set(latency_s=0.3)
    started = time.monotonic()
    assert merchant.post(merchant.entry()).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_fail_status_for_a_count_then_recovers(merchant: Merchant) -> None:
    merchant.sandbox.set(fail_status=503, fail_count=2, retry_after=7)
    body = merchant.entry()
    for _ in range(2):
        response = merchant.post(body)
        assert error(response)[:2] == (503, "SERVICE_UNAVAILABLE")
        assert wp.retry_after(response.headers["Retry-After"], time.time()) == 7.0
        merchant.verify(response)
        assert merchant.sandbox.accepted() == []
    merchant.serial(merchant.post(body))
    assert [(r["status"], r["code"], r["out_serial_number"]) for r in merchant.sandbox.requests()] == [
        (503, "SERVICE_UNAVAILABLE", "P1G1-000001"),
        (503, "SERVICE_UNAVAILABLE", "P1G1-000001"),
        (200, "", "P1G1-000001"),
    ]
    assert merchant.sandbox.knobs()["fail_status"] == 0


def test_fail_status_until_changed(merchant: Merchant) -> None:
    merchant.sandbox.set(fail_status=500)
    for _ in range(3):
        response = merchant.post(merchant.entry())
        assert error(response)[:2] == (500, "SYSTEM_ERROR")
        assert "Retry-After" not in response.headers
    merchant.sandbox.set(fail_status=0)
    assert merchant.post(merchant.entry()).status_code == 200


def test_rate_limited_429(merchant: Merchant) -> None:
    merchant.sandbox.set(fail_status=429, fail_count=1, retry_after=2)
    response = merchant.post(merchant.entry())
    assert error(response)[:2] == (429, "RATELIMIT_EXCEEDED")
    assert response.headers["Retry-After"] == "2"


@pytest.mark.parametrize(
    ("knob", "match"),
    [
        ({"bad_signature": True}, "bad signature"),
        ({"no_signature": True}, "missing header Wechatpay-Timestamp"),
        ({"stale_timestamp_s": -600}, "-600 s off"),
    ],
)
def test_spoiled_answers_accept_the_entry_and_stay_idempotent(
    merchant: Merchant, knob: dict[str, Any], match: str
) -> None:
    merchant.sandbox.set(**knob)
    body = merchant.entry()
    spoiled = merchant.post(body)
    assert spoiled.status_code == 200
    with pytest.raises(ResponseUnverified, match=match):
        merchant.verify(spoiled)
    [entry] = merchant.sandbox.accepted()
    merchant.sandbox.set(bad_signature=False, no_signature=False, stale_timestamp_s=0)
    assert merchant.serial(merchant.post(body)) == entry["serial_number"]
    assert len(merchant.sandbox.accepted()) == 1


def test_date_offset_skews_the_sandbox_clock(merchant: Merchant) -> None:
    merchant.sandbox.set(date_offset_s=1000)
    body = merchant.entry()
    refused = merchant.post(body)
    assert error(refused)[:2] == (401, "SIGN_ERROR")
    offset = email.utils.parsedate_to_datetime(refused.headers["Date"]).timestamp() - time.time()
    assert 990 < offset < 1010
    corrected = int(time.time() + offset)  # what the agent does with the Date header (SPEC §5)
    accepted = merchant.post(body, timestamp=corrected)
    assert merchant.serial(accepted, now=time.time() + offset).startswith("WX")


def test_drop_connection(merchant: Merchant) -> None:
    merchant.sandbox.set(drop_connection=True, fail_count=1)
    body = merchant.entry()
    with pytest.raises(httpx.TransportError):
        merchant.post(body)
    assert merchant.sandbox.accepted() == []
    assert merchant.post(body).status_code == 200
    assert [r["status"] for r in merchant.sandbox.requests()] == [None, 200]


def test_non_json_error(merchant: Merchant) -> None:
    merchant.sandbox.set(non_json_error=True, fail_count=1)
    response = merchant.post(merchant.entry())
    assert response.status_code == 500
    assert response.headers["Content-Type"].startswith("text/html")
    assert "Wechatpay-Signature" not in response.headers
    assert response.content.startswith(b"<html>")
    with pytest.raises(ResponseUnverified, match="missing header"):
        merchant.verify(response)
    assert merchant.sandbox.accepted() == []


def test_knobs_are_validated(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="unknown knob"):
        sandbox.set(fail_statuss=503)
    with pytest.raises(ValueError, match="fail_status"):
        sandbox.set(fail_status=999)
    with pytest.raises(ValueError, match="bad_signature"):
        sandbox.set(bad_signature="yes")
    with pytest.raises(ValueError, match="latency_s"):
        sandbox.set(latency_s=-1)
    assert sandbox.knobs()["fail_status"] == 0


def test_control_endpoints(merchant: Merchant) -> None:
    client = merchant.client
    knobs = client.post("/_sandbox/control", json={"fail_status": 502, "fail_count": 1}).json()
    assert (knobs["fail_status"], knobs["fail_count"]) == (502, 1)
    assert merchant.post(merchant.entry()).status_code == 502
    assert merchant.post(merchant.entry()).status_code == 200
    assert client.get("/_sandbox/accepted").json() == merchant.sandbox.accepted()
    seen = client.get("/_sandbox/requests").json()
    assert [r["status"] for r in seen] == [502, 200]  # control calls are not API requests
    bad = client.post("/_sandbox/control", json={"latency": 1})
    assert bad.status_code == 400
    assert "unknown knob" in bad.json()["error"]
    assert client.get("/_sandbox/nothing").status_code == 404


# ---- exits (SPEC §8, §10) --------------------------------------------------------------------------


def test_exit_answers_204_signed_over_the_empty_body(merchant: Merchant) -> None:
    merchant.serial(merchant.post(merchant.entry()))
    body = merchant.exit()
    response = merchant.post_exit(body)
    assert response.status_code == 204
    assert response.content == b""
    assert "Content-Type" not in response.headers
    assert abs(merchant.verify(response) - time.time()) < 5  # §3.2: the last line is just "\n"
    [exit] = merchant.sandbox.exits()
    assert exit | {"received_at": 0} == json.loads(body) | {
        "received_at": 0,
        "request_id": response.headers["Request-ID"],
        "repeats": 0,
    }
    assert merchant.client.get("/_sandbox/exits").json() == merchant.sandbox.exits()
    kinds = [(r["kind"], r["method"], r["path"], r["status"]) for r in merchant.sandbox.requests()]
    assert kinds == [("entry", "POST", rq.ENTRY_PATH, 200), ("exit", "POST", rq.EXIT_PATH, 204)]


def test_repeated_exit_is_idempotent_and_a_different_one_is_refused(merchant: Merchant) -> None:
    merchant.serial(merchant.post(merchant.entry()))
    body = merchant.exit()
    for _ in range(3):  # retries: fresh nonce and timestamp, same bytes
        response = merchant.post_exit(body)
        assert response.status_code == 204
        merchant.verify(response)
    assert [e["repeats"] for e in merchant.sandbox.exits()] == [2]
    later = json.loads(body)["exit_timestamp"] + 1
    other = merchant.post_exit(merchant.exit(exit_timestamp=later))
    assert error(other)[:2] == (400, "INVALID_REQUEST")
    assert other.json()["detail"]["field"] == "out_serial_number"
    merchant.verify(other)
    assert [e["exit_timestamp"] for e in merchant.sandbox.exits()] == [later - 1]


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"out_serial_number": "P1G1-999999"}, "INVALID_REQUEST", "out_serial_number"),
        ({"parking_id": "WXPARK999"}, "PARAM_ERROR", "parking_id"),
        ({"plate_number": "粤B54321"}, "INVALID_REQUEST", "plate_number"),
        ({"exit_timestamp": 1_700_000_000 - 1}, "INVALID_REQUEST", "exit_timestamp"),
    ],
)
def test_exit_that_does_not_fit_its_entry_is_refused(
    merchant: Merchant, change: dict[str, Any], code: str, field: str
) -> None:
    merchant.serial(merchant.post(merchant.entry(enter_timestamp=1_700_000_000)))
    response = merchant.post_exit(merchant.exit(**change))
    assert error(response)[:2] == (400, code)
    assert response.json()["detail"]["field"] == field
    merchant.verify(response)
    assert merchant.sandbox.exits() == []
    exact = merchant.post_exit(merchant.exit(exit_timestamp=1_700_000_000))  # leaving in the same second is fine
    assert exact.status_code == 204


def test_exit_for_an_unknown_lot_names_parking_id(merchant: Merchant) -> None:
    response = merchant.post_exit(merchant.exit("P1G1-999999", parking_id="WXPARK999"))
    assert error(response)[:2] == (400, "PARAM_ERROR")
    assert response.json()["detail"] == {"field": "parking_id", "location": "body", "issue": "unknown parking lot"}


def test_exit_body_is_read_strictly(merchant: Merchant) -> None:
    merchant.serial(merchant.post(merchant.entry()))
    doc = json.loads(merchant.exit()) | {"pay_state": "PAID"}  # a field we never send
    response = merchant.post_exit(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())
    assert error(response)[:2] == (400, "PARAM_ERROR")
    assert response.json()["detail"] == {"field": "pay_state", "location": "body", "issue": "unknown field"}
    doc = json.loads(merchant.exit()) | {"exit_timestamp": int(time.time() * 1000)}  # milliseconds
    millis = merchant.post_exit(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())
    assert error(millis)[:2] == (400, "PARAM_ERROR")
    assert millis.json()["detail"]["field"] == "exit_timestamp"


def test_exit_signature_covers_its_own_path(merchant: Merchant) -> None:
    merchant.serial(merchant.post(merchant.entry()))
    body = merchant.exit()
    headers = merchant.headers(body, target=rq.ENTRY_PATH)  # signed for another API
    response = merchant.client.post(rq.EXIT_PATH, content=body, headers=headers)
    assert error(response)[:2] == (401, "SIGN_ERROR")
    assert merchant.sandbox.exits() == []


# ---- duplicate_refusal (SPEC §8) -------------------------------------------------------------------


def test_duplicate_refusal_refuses_a_repeated_number(merchant: Merchant) -> None:
    merchant.sandbox.set(duplicate_refusal=True)
    entry = merchant.entry()
    serial = merchant.serial(merchant.post(entry))
    again = merchant.post(entry)
    status, code, message = error(again)
    assert (status, code) == (400, "INVALID_REQUEST")
    assert "重复" in message
    assert again.json()["detail"]["field"] == "out_serial_number"
    merchant.verify(again)
    assert error(merchant.post(merchant.entry(plate_number="粤B54321")))[:2] == (400, "INVALID_REQUEST")
    exit = merchant.exit()
    assert merchant.post_exit(exit).status_code == 204
    status, code, message = error(merchant.post_exit(exit))
    assert (status, code) == (400, "INVALID_REQUEST")
    assert "重复" in message
    assert [e["repeats"] for e in merchant.sandbox.accepted()] == [1]  # identical re-sends are counted
    assert [e["repeats"] for e in merchant.sandbox.exits()] == [1]
    merchant.sandbox.set(duplicate_refusal=False)
    assert merchant.serial(merchant.post(entry)) == serial
    assert merchant.post_exit(exit).status_code == 204


# ---- the lot query (§1.5) --------------------------------------------------------------------------


def test_parking_lot_query(merchant: Merchant) -> None:
    m = merchant.sandbox.materials
    response = merchant.get(rq.parking_lot_target(m.parking_id))
    assert response.status_code == 200
    merchant.verify(response)
    doc = response.json()
    assert doc == {
        "wx_parking_lot_id": m.parking_id,
        "out_parking_lot_id": "SANDBOX-LOT-001",
        "parking_lot_name": doc["parking_lot_name"],
        "parking_lot_address": doc["parking_lot_address"],
        "enabled_state": "ENABLED_STATE_ENABLED",
    }
    assert rq.parse_lot(json.loads(response.content)) == rq.LotState(
        "ENABLED_STATE_ENABLED", "", doc["parking_lot_name"]
    )
    merchant.sandbox.set(lot_enabled_state="ENABLED_STATE_OFFLINE", lot_reason="进场时延过高")
    by_both = merchant.get(f"{rq.PARKING_LOT_PATH}?out_parking_lot_id=SANDBOX-LOT-001&wx_parking_lot_id={m.parking_id}")
    merchant.verify(by_both)
    lot = rq.parse_lot(json.loads(by_both.content))
    assert (lot.enabled_state, lot.reason) == ("ENABLED_STATE_OFFLINE", "进场时延过高")
    [record] = [r for r in merchant.sandbox.requests() if r["status"] == 200][-1:]
    assert (record["kind"], record["method"], record["out_serial_number"]) == ("parking_lot", "GET", None)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("wx_parking_lot_id=WXPARK999", "wx_parking_lot_id"),
        ("out_parking_lot_id=LOT-X", "out_parking_lot_id"),
        ("wx_parking_lot_id=WXPARK001&out_parking_lot_id=LOT-X", "out_parking_lot_id"),
        ("", "wx_parking_lot_id"),
        ("wx_parking_lot_id=", "wx_parking_lot_id"),
        ("wx_parking_lot_id=WXPARK001&wx_parking_lot_id=WXPARK001", "wx_parking_lot_id"),
        ("parking_id=WXPARK001", "parking_id"),
        ("wx_parking_lot_id=%FF", "query"),
    ],
)
def test_parking_lot_query_refuses_unknown_ids(merchant: Merchant, query: str, field: str) -> None:
    response = merchant.get(f"{rq.PARKING_LOT_PATH}?{query}" if query else rq.PARKING_LOT_PATH)
    assert error(response)[:2] == (400, "PARAM_ERROR")
    assert response.json()["detail"]["field"] == field
    assert response.json()["detail"]["location"] == "query"
    merchant.verify(response)


def test_parking_lot_signature_covers_the_target_as_sent(merchant: Merchant) -> None:
    escaped = f"{rq.PARKING_LOT_PATH}?wx_parking_lot_id=WXPARK%30%301"  # WXPARK001, escaped
    assert merchant.get(escaped).status_code == 200
    unescaped = f"{rq.PARKING_LOT_PATH}?wx_parking_lot_id=WXPARK001"
    refused = merchant.get(escaped, target=unescaped)
    assert error(refused)[:2] == (401, "SIGN_ERROR")
    assert refused.json()["detail"]["sign_information"]["url"] == escaped


def test_parking_lot_query_with_a_non_ascii_id(sandbox_dir: Path, tmp_path: Path) -> None:
    lot_dir = tmp_path / "lot"
    shutil.copytree(sandbox_dir, lot_dir)  # the same keys, another parking_id (materials.json is editable)
    info = json.loads((lot_dir / "materials.json").read_text()) | {"parking_id": "沙盒停车场 1号"}
    (lot_dir / "materials.json").write_text(json.dumps(info))
    with Sandbox(lot_dir, port=0) as sandbox, tls_client(sandbox.base_url, sandbox.ca_file) as client:
        m = sandbox.materials
        key = wp.load_private_key(m.merchant_private_key_file.read_bytes())
        keys = {m.platform_public_key_id: wp.load_public_key(m.platform_public_key_file.read_bytes())}
        merchant = Merchant(sandbox, client, key, keys)
        target = rq.parking_lot_target(m.parking_id)
        assert target.isascii() and "%E6%B2%99" in target and "%20" in target
        response = merchant.get(target)
        assert response.status_code == 200, response.text
        merchant.verify(response)
        assert response.json()["wx_parking_lot_id"] == "沙盒停车场 1号"
        raw = f"{rq.PARKING_LOT_PATH}?wx_parking_lot_id=沙盒停车场%201号"  # httpx encodes it on the way out
        refused = merchant.get(raw)  # signed over the unencoded text
        assert error(refused)[:2] == (401, "SIGN_ERROR")
        assert refused.json()["detail"]["sign_information"]["url"].isascii()


# ---- replay_answer (the clock test's adversary) ----------------------------------------------------


def test_replay_answer_repeats_the_first_answer_under_a_fresh_date(merchant: Merchant) -> None:
    first = merchant.post(merchant.entry("P1G1-000001"))
    serial = merchant.serial(first)
    merchant.sandbox.set(replay_answer=True, date_offset_s=1000)
    replayed = merchant.post(merchant.entry("P1G1-000002"), timestamp=int(time.time()) + 1000)
    assert replayed.status_code == 200
    assert replayed.content == first.content  # the first entry's serial_number
    for name in ("Wechatpay-Timestamp", "Wechatpay-Nonce", "Wechatpay-Signature", "Wechatpay-Serial", "Request-ID"):
        assert replayed.headers[name] == first.headers[name]
    date = email.utils.parsedate_to_datetime(replayed.headers["Date"]).timestamp()
    assert 990 < date - time.time() < 1010  # fresh, from the (skewed) sandbox clock
    with pytest.raises(wp.StaleAnswer):
        merchant.verify(replayed, now=time.time() + 1000)  # judged by the clock its Date suggests
    assert merchant.serial(replayed) == serial  # within 300 s of the real clock it verifies: a replay
    assert [e["out_serial_number"] for e in merchant.sandbox.accepted()] == ["P1G1-000001"]  # not processed
    assert [r["replayed"] for r in merchant.sandbox.requests()] == [False, True]
    merchant.sandbox.set(replay_answer=False)
    fresh = merchant.post(merchant.entry("P1G1-000002"), timestamp=int(time.time()) + 1000)
    assert merchant.serial(fresh, now=time.time() + 1000) != serial


def test_replay_age_gives_a_correctly_signed_stale_answer(merchant: Merchant) -> None:
    merchant.sandbox.set(replay_answer=True, replay_age_s=3600)
    answer = merchant.post(merchant.entry())
    assert answer.status_code == 200
    with pytest.raises(wp.StaleAnswer) as caught:
        merchant.verify(answer)
    assert abs(caught.value.timestamp - (time.time() - 3600)) < 5
    date = email.utils.parsedate_to_datetime(answer.headers["Date"]).timestamp()
    assert abs(date - time.time()) < 5
    assert merchant.sandbox.accepted() == []
    merchant.sandbox.set(replay_answer=False)
    assert merchant.serial(merchant.post(merchant.entry()))


def test_replay_answer_only_touches_entries(merchant: Merchant) -> None:
    merchant.serial(merchant.post(merchant.entry()))
    merchant.sandbox.set(replay_answer=True)
    assert merchant.post_exit(merchant.exit()).status_code == 204
    assert merchant.get(rq.parking_lot_target(merchant.sandbox.materials.parking_id)).status_code == 200
    assert not any(r["replayed"] for r in merchant.sandbox.requests())


# ---- TLS, materials and the config fragment ------------------------------------------------------


def test_wrong_ca_fails_tls_verification(sandbox: Sandbox, tmp_path: Path) -> None:
    _, other_ca = mint_ca()
    (tmp_path / "other.pem").write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    with tls_client(sandbox.base_url, tmp_path / "other.pem") as client, pytest.raises(httpx.ConnectError) as caught:
        client.get("/_sandbox/requests")
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    with tls_client(sandbox.base_url.replace("127.0.0.1", "localhost"), sandbox.ca_file) as client:
        assert client.get("/_sandbox/requests").json() == []


def test_config_fragment_and_materials(sandbox: Sandbox, sandbox_dir: Path) -> None:
    m = sandbox.materials
    text = m.config_file.read_text()
    table = tomllib.loads(text)["wechatpay"]
    assert table == {
        "mchid": "1900000001",
        "merchant_serial_no": m.merchant_serial_no,
        "merchant_private_key": str(m.merchant_private_key_file),
        "platform_public_key": str(m.platform_public_key_file),
        "platform_public_key_id": m.platform_public_key_id,
        "base_url": sandbox.base_url,
        "ca_file": str(m.ca_file),
        "timeout_s": 10,
    }
    assert f'# apiv3_key_file = "{m.apiv3_key_file}"' in text
    assert all(Path(table[k]).is_absolute() and Path(table[k]).exists() for k in ("merchant_private_key", "ca_file"))
    assert len(m.merchant_serial_no) == 40 and m.merchant_serial_no == m.merchant_serial_no.upper()
    assert m.platform_public_key_id.startswith("PUB_KEY_ID_") and m.platform_public_key_id[11:].isdigit()
    assert len(m.platform_public_key_id) == 11 + 32
    assert m.parking_id == "WXPARK001"
    for secret in (m.merchant_private_key_file, m.platform_private_key_file, m.server_key_file, m.apiv3_key_file):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600, secret
    before = {p.name: p.read_bytes() for p in sandbox_dir.iterdir() if p.suffix != ".toml"}
    assert ensure_materials(sandbox_dir) == m  # a restart reuses everything
    assert {p.name: p.read_bytes() for p in sandbox_dir.iterdir() if p.suffix != ".toml"} == before


def test_materials_repair_what_is_missing(tmp_path: Path) -> None:
    first = ensure_materials(tmp_path)
    merchant_key = first.merchant_private_key_file.read_bytes()
    first.server_cert_file.unlink()
    first.platform_cert_file.unlink()
    second = ensure_materials(tmp_path)
    assert second.merchant_private_key_file.read_bytes() == merchant_key
    assert second.merchant_serial_no == first.merchant_serial_no
    assert second.server_cert_file.exists()
    assert second.platform_cert_serial != first.platform_cert_serial
    assert json.loads((tmp_path / "materials.json").read_text())["platform_cert_serial"] == second.platform_cert_serial


# ---- the CLI command -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_signalled(sandbox_dir: Path, tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    with (tmp_path / "stderr").open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "sandbox", "--dir", str(sandbox_dir), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=tmp_path,
        )
    try:

        def listening() -> bool:
            assert proc.poll() is None, "the sandbox exited"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        eventually(listening, what="the sandbox to listen")
        materials = ensure_materials(sandbox_dir)
        key = wp.load_private_key(materials.merchant_private_key_file.read_bytes())
        with tls_client(f"https://127.0.0.1:{port}", materials.ca_file) as client:
            agent = Merchant(Sandbox(sandbox_dir), client, key, {})  # that Sandbox only lends its materials
            response = agent.post(agent.entry())
        assert response.status_code == 200
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    assert f"https://127.0.0.1:{port}" in out
    assert str(materials.config_file) in out
    log = (tmp_path / "stderr").read_text()
    assert "method=POST path=/v3/parking/reminders/entry status=200" in log
    assert "out_serial_number=P1G1-000001" in log
