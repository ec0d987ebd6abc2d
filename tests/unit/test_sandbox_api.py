"""The sandbox's transport-free parts: NonceMemory, routing by the kinds table, knob validation, and the
nonce rule through `Api.respond` (no HTTPS here: tests/integration/test_sandbox.py carries it)."""

from __future__ import annotations

import time

import pytest

from edgeagent import requests as rq
from edgeagent import wechatpay as wp
from edgeagent.model import CarType, PlateColor, VehicleType
from edgeagent.sandbox import ensure_materials
from edgeagent.sandbox.api import Api
from edgeagent.sandbox.ca import Materials
from edgeagent.sandbox.nonces import NonceMemory

# ---- NonceMemory ---------------------------------------------------------------------------------


def test_a_nonce_is_refused_until_its_time_is_up() -> None:
    memory = NonceMemory()
    assert not memory.seen("a", until=1300, now=1000)
    assert memory.seen("a", until=1310, now=1299)  # a replay within the window
    assert not memory.seen("a", until=1600, now=1300)  # expired: welcome again, remembered anew
    assert memory.seen("a", until=1700, now=1599)


def test_expiry_need_not_arrive_in_order() -> None:
    memory = NonceMemory()
    memory.seen("late", until=1600, now=1000)  # a request stamped 300 s ahead of the clock
    memory.seen("early", until=1100, now=1000)  # one stamped 200 s behind
    memory.expire(1100)
    assert "early" not in memory
    assert "late" in memory
    assert len(memory) == 1


def test_memory_is_bounded_by_the_window() -> None:
    memory = NonceMemory()
    for i in range(10_000):  # one request a millisecond for 10 s
        assert not memory.seen(f"n{i}", until=1000 + i / 1000 + 300, now=1000 + i / 1000)
    assert len(memory) == 10_000  # all still in their window
    memory.expire(1000 + 10 + 300)
    assert len(memory) == 0
    assert memory._heap == []


def test_memory_is_bounded_by_its_limit() -> None:
    memory = NonceMemory(limit=3)
    for i, nonce in enumerate("abcd"):
        memory.seen(nonce, until=2000 + i, now=1000)
    assert len(memory) == 3
    assert "a" not in memory  # the one closest to expiry made room
    assert all(n in memory for n in "bcd")


def test_an_already_expired_nonce_is_not_kept() -> None:
    memory = NonceMemory()
    assert not memory.seen("x", until=900, now=1000)
    assert len(memory) == 0


def test_one_nonce_costs_the_same_at_50k() -> None:
    memory = NonceMemory()
    now = 1000.0
    for i in range(50_000):
        memory.seen(f"w{i}", until=now + 300, now=now)
    started = time.perf_counter()
    for i in range(1000):
        memory.seen(f"x{i}", until=now + 300, now=now)
    per_request = (time.perf_counter() - started) / 1000
    assert per_request < 0.001  # the old dict rebuild took ~9 ms here


# ---- the Api without transport -------------------------------------------------------------------


@pytest.fixture(scope="module")
def materials(tmp_path_factory: pytest.TempPathFactory) -> Materials:
    return ensure_materials(tmp_path_factory.mktemp("sandbox"))


def signed(m: Materials, method: str, target: str, body: bytes, nonce: str) -> dict[str, str]:
    key = wp.load_private_key(m.merchant_private_key_file.read_bytes())
    headers = wp.request_headers(
        key=key,
        mchid=m.mchid,
        serial_no=m.merchant_serial_no,
        body=body,
        timestamp=int(time.time()),
        nonce=nonce,
        wechatpay_serial=m.platform_public_key_id,
        user_agent="edgeagent/test",
        method=method,
        target=target,
    )
    return {name.lower(): value for name, value in headers.items()}


def test_every_kind_has_a_sandbox_route(materials: Materials) -> None:
    api = Api(materials)
    for spec in rq.KINDS.values():
        target = rq.parking_lot_target(materials.parking_id) if spec.kind is rq.Kind.PARKING_LOT else spec.path
        body = b"" if spec.method == "GET" else b"{}"
        reply = api.respond(spec.method, target, signed(materials, spec.method, target, body, wp.new_nonce()), body)
        assert reply is not None
        assert reply.status != 404, (spec.kind, reply.body)
    assert [r["kind"] for r in api.requests()] == [k.value for k in rq.KINDS]


def test_a_replayed_nonce_is_refused_through_respond(materials: Materials) -> None:
    api = Api(materials)
    body = rq.build_entry_body(
        rq.EntryRequest("T-1", materials.parking_id, "粤B12345", int(time.time()), PlateColor.BLUE,
                        CarType.TEMPORARY, VehicleType.SMALL)
    )  # fmt: skip
    headers = signed(materials, "POST", rq.ENTRY_PATH, body, "nonce-1")
    first = api.respond("POST", rq.ENTRY_PATH, headers, body)
    assert first is not None and first.status == 200
    again = api.respond("POST", rq.ENTRY_PATH, headers, body)
    assert again is not None and (again.status, again.code) == (401, "SIGN_ERROR")
    assert b"already used" in again.body
    assert len(api._nonces) == 1


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"lot_enabled_state": "ENABLED"}, "lot_enabled_state"),
        ({"lot_reason": 3}, "lot_reason"),
        ({"lot_reason": "x" * 257}, "lot_reason"),
        ({"duplicate_refusal": 1}, "duplicate_refusal"),
        ({"replay_answer": "on"}, "replay_answer"),
        ({"replay_age_s": -1}, "replay_age_s"),
        ({"replay_age_s": 1.5}, "replay_age_s"),
    ],
)
def test_new_knobs_are_validated(materials: Materials, knobs: dict[str, object], match: str) -> None:
    api = Api(materials)
    with pytest.raises(ValueError, match=match):
        api.set(**knobs)
    assert api.knobs()["lot_enabled_state"] == rq.LOT_ENABLED


def test_new_knobs_take_their_values(materials: Materials) -> None:
    api = Api(materials, lot_enabled_state="ENABLED_STATE_OFFLINE", lot_reason="进场时延过高")
    api.set(duplicate_refusal=True, replay_answer=True, replay_age_s=600)
    knobs = api.knobs()
    assert (knobs["lot_enabled_state"], knobs["lot_reason"]) == ("ENABLED_STATE_OFFLINE", "进场时延过高")
    assert (knobs["duplicate_refusal"], knobs["replay_answer"], knobs["replay_age_s"]) == (True, True, 600)


def test_control_lists_exits(materials: Materials) -> None:
    api = Api(materials)
    reply = api.control("GET", "/_sandbox/exits", b"")
    assert (reply.status, reply.body) == (200, b"[]")
