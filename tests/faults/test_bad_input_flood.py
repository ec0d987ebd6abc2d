"""Bad input flood (issue 6, item 8): thousands of malformed, oversized, binary and hostile payloads mixed
into good reads. Every good read is delivered, every bad one is kept as rejected with a reason, the
agent keeps running, and its memory stays flat."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from edgeagent.journal import Journal
from edgeagent.sandbox import Sandbox
from tests.conftest import Agent, Broker, Publisher, eventually
from tests.integration.delivery_helpers import gate_config, journal_rows, status

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("EDGEAGENT_FAULT_SEED", "20261127"))
CAMERAS = (
    '[[cameras]]\nid = "south-1"\ntopic = "anpr/south-1/plate"\nformat = "generic"\n\n'
    '[[cameras]]\nid = "hik-1"\ntopic = "hikvision/hik-1/anpr"\nformat = "hikvision"\n\n'
    '[[cameras]]\nid = "vz-1"\ntopic = "device/+/message/up/ivs_result"\nformat = "vzenith"\n\n'
    '[[entrances]]\nnumber = "A01"\nname = "南门入口"\nsources = ["south-1:1", "hik-1", "vz-1"]\n'
)


def hostile(rng: random.Random, n: int) -> bytes:
    """One bad payload of many kinds; `n` makes each unique (so each is its own rejected row)."""
    kind = n % 12
    tag = f"{n}".encode()
    if kind == 0:
        return rng.randbytes(rng.randint(1, 300)) + tag  # binary garbage
    if kind == 1:
        return b'{"plate": "\xff\xfe' + tag + b'"}'  # not UTF-8
    if kind == 2:
        return b'{"plate": "' + tag  # truncated JSON
    if kind == 3:
        return b"[" * 50_000 + tag  # recursion bomb
    if kind == 4:
        return json.dumps([n, "array"]).encode()
    if kind == 5:
        return json.dumps({"plate": f"ABC'; DROP TABLE events;-- {n}", "lane": 1}).encode()
    if kind == 6:
        return json.dumps({"plate": "粤B12345", "time": f"yesterday {n}", "lane": 1}).encode()
    if kind == 7:
        return json.dumps({"plate": "粤B12345", "color": f"purple{n}", "lane": 1}).encode()
    if kind == 8:
        return json.dumps({"plate": n, "lane": 1}).encode()  # wrong type
    if kind == 9:
        return json.dumps({"plate": "粤B12345", "lane": 9, "n": n}).encode()  # unmapped lane
    if kind == 10:
        return json.dumps({"plate": "🚗" * 20, "n": n, "lane": 1}).encode()
    return json.dumps({"plate": "无牌", "n": n, "lane": 1}).encode()  # no plate


XML_BOMB = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;">'
    b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">]><EventNotificationAlert><eventType>ANPR</eventType>'
    b"<licensePlate>&lol3;</licensePlate></EventNotificationAlert>"
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_bad_input_flood(tmp_path: Path, broker: Broker, sandbox: Sandbox) -> None:
    rng = random.Random(SEED)
    config = gate_config(
        tmp_path / "edgeagent.toml",
        sandbox,
        state_dir=tmp_path / "state",
        mqtt_port=broker.port,
        wechatpay={"max_rate_per_s": 200},
        parking={"repeat_window_s": 0},
        cameras=CAMERAS,
    )
    agent = Agent(config, tmp_path / "agent.log")
    agent.start()
    camera = Publisher(broker.port, client_id="flood")
    try:
        eventually(lambda: status(config)[1]["mqtt"]["connected"], timeout=20, what="agent connected")
        good: list[str] = []
        bad = 0
        rss: list[int] = []
        for n in range(3000):
            if n % 10 == 0:
                plate = f"粤{'ABCDEFGH'[n // 1000]}{n:05d}"
                good.append(plate)
                camera.publish("anpr/south-1/plate", {"plate": plate, "lane": 1}, wait=False)
            topic = ("anpr/south-1/plate", "hikvision/hik-1/anpr", "device/e06e0000-00000001/message/up/ivs_result")[
                n // 12 % 3
            ]
            payload = XML_BOMB + str(n).encode() if n % 97 == 0 else hostile(rng, n)
            if n % 500 == 0:
                payload = b'{"plate": "' + b"A" * (3 * 1024 * 1024) + str(n).encode() + b'"}'  # 3 MB
            camera.publish(topic, payload, wait=n % 50 == 0)
            bad += 1
            if n in (1000, 2999):
                assert agent.proc is not None
                rss.append(rss_kib(agent.proc.pid))
        eventually(
            lambda: len(journal_rows(tmp_path / "state")) >= bad + len(good),
            timeout=120,
            interval=0.5,
            what="every read journaled",
        )
        eventually(
            lambda: {a["plate_number"] for a in sandbox.accepted()} >= set(good),
            timeout=120,
            what="every good read delivered",
        )
        assert agent.alive()
        rows = journal_rows(tmp_path / "state")
        rejected = [r for r in rows if r["state"] == "rejected"]
        assert len(rejected) == bad
        assert all(r["reason"] and r["detail"] for r in rejected)
        reasons = {r["reason"] for r in rejected}
        assert {
            "not_utf8",
            "malformed_payload",
            "invalid_plate",
            "bad_field",
            "no_plate",
            "unmapped_lane",
            "payload_too_large",
        } <= reasons, reasons
        assert sorted(r["plate_number"] for r in rows if r["state"] == "sent") == sorted(good)
        assert agent.proc is not None
        rss.append(rss_kib(agent.proc.pid))
        # Flat: a second thousand of hostile input costs no more than a few MiB of resident memory.
        assert rss[-1] - rss[0] < 8 * 1024, f"RSS grew from {rss[0]} to {rss[-1]} KiB"
        journal = Journal(tmp_path / "state" / "journal.sqlite3", readonly=True)
        try:
            huge = [r for r in rejected if r["reason"] == "payload_too_large"]
            assert huge and all(r["payload_size"] > 3 * 1024 * 1024 for r in huge)
            assert all(len(journal.payload_of(r["id"]) or b"") <= 4096 for r in rejected)
        finally:
            journal.close()
    finally:
        camera.close()
        agent.kill()
