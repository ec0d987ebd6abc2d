"""Delivery under faults, black box: the agent runs as a process against the real HTTPS sandbox (SPEC §1, §5).

An outage of the API, rate limiting, `kill -9` in the middle of a drain, and a stretch of forged answer
signatures. What must hold: nothing is lost, every entry keeps its one `out_serial_number`, WeChat Pay
never sees a plate under two numbers, the agent never hammers the API beyond `max_rate_per_s`, and it
honours `Retry-After`. Small `max_rate_per_s` / `max_in_flight` keep each scenario to seconds.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.sandbox import Sandbox
from tests.conftest import Agent, Broker, events, eventually
from tests.integration.delivery_helpers import Gate, integrity, max_in_window, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def gate(tmp_path: Path, broker: Broker, agent_factory: Callable[[Path], Agent]) -> Iterator[Gate]:
    sandbox = Sandbox(tmp_path / "sandbox", port=0).start()
    g = Gate(tmp_path, broker, sandbox, agent_factory)
    yield g
    if g.camera is not None:
        g.camera.close()
    g.sandbox.stop()


def assert_one_number_per_entry(gate: Gate, plates: list[str]) -> None:
    """Every plate is one sent entry; the API holds it once, under that entry's number and nothing else."""
    rows = [r for r in events(gate.config) if r["state"] != "rejected"]  # what a technician sees
    assert sorted(r["plate_number"] for r in rows) == sorted(plates)
    assert {r["state"] for r in rows} == {"sent"}
    accepted = gate.sandbox.accepted()
    assert len(accepted) == len(plates)
    assert Counter(a["plate_number"] for a in accepted) == Counter(plates)  # no plate under two numbers
    ours = {r["out_serial_number"]: r for r in rows}
    assert len(ours) == len(rows)
    for a in accepted:
        row = ours[a["out_serial_number"]]
        assert (row["plate_number"], row["serial_number"]) == (a["plate_number"], a["serial_number"])
    # No request ever carried a number the journal does not know.
    assert {r["out_serial_number"] for r in gate.entry_requests()} == set(ours)


def test_a_20_s_outage_is_ridden_out_below_the_rate_ceiling_and_then_everything_is_delivered(gate: Gate) -> None:
    rate, in_flight, outage_s = 5, 8, 20.0
    # More slots than the rate allows per second: the first round (8 entries due at once) is paced only
    # by max_rate_per_s, so the ceiling is really tested, not just never approached.
    gate.start(wechatpay={"max_rate_per_s": rate, "max_in_flight": in_flight})
    # One entry before the outage opens the TLS connection. The limiter paces dispatches; the sandbox
    # stamps arrivals, and a first request that also pays for a handshake arrives ~0.1 s late, which
    # can put max_rate_per_s + 1 arrivals into one 1 s window (see the report of issue 3).
    warm = gate.publish()["plate"]
    gate.wait_state("sent", 1)
    gate.sandbox.set(fail_status=503)  # until changed
    outage_began = time.time()
    plates = gate.publish_many(30)
    gate.wait_entries(plates)

    # During the outage a technician looking at `status` sees every entry pending and the API's answer.
    began = time.monotonic()
    views: list[dict[str, Any]] = []
    while time.monotonic() - began < outage_s:
        views.append(gate.status()[1])
    assert all(v["queue"]["pending"] == 30 and v["queue"]["sent_24h"] == 1 for v in views)
    assert "HTTP 503 SERVICE_UNAVAILABLE" in views[-1]["uplink"]["last_error"]
    gate.sandbox.set(fail_status=0)
    cleared = time.time()

    gate.wait_state("sent", 31, timeout=90, interval=0.5)
    assert_one_number_per_entry(gate, [warm, *plates])
    requests = gate.entry_requests()
    during = [r["at"] for r in requests if outage_began < r["at"] < cleared]
    assert len(during) >= in_flight, "the outage was hardly tried: the rate check below would be vacuous"
    assert {r["status"] for r in requests if outage_began < r["at"] < cleared} == {503}
    assert max_in_window(during) <= rate
    assert max_in_window([r["at"] for r in requests]) <= rate + 1  # +1: arrival jitter at the window edges
    print(
        f"\noutage: {len(during)} requests in {outage_s:g} s, max {max_in_window(during)} in any 1 s "
        f"(max_rate_per_s={rate}); all 30 sent {time.time() - cleared:.1f} s after the API came back; "
        f"{len(requests)} requests in all"
    )


