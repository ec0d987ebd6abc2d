"""Delivery end to end: Mosquitto → `edgeagent run` → the HTTPS sandbox, every part real (SPEC §1, §5, §7).

What a lane technician or the merchant would notice: reads arrive at WeChat Pay with the right
fields and one `out_serial_number` each; `events` and `status` say what happened and why; an entry
the API refuses is dead-lettered with the API's words and can be re-queued under the same number; a
key, TLS or network problem keeps entries pending; an answer that does not verify never counts.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from edgeagent import wechatpay
from edgeagent.clock import Clock
from edgeagent.config import load
from edgeagent.delivery import DeliveryLoop
from edgeagent.journal import Journal
from edgeagent.platform_keys import PlatformKeys
from edgeagent.sandbox import Sandbox
from edgeagent.sandbox.ca import mint_ca
from edgeagent.uplink import Uplink
from tests.conftest import Agent, Broker, Keys, events, eventually, run_cli
from tests.integration.delivery_helpers import DELETE, NORTH, SOUTH, Gate, closed_port_url, now_s, wait_for

ENTRY_FIELDS = (
    "out_serial_number", "parking_id", "plate_number", "enter_timestamp", "plate_color", "car_type",
    "vehicle_type", "entrance_number", "entrance_name", "discount_template_id",
)  # fmt: skip


@pytest.fixture
def gate(tmp_path: Path, broker: Broker, agent_factory: Callable[[Path], Agent]) -> Iterator[Gate]:
    sandbox = Sandbox(tmp_path / "sandbox", port=0).start()
    g = Gate(tmp_path, broker, sandbox, agent_factory)
    yield g
    if g.camera is not None:
        g.camera.close()
    g.sandbox.stop()


def body_of(accepted: dict[str, Any]) -> dict[str, Any]:
    """The entry fields the sandbox accepted, without its own bookkeeping."""
    return {k: v for k, v in accepted.items() if k in ENTRY_FIELDS}


# -- the happy path ---------------------------------------------------------------------------------


def test_reads_arrive_with_their_fields_and_one_number_each(gate: Gate, tmp_path: Path) -> None:
    monthly = tmp_path / "monthly.txt"
    monthly.write_text("# monthly pass holders\n粤B20002\n", encoding="utf-8")
    gate.start(parking={"car_type_lists": {"PLATE_TYPE_MONTHLY": str(monthly)}})
    t = now_s() - 30
    gate.publish(SOUTH, plate="粤B20001", color="blue", time=t, lane=1, vehicle_type="small", event_id="e1")
    gate.publish(SOUTH, plate="粤B·20002", color="yellow", time=t + 1, lane=2, event_id="e2")
    gate.publish(NORTH, plate="京AD92035", time=t + 2, lane=1, event_id="e3")
    sent = gate.wait_state("sent", 3)

    parking_id = gate.sandbox.materials.parking_id
    serials = {r["plate_number"]: r["out_serial_number"] for r in sent}
    expected = [
        {"out_serial_number": serials["粤B20001"], "parking_id": parking_id, "plate_number": "粤B20001",
         "enter_timestamp": t, "plate_color": "PLATE_COLOR_BLUE", "car_type": "PLATE_TYPE_TEMPORARY",
         "vehicle_type": "VEHICLE_TYPE_SMALL", "entrance_number": "A01", "entrance_name": "南门入口"},
        {"out_serial_number": serials["粤B20002"], "parking_id": parking_id, "plate_number": "粤B20002",
         "enter_timestamp": t + 1, "plate_color": "PLATE_COLOR_YELLOW", "car_type": "PLATE_TYPE_MONTHLY",
         "vehicle_type": "VEHICLE_TYPE_LARGE", "entrance_number": "A01", "entrance_name": "南门入口"},
        {"out_serial_number": serials["京AD92035"], "parking_id": parking_id, "plate_number": "京AD92035",
         "enter_timestamp": t + 2, "plate_color": "PLATE_COLOR_GREEN", "car_type": "PLATE_TYPE_TEMPORARY",
         "vehicle_type": "VEHICLE_TYPE_SMALL", "entrance_number": "B01", "entrance_name": "北门入口",
         "discount_template_id": [1001]},
    ]  # fmt: skip
    accepted = gate.sandbox.accepted()
    assert sorted((body_of(a) for a in accepted), key=lambda b: b["plate_number"]) == sorted(
        expected, key=lambda b: str(b["plate_number"])
    )
    assert len(set(serials.values())) == 3
    # One request per entry: nothing was sent twice on the happy path.
    requests = gate.entry_requests()
    assert Counter(r["out_serial_number"] for r in requests) == Counter(serials.values())
    assert {r["status"] for r in requests} == {200}

    # `events --json` (the CLI a technician uses) shows each entry sent with WeChat Pay's serial_number.
    by_serial = {a["out_serial_number"]: a["serial_number"] for a in accepted}
    rows = [r for r in events(gate.config) if r["state"] != "rejected"]
    assert len(rows) == 3
    for row in rows:
        assert row["state"] == "sent"
        assert row["serial_number"] == by_serial[row["out_serial_number"]]
        assert row["serial_number"].startswith("WX")
        assert row["attempts"] == 1 and row["last_error"] is None

    code, view = gate.wait_status(lambda v: v["uplink"]["last_success_at"] is not None and v["queue"]["sent_24h"] == 3)
    assert code == 0 and view["state"] == "ok", view["problems"]
    assert view["uplink"]["base_url_in_use"] == gate.sandbox.base_url
    assert view["uplink"]["last_error"] is None
    assert view["queue"]["pending"] == 0


# -- the API refuses an entry: dead letter, then re-queue -----------------------------------------------


def test_a_refused_entry_is_dead_with_the_apis_words_and_retry_sends_it_under_the_same_number(gate: Gate) -> None:
    gate.sandbox.set(fail_status=400, fail_count=1)  # one 400 about this request itself, naming no config value
    gate.start()
    gate.publish(plate="粤B30001")
    [dead] = gate.wait_state("dead", 1)
    assert "HTTP 400 INVALID_REQUEST" in dead["last_error"]  # the API's code
    assert "HTTP 请求不符合微信支付 APIv3 接口规则" in dead["last_error"]  # and its message
    assert gate.sandbox.accepted() == []
    code, view = gate.wait_status(lambda v: v["queue"]["dead"] == 1)
    assert code == 1 and view["state"] == "degraded"
    assert any("1 dead-lettered" in p for p in view["problems"])

    retried = run_cli("retry", str(dead["id"]), "--config", str(gate.config))
    assert retried.returncode == 0, retried.stderr
    assert "re-queued 1 dead request" in retried.stdout

    [sent] = gate.wait_state("sent", 1)
    assert sent["out_serial_number"] == dead["out_serial_number"]
    [accepted] = gate.sandbox.accepted()
    assert accepted["out_serial_number"] == dead["out_serial_number"]
    assert accepted["plate_number"] == "粤B30001"
    assert sent["serial_number"] == accepted["serial_number"]
    code, view = gate.wait_status(lambda v: v["queue"]["dead"] == 0 and v["queue"]["sent_24h"] == 1)
    assert code == 0, view["problems"]


def test_a_wrong_parking_id_pauses_the_lot_and_retry_rebuild_delivers_under_the_same_numbers(gate: Gate) -> None:
    # A config value the API refuses is the lot's problem, not each car's (SPEC §5): nothing is dead-lettered.
    gate.start(parking={"parking_id": "WXPARK999"})  # a lot the merchant has not registered
    plates = [gate.publish()["plate"] for _ in range(3)]
    gate.wait_entries(plates)
    code, view = gate.wait_status(lambda v: v["uplink"].get("paused") is True, what="delivery paused")
    assert code == 1 and view["state"] == "degraded"
    assert view["uplink"]["pause_field"] == "parking_id"
    assert "parking_id" in view["uplink"]["pause_cause"] and "retry --rebuild" in view["uplink"]["pause_cause"]
    eventually(lambda: len(gate.entry_requests()) >= 2, timeout=30, what="a second refused round after the pause")
    rows = gate.entries()
    assert [r["state"] for r in rows] == ["pending"] * 3, rows
    assert view["queue"]["dead"] == 0
    numbers = [r["out_serial_number"] for r in rows]

    # The technician fixes parking_id in the config and rebuilds the waiting requests: one command.
    gate.configure()
    retried = run_cli("retry", "--all", "--rebuild", "--config", str(gate.config))
    assert retried.returncode == 0, retried.stderr
    assert "re-queued 3 dead or pending requests" in retried.stdout
    assert "bodies rebuilt from the current config" in retried.stdout
    sent = gate.wait_state("sent", 3, timeout=30)
    assert [r["out_serial_number"] for r in sent] == numbers
    accepted = {a["out_serial_number"]: a for a in gate.sandbox.accepted()}
    assert sorted(accepted) == sorted(numbers)
    assert {a["parking_id"] for a in accepted.values()} == {gate.sandbox.materials.parking_id}


def test_retry_works_whatever_the_agents_clock_says(gate: Gate) -> None:
    # This agent's clock runs 1000 s ahead of the API's (say an RTC kept in local time): it signs with
    # the offset it learnt, and `edgeagent retry`, which runs on the system clock, must not wait it out.
    gate.sandbox.set(date_offset_s=-1000)
    gate.start()
    gate.publish()
    gate.wait_state("sent", 1, timeout=30)  # the offset is learnt from this verified answer
    gate.sandbox.set(fail_status=400, fail_count=1)
    gate.publish()

    def one_dead() -> list[dict[str, Any]] | None:
        dead = [r for r in gate.entries() if r["state"] == "dead"]
        return dead or None

    [dead] = wait_for(one_dead, what="the second entry dead")
    assert "INVALID_REQUEST" in dead["last_error"]
    assert run_cli("retry", "--dead", "--config", str(gate.config)).returncode == 0
    gate.wait_state("sent", 2, timeout=15)
    _, view = gate.wait_status(lambda v: v["clock"]["offset_s"] is not None)
    assert -1002 <= view["clock"]["offset_s"] <= -998


def test_retry_of_an_entry_that_is_not_dead_says_so(gate: Gate) -> None:
    gate.start()
    gate.publish()
    [sent] = gate.wait_state("sent", 1)
    result = run_cli("retry", str(sent["id"]), "--config", str(gate.config))
    assert result.returncode == 1
    assert f"not re-queueable (or unknown), left as they are: {sent['id']}" in result.stderr
    assert len(gate.sandbox.accepted()) == 1
    assert len(gate.entry_requests()) == 1


# -- problems that are not the entry's: keep it pending ------------------------------------------------------


def test_a_merchant_key_the_api_does_not_know_pauses_delivery_without_burning_attempts(gate: Gate, keys: Keys) -> None:
    gate.start(wechatpay={"merchant_private_key": str(keys.merchant_key)})  # not the key the sandbox holds
    plates = [gate.publish()["plate"], gate.publish()["plate"]]
    gate.wait_entries(plates)

    code, view = gate.wait_status(lambda v: v["uplink"].get("paused") is True, what="delivery paused")
    assert code == 1 and view["state"] == "degraded"
    assert "SIGN_ERROR" in view["uplink"]["pause_cause"]
    assert "signature does not verify with the merchant key" in view["uplink"]["pause_cause"]
    assert any(p.startswith("delivery paused: HTTP 401 SIGN_ERROR") for p in view["problems"])
    # Paused, then tried again: still refused, still pending, and no attempt counted against the entries.
    eventually(lambda: len(gate.entry_requests()) >= 3, timeout=30, what="a second round after the pause")
    rows = gate.entries()
    assert [r["state"] for r in rows] == ["pending", "pending"]
    assert [r["attempts"] for r in rows] == [0, 0]
    # The oldest entry probes the API after each pause; the others wait rather than be refused too.
    assert "SIGN_ERROR" in rows[0]["last_error"]
    assert {r["status"] for r in gate.entry_requests()} == {401}
    assert gate.sandbox.accepted() == []

    # The fix is a config change: with the merchant's own key the same entries go through.
    numbers = [r["out_serial_number"] for r in rows]
    assert gate.agent.kill(signal.SIGTERM) == 0
    gate.configure()
    gate.restart()
    # At once: the pause the stopped agent was in (8-10 s after two refused rounds) is not carried over.
    sent = gate.wait_state("sent", 2, timeout=4)
    assert [r["out_serial_number"] for r in sent] == numbers
    assert [r["attempts"] for r in sent] == [1, 1]
    assert sorted(a["out_serial_number"] for a in gate.sandbox.accepted()) == sorted(numbers)


def test_an_unreachable_host_keeps_entries_pending_and_status_says_why(gate: Gate) -> None:
    dead_end = closed_port_url()
    gate.start(wechatpay={"base_url": dead_end})
    gate.publish()

    def tried() -> list[dict[str, Any]] | None:
        rows = gate.entries()
        return rows if rows and rows[0]["attempts"] >= 1 else None

    [row] = wait_for(tried, what="a failed attempt recorded")
    assert row["state"] == "pending"
    assert f"cannot connect to {dead_end}" in row["last_error"]
    _, view = gate.wait_status(lambda v: v["uplink"]["last_error"] is not None)
    assert f"cannot connect to {dead_end}" in view["uplink"]["last_error"]
    assert view["uplink"]["base_url_in_use"] == dead_end
    assert view["uplink"]["last_success_at"] is None
    assert view["queue"]["pending"] == 1
    assert gate.sandbox.requests() == []


def test_a_server_certificate_from_another_ca_is_never_trusted(gate: Gate, tmp_path: Path) -> None:
    _, other_ca = mint_ca()
    other = tmp_path / "other-ca.pem"
    other.write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    gate.start(wechatpay={"ca_file": str(other)})
    gate.publish()

    # A certificate we do not trust is a configuration problem, not a flaky network: delivery pauses
    # with the cause in status (degraded) and the entry keeps its attempts, as after a 401.
    code, view = gate.wait_status(lambda v: v["uplink"]["paused"], what="delivery paused")
    assert code == 1 and view["state"] == "degraded"
    assert "TLS certificate not trusted" in view["uplink"]["pause_cause"]
    assert any("TLS" in problem for problem in view["problems"])
    assert view["uplink"]["last_success_at"] is None

    def with_error() -> list[dict[str, Any]] | None:
        rows = gate.entries()
        return rows if rows and rows[0]["last_error"] else None

    [row] = wait_for(with_error, what="the error on the entry")
    assert row["state"] == "pending"
    assert row["attempts"] == 0
    assert "TLS certificate not trusted" in row["last_error"]
    # The handshake failed before any HTTP: the sandbox never saw a request, nothing was sent.
    assert gate.sandbox.requests() == []
    assert gate.sandbox.accepted() == []


# -- answers that do not verify never count -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("knob", "words"),
    [
        ({"no_signature": True}, "missing header Wechatpay-Timestamp"),
        ({"bad_signature": True}, "bad signature"),
        ({"stale_timestamp_s": 600}, "Wechatpay-Timestamp +"),  # +600 s, or +599 by the time it is checked
    ],
    ids=["no-signature", "forged-signature", "timestamp-10-min-off"],
)
def test_an_unverified_2xx_is_not_success_and_the_entry_is_resent_under_its_number(
    gate: Gate, knob: dict[str, Any], words: str
) -> None:
    gate.sandbox.set(**knob)
    gate.start()
    gate.publish()

    def resent() -> list[dict[str, Any]] | None:
        rows = gate.entries()
        return rows if rows and rows[0]["attempts"] >= 2 else None

    [row] = wait_for(resent, timeout=20, what="two unverified attempts")
    assert row["state"] == "pending"
    assert row["serial_number"] is None
    assert row["last_error"].startswith("response_unverified:") and words in row["last_error"]
    # The API did take it (the answer was spoiled on the way back) and stays idempotent.
    [accepted] = gate.sandbox.accepted()
    assert accepted["out_serial_number"] == row["out_serial_number"]
    assert accepted["repeats"] >= 1
    _, view = gate.wait_status(lambda v: v["uplink"].get("response_unverified", 0) >= 2)
    assert view["uplink"]["last_success_at"] is None

    gate.sandbox.set(no_signature=False, bad_signature=False, stale_timestamp_s=0)
    [sent] = gate.wait_state("sent", 1)
    [accepted] = gate.sandbox.accepted()
    assert sent["out_serial_number"] == accepted["out_serial_number"] == row["out_serial_number"]
    assert sent["serial_number"] == accepted["serial_number"]
    requests = gate.entry_requests()
    assert {r["out_serial_number"] for r in requests} == {row["out_serial_number"]}
    # Every request carried the one number; a run of unverified answers pauses delivery (a key problem,
    # SPEC §5: that round costs no attempt), and a corroborated stale timestamp moves our clock (then
    # the API refuses our timestamps until it is back): so requests ≥ attempts ≥ accepted repeats + 1.
    assert len(requests) >= sent["attempts"] >= 2
    assert accepted["repeats"] <= len(requests) - 1


def test_a_non_json_error_page_is_retried_and_named(gate: Gate) -> None:
    gate.sandbox.set(non_json_error=True)
    gate.start()
    gate.publish()

    def tried() -> list[dict[str, Any]] | None:
        rows = gate.entries()
        return rows if rows and rows[0]["attempts"] >= 1 else None

    [row] = wait_for(tried, what="a failed attempt recorded")
    assert row["state"] == "pending"
    assert "HTTP 500 with a non-JSON body: <html>" in row["last_error"]
    _, view = gate.wait_status(lambda v: v["uplink"]["last_error"] is not None)
    assert "non-JSON" in view["uplink"]["last_error"]
    assert gate.sandbox.accepted() == []

    gate.sandbox.set(non_json_error=False)
    [sent] = gate.wait_state("sent", 1)
    assert sent["out_serial_number"] == row["out_serial_number"]
    assert sent["attempts"] >= 2
    assert len(gate.sandbox.accepted()) == 1


# -- failover, certificates, clock ------------------------------------------------------------------------


def test_an_unreachable_primary_fails_over_to_the_backup(gate: Gate) -> None:
    primary = closed_port_url()
    gate.start(wechatpay={"base_url": primary, "backup_base_url": gate.sandbox.base_url})
    plates = [gate.publish()["plate"] for _ in range(3)]
    sent = gate.wait_state("sent", 3)
    assert [r["plate_number"] for r in sent] == plates
    assert sorted(a["plate_number"] for a in gate.sandbox.accepted()) == sorted(plates)
    code, view = gate.wait_status(lambda v: v["uplink"]["last_success_at"] is not None)
    assert view["uplink"]["base_url_in_use"] == gate.sandbox.base_url
    assert code == 0, view["problems"]
    assert f"uplink_failover from={primary} to={gate.sandbox.base_url}" in gate.log()


def test_platform_certificate_mode_fetches_caches_and_delivers(gate: Gate) -> None:
    m = gate.sandbox.materials
    gate.start(
        wechatpay={
            "platform_public_key": DELETE,
            "platform_public_key_id": DELETE,
            "apiv3_key_file": str(m.apiv3_key_file),
        }
    )
    first = gate.publish()["plate"]
    [sent] = gate.wait_state("sent", 1)
    [accepted] = gate.sandbox.accepted()
    assert (accepted["plate_number"], accepted["serial_number"]) == (first, sent["serial_number"])
    seen = [(r["method"], r["path"], r["status"]) for r in gate.sandbox.requests() if r["kind"] != "parking_lot"]
    assert seen[0] == ("GET", "/v3/certificates", 200)  # fetched before the first entry went out
    assert ("POST", "/v3/parking/reminders/entry", 200) in seen

    cache = gate.state_dir / "platform_certificates.json"
    keys = wechatpay.parse_certificates(cache.read_bytes(), m.apiv3_key_file.read_bytes().strip())
    assert list(keys) == [m.platform_cert_serial]
    _, view = gate.wait_status(lambda v: v["uplink"]["last_success_at"] is not None)
    assert view["uplink"]["mode"] == "platform_certificate"

    # A restarted agent verifies with the cached certificate: no second download.
    assert gate.agent.kill(signal.SIGTERM) == 0
    gate.restart()
    gate.publish()
    gate.wait_state("sent", 2)
    assert [r["path"] for r in gate.sandbox.requests()].count("/v3/certificates") == 1


def test_the_clock_offset_is_learnt_from_the_api_and_signatures_follow_it(gate: Gate) -> None:
    gate.sandbox.set(date_offset_s=1000)  # the API's clock is 1000 s ahead of ours
    gate.start()
    gate.publish()
    [sent] = gate.wait_state("sent", 1, timeout=40)
    [accepted] = gate.sandbox.accepted()
    assert sent["serial_number"] == accepted["serial_number"]
    statuses = [(r["status"], r["code"]) for r in gate.entry_requests()]
    assert statuses[0] == (401, "SIGN_ERROR")  # signed with our own clock: refused
    assert statuses[-1] == (200, "")  # signed with the learnt offset: accepted, and the answer verified

    _, view = gate.wait_status(lambda v: v["uplink"]["last_success_at"] is not None)
    assert 998 <= view["clock"]["offset_s"] <= 1002
    assert view["clock"]["synchronized"] is True
    assert any("clock is +1000 s off the API's clock" in p for p in view["problems"])
    text = run_cli("status", "--config", str(gate.config)).stdout
    assert re.search(r"clock +synchronised, offset to API \+(999|1000|1001)\.\ds", text), text


def test_a_clock_far_behind_the_apis_does_not_expire_fresh_entries(gate: Gate) -> None:
    # A gate controller without an RTC can boot days behind (fake-hwclock after a long power-off) and
    # reach the API before NTP. Entries it journals then are seconds old, whatever the two clocks say.
    gate.sandbox.set(fail_status=503, date_offset_s=1000)
    gate.start(parking={"max_entry_age_s": 600})
    gate.publish()

    def tried() -> list[dict[str, Any]] | None:
        rows = gate.entries()
        return rows if rows and rows[0]["attempts"] >= 1 else None

    [row] = wait_for(tried, what="a first attempt (503)")
    assert gate.agent.kill(signal.SIGTERM) == 0

    # The delivery loop again, driven in this process, with the offset already learnt: its first round
    # sweeps for expired entries before anything else.
    config = load(gate.config)
    clock = Clock()
    clock.witness(int(time.time() + 1000), time.time(), time.time(), fresh=True)
    key = wechatpay.load_private_key(config.wechatpay.merchant_private_key.read_bytes())
    uplink = Uplink(config.wechatpay, clock)
    loop = DeliveryLoop(
        config, Journal(config.journal_path), uplink.request, PlatformKeys(config, uplink, key, clock), key, clock
    )
    worker = threading.Thread(target=loop.run, name="delivery-under-test")
    worker.start()
    try:

        def settled() -> dict[str, Any] | None:
            [now] = gate.entries()
            return now if now["attempts"] > row["attempts"] or now["state"] != "pending" else None

        after = wait_for(settled, what="another attempt, or the entry leaving pending")
    finally:
        loop.stop()
        worker.join(timeout=30)
        uplink.close()  # the daemon closes it at shutdown; here the test owns it
    assert after["state"] == "pending", after
    assert after["last_error"].startswith("HTTP 503 SERVICE_UNAVAILABLE"), after  # tried again, not expired
