"""The ingest loop stepped by hand (issue 9): a real journal file, the real pipeline, a queue standing in for
paho's hand-over and a recording `ack` standing in for the PUBACK (SPEC §1 guarantee 1, STYLE 7).
"""

from __future__ import annotations

import json
import queue
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from edgeagent.config import Config
from edgeagent.exits import ExitRules
from edgeagent.ingest import IngestLoop
from edgeagent.journal import BodyBuilder, Due, Journal, Record, RepeatRule
from edgeagent.model import Entry, ExitRead, Inbound, Rejection
from edgeagent.mqtt import Message
from edgeagent.pipeline import Pipeline
from edgeagent.requests import entry_body
from edgeagent.routing import Router
from edgeagent.screening import CarTypeLists
from tests.unit.outbox_fakes import T0, FakeClock, gate_config, no_repeats

TOPIC = "anpr/south-1/plate"


def message(mid: int, read: dict[str, Any] | None = None, *, dup: bool = False) -> Message:
    payload = json.dumps(read or {"plate": f"粤B{mid:05d}", "event_id": f"e{mid}"}, ensure_ascii=False).encode()
    return Message(TOPIC, payload, mid, 1, 0, T0, dup, False, 1000.0)


class Log:
    """One timeline of commits (seen from another connection) and acks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[str] = []

    def ack(self, m: Message) -> bool:
        # What the broker is told is durable must be visible to any other reader of the file, now.
        reader = Journal(self.path, readonly=True)
        try:
            rows = reader.events(limit=1000)
        finally:
            reader.close()
        self.events.append(f"ack {m.mid} rows={len(rows)}")
        return True


class CommitLog(Journal):
    def __init__(self, path: Path, log: Log, *, readonly: bool = False) -> None:
        super().__init__(path, readonly=readonly)
        self.log = log

    def record_batch(
        self,
        items: Sequence[tuple[Entry | ExitRead | Rejection, Inbound]],
        *,
        serial_prefix: str,
        build_body: BodyBuilder,
        repeat_rule: RepeatRule,
        now: float,
        exits: ExitRules | None = None,
    ) -> list[Record]:
        self.log.events.append(f"begin {len(items)}")
        records = super().record_batch(
            items, serial_prefix=serial_prefix, build_body=build_body, repeat_rule=repeat_rule, now=now, exits=exits
        )
        self.log.events.append("committed")
        return records


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return gate_config(tmp_path)


def ingest(config: Config, journal: Journal, log: Log) -> tuple[IngestLoop, queue.Queue[Message]]:
    inbox: queue.Queue[Message] = queue.Queue()
    lists = CarTypeLists(config.parking.car_type_lists, config.parking.default_car_type)
    loop = IngestLoop(
        inbox=inbox,
        pipeline=Pipeline(config, Router.build(config), lists),
        journal=journal,
        ack=log.ack,
        clock=FakeClock(),
        build_body=entry_body,
        repeat_rule=no_repeats,
        serial_prefix=config.serial_prefix,
    )
    return loop, inbox


def test_acks_follow_the_commit_in_arrival_order(config: Config) -> None:
    config.state_dir.mkdir(parents=True)
    log = Log(config.journal_path)
    loop, inbox = ingest(config, CommitLog(config.journal_path, log), log)
    for m in [message(3), message(1, {"plate": "无牌"}), message(2)]:
        inbox.put(m)
    assert loop.step(timeout=0)
    assert log.events == ["begin 3", "committed", "ack 3 rows=3", "ack 1 rows=3", "ack 2 rows=3"]
    assert (loop.stats.entries, loop.stats.rejected, loop.stats.journal_error) == (2, 1, None)


def test_a_journal_that_cannot_be_written_acks_nothing(config: Config) -> None:
    Journal(config.journal_path).close()  # the file exists, but this connection may not write it
    log = Log(config.journal_path)
    loop, inbox = ingest(config, CommitLog(config.journal_path, log, readonly=True), log)
    inbox.put(message(1))
    inbox.put(message(2))
    assert not loop.step(timeout=0, retry=False)
    assert [e for e in log.events if e.startswith("ack")] == []
    assert loop.stats.journal_error is not None and "readonly" in loop.stats.journal_error
    assert loop.stats.entries == 0

    # The broker still holds both and redelivers them; with a writable journal they are journaled and acked.
    loop.journal = CommitLog(config.journal_path, log)
    inbox.put(message(1, dup=True))
    inbox.put(message(2, dup=True))
    assert loop.step(timeout=0)
    assert [e.split(" rows")[0] for e in log.events if e.startswith("ack")] == ["ack 1", "ack 2"]
    assert loop.stats.entries == 2
    assert loop.stats.journal_error is None


def test_a_closed_journal_connection_acks_nothing(config: Config) -> None:
    config.state_dir.mkdir(parents=True)
    log = Log(config.journal_path)
    journal = CommitLog(config.journal_path, log)
    loop, inbox = ingest(config, journal, log)
    journal.close()
    inbox.put(message(1))
    assert not loop.step(timeout=0, retry=False)
    assert not any(e.startswith("ack") for e in log.events)
    assert loop.stats.journal_error is not None


def test_listeners_receive_the_fresh_entries_as_journaled(config: Config) -> None:
    config.state_dir.mkdir(parents=True)
    log = Log(config.journal_path)
    journal = CommitLog(config.journal_path, log)
    loop, inbox = ingest(config, journal, log)
    offered: list[list[Due]] = []
    loop.listeners.append(offered.append)
    for m in [message(1), message(2, {"plate": ""}), message(3)]:
        inbox.put(m)
    assert loop.step(timeout=0)
    assert len(offered) == 1
    dues = offered[0]
    rows = {r["id"]: r for r in journal.events(limit=100) if r["kind"] == "entry"}
    assert [d.id for d in dues] == sorted(rows)
    for due in dues:
        assert due.out_serial_number == rows[due.id]["out_serial_number"]
        assert due.body == journal.body_of(due.id)
        assert due.attempts == 0
        assert json.loads(due.body)["out_serial_number"] == due.out_serial_number
    # A redelivery (QoS 1 dup) is acknowledged again, but journals and offers nothing new.
    inbox.put(message(1, dup=True))
    assert loop.step(timeout=0)
    assert len(offered) == 1
    assert loop.stats.duplicates == 1
    assert log.events[-1].startswith("ack 1")
