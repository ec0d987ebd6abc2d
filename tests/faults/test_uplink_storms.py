"""Uplink storms (issue 6, items 3 and 4): a minute-long outage then a drain in order under the rate
ceiling; 429s without Retry-After; answers slower than the timeout; dropped connections. Each ends with
every entry sent once under its one number."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgeagent.sandbox import Sandbox
from tests.faults.test_delivery_faults import assert_one_number_per_entry, gate  # noqa: F401 - fixture
from tests.integration.delivery_helpers import Gate, journal_rows, max_in_window

pytestmark = pytest.mark.slow


def test_a_minute_without_uplink_then_the_backlog_drains_oldest_first(gate: Gate, tmp_path: Path) -> None:  # noqa: F811
    rate = 8
    gate.start(wechatpay={"max_rate_per_s": rate, "max_in_flight": 1}, parking={"repeat_window_s": 0})
    port = int(gate.sandbox.base_url.rsplit(":", 1)[1])
    gate.sandbox.stop()  # the 4G link is gone: connections are refused
    plates = gate.publish_many(40)
    gate.wait_entries(plates)
    time.sleep(60)
    view = gate.status()[1]
    assert view["queue"]["pending"] == 40
    assert "cannot connect" in (view["uplink"]["last_error"] or "")
    gate.sandbox = Sandbox(tmp_path / "sandbox", port=port).start()  # the link is back, same keys
    back = time.time()
    gate.wait_state("sent", 40, timeout=120, interval=0.5)
    assert_one_number_per_entry(gate, plates)
    arrivals = [r for r in gate.entry_requests() if r["status"] == 200]
    assert max_in_window([r["at"] for r in arrivals]) <= rate
    ids = {r["out_serial_number"]: r["id"] for r in journal_rows(gate.state_dir)}
    order = [ids[r["out_serial_number"]] for r in arrivals]
    assert order == sorted(order), "the backlog must drain oldest first"
    print(f"\nminute outage: 40 entries drained in {time.time() - back:.1f} s after the link came back")


def test_429_storm_without_retry_after(gate: Gate) -> None:  # noqa: F811
    gate.start(wechatpay={"max_rate_per_s": 20, "max_in_flight": 4})
    gate.sandbox.set(fail_status=429, fail_count=15)  # no Retry-After: our own backoff must do
    plates = gate.publish_many(10)
    gate.wait_state("sent", 10, timeout=120, interval=0.5)
    assert_one_number_per_entry(gate, plates)
    statuses = [r["status"] for r in gate.entry_requests()]
    assert statuses.count(429) == 15


def test_answers_slower_than_the_timeout_are_retried_without_doubling(gate: Gate) -> None:  # noqa: F811
    gate.start(wechatpay={"timeout_s": 1, "max_rate_per_s": 20, "max_in_flight": 2})
    gate.sandbox.set(latency_s=1.5)  # every answer comes after we gave up: the entry may be accepted anyway
    plates = gate.publish_many(4)
    gate.wait_entries(plates)
    for _ in range(100):
        if len(gate.entry_requests()) >= 4:
            break
        time.sleep(0.2)
    timed_out = gate.wait_status(lambda v: "timeout" in (v["uplink"]["last_error"] or ""), what="timeouts")[1]
    assert timed_out["queue"]["pending"] == 4
    gate.sandbox.set(latency_s=0.8)  # slow but inside the timeout
    gate.wait_state("sent", 4, timeout=120, interval=0.5)
    assert_one_number_per_entry(gate, plates)


def test_dropped_connections_are_retried(gate: Gate) -> None:  # noqa: F811
    gate.start(wechatpay={"max_rate_per_s": 20, "max_in_flight": 4})
    gate.sandbox.set(drop_connection=True, fail_count=8)
    plates = gate.publish_many(6)
    gate.wait_state("sent", 6, timeout=120, interval=0.5)
    assert_one_number_per_entry(gate, plates)
    assert sum(1 for r in gate.sandbox.requests() if r["status"] is None) == 8