def test_retry_after_is_honoured_and_holds_the_whole_loop(gate: Gate) -> None:
    wait_s = 3
    gate.sandbox.set(fail_status=429, fail_count=1, retry_after=wait_s)
    gate.start(wechatpay={"max_rate_per_s": 20})
    first = gate.publish()["plate"]
    limited = wait_for(
        lambda: next((r for r in gate.entry_requests() if r["status"] == 429), None), what="the 429 answer"
    )
    # The sandbox logs a request before it answers: wait until the agent has the answer (it is journaled).
    eventually(lambda: "HTTP 429 RATELIMIT_EXCEEDED" in (gate.entries()[0]["last_error"] or ""), what="429 noted")
    # More cars arrive while the API has asked for quiet: they are journaled at once but must wait too.
    later = [gate.publish()["plate"] for _ in range(3)]
    gate.wait_entries(later)
    assert time.time() < limited["at"] + wait_s, "journaled too late to show the hold"

    gate.wait_state("sent", 4, timeout=30)
    requests = gate.entry_requests()
    after = [r for r in requests if r["at"] > limited["at"]]
    assert min(r["at"] for r in after) >= limited["at"] + wait_s  # nothing at all before Retry-After passed
    again = [r for r in after if r["out_serial_number"] == limited["out_serial_number"]]
    assert again and again[0]["status"] == 200  # the same entry, the same number, after the wait
    assert_one_number_per_entry(gate, [first, *later])
    print(f"\n429: next request {min(r['at'] for r in after) - limited['at']:.2f} s after (Retry-After: {wait_s})")


def test_kill_9_during_a_drain_loses_nothing_and_never_doubles_an_entry(gate: Gate) -> None:
    rng = random.Random(20240605)
    gate.sandbox.set(latency_s=0.05)
    gate.start(wechatpay={"max_rate_per_s": 25, "max_in_flight": 4})
    plates = gate.publish_many(200)
    thresholds = [rng.randint(20 + 40 * i, 40 + 40 * i) for i in range(4)]

    def accepted_at_least(count: int) -> Callable[[], bool]:
        return lambda: len(gate.sandbox.accepted()) >= count

    for threshold in thresholds:
        eventually(accepted_at_least(threshold), timeout=60, what=f"{threshold} entries accepted")
        assert gate.agent.kill(signal.SIGKILL) == -signal.SIGKILL
        gate.restart()
    assert gate.agent.starts == 1 + len(thresholds)

    gate.wait_state("sent", 200, timeout=90, interval=0.5)
    assert integrity(gate.state_dir) == "ok"
    assert_one_number_per_entry(gate, plates)
    accepted = gate.sandbox.accepted()
    resent = sum(a["repeats"] for a in accepted)
    print(f"\nkill -9 at {thresholds} accepted: {resent} idempotent re-sends, {len(gate.entry_requests())} requests")


def test_forged_answers_for_a_while_then_fixed_are_all_sent_under_their_first_numbers(gate: Gate) -> None:
    gate.sandbox.set(bad_signature=True)
    # One slot per entry: all five go out in the first round (under sustained failure later rounds
    # retry the oldest first, which would leave a newer entry untried for a long while).
    gate.start(wechatpay={"max_rate_per_s": 20, "max_in_flight": 5})
    plates = gate.publish_many(5)
    numbers = {r["plate_number"]: r["out_serial_number"] for r in gate.wait_entries(plates)}

    # A run of accepted-looking answers that fail verification is a key problem, not each entry's (SPEC §5):
    # delivery pauses with the cause in status instead of re-sending accepted entries for ever.
    _, view = gate.wait_status(lambda v: v["uplink"].get("paused") is True, what="paused on unverified answers")
    assert "failed verification" in view["uplink"]["pause_cause"]
    assert "bad signature" in view["uplink"]["pause_cause"]
    assert view["state"] == "degraded"
    assert gate.rows("sent") == []  # the API took some, but no forged answer counted
    assert gate.sandbox.accepted(), "the API did take entries whose answers were spoiled"
    tried = len(gate.entry_requests())
    eventually(lambda: len(gate.entry_requests()) > tried, timeout=30, interval=0.2, what="a probe after the pause")
    assert gate.rows("sent") == []

    gate.sandbox.set(bad_signature=False)
    sent = gate.wait_state("sent", 5, timeout=60, interval=0.2)
    assert {r["plate_number"]: r["out_serial_number"] for r in sent} == numbers
    assert_one_number_per_entry(gate, plates)
