"""The ingest loop: take messages from the MQTT inbox in batches, journal them, then acknowledge them.

One thread owns the journal's write connection for intake. Per batch: every message goes through
the pipeline, all outcomes are recorded in one transaction (one fsync), and only after COMMIT
returns are the messages PUBACKed, in arrival order (SPEC §1, DESIGN "Ack after commit"). If the
journal cannot be written, nothing is acked (the broker keeps the messages), the loop reports the
cause and retries the same batch with capped backoff until it succeeds or the agent stops.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeagent import failpoints
from edgeagent.clock import Clock
from edgeagent.errors import JournalError
from edgeagent.exits import ExitRules
from edgeagent.journal import BodyBuilder, Due, Journal, Recorded, RepeatRule
from edgeagent.model import Ignored
from edgeagent.mqtt import Message
from edgeagent.pipeline import Pipeline
from edgeagent.requests import Kind

log = logging.getLogger(__name__)

MAX_BATCH = 500
BATCH_WINDOW_S = 0.005  # under load, wait this long for more messages once one arrived: cheap group commit
HOUSEKEEPING_EVERY_S = 600.0
CAR_TYPE_REFRESH_EVERY_S = 5.0
REMATCH_EVERY_S = 1.0


@dataclass
class IngestStats:
    """Counters the daemon reads for status; written only by the ingest thread."""

    batches: int = 0
    entries: int = 0
    exits: int = 0
    rejected: int = 0
    duplicates: int = 0
    ignored: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    journal_error: str | None = None


class IngestLoop:
    """Named, stoppable loop; `step()` runs one batch so tests can drive it by hand."""

    def __init__(
        self,
        *,
        inbox: queue.Queue[Message],
        pipeline: Pipeline,
        journal: Journal,
        ack: Callable[[Message], bool],
        clock: Clock,
        build_body: BodyBuilder,
        repeat_rule: RepeatRule,
        serial_prefix: str,
        exits: ExitRules | None = None,
    ) -> None:
        self.inbox = inbox
        self.pipeline = pipeline
        self.journal = journal
        self.ack = ack
        self.clock = clock
        self.build_body = build_body
        self.repeat_rule = repeat_rule
        self.serial_prefix = serial_prefix
        self.exits = exits
        self._next_rematch = 0.0
        self.stats = IngestStats()
        self._stop = threading.Event()
        self._next_housekeeping = 0.0
        self._next_refresh = 0.0
        self._last_batch = 0
        # Called after a batch with new entries committed, with those entries: the delivery loop's
        # hand-over, so a fresh entry is sent at once, without waiting for a poll or a query.
        self.listeners: list[Callable[[list[Due]], None]] = []
        # Called when requests became due without new reads (an exit read matched its late session).
        self.wakers: list[Callable[[], None]] = []

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Until stopped: take a batch, journal it, ack it. On stop, finish what is already queued."""
        log.info("ingest_started")
        while not self._stop.is_set():
            self.step(timeout=0.5)
        # Ordered shutdown: whatever paho already handed over is journaled and acked before we go.
        while not self.inbox.empty() and self.step(timeout=0, retry=False):
            pass
        log.info("ingest_stopped entries=%d rejected=%d", self.stats.entries, self.stats.rejected)

    def _take_batch(self, timeout: float) -> list[Message]:
        try:
            first = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        # Reads arriving in bunches share one fsync (the window is real time: it waits for real messages).
        # After a batch of one (a quiet lane) a read is committed at once: waiting for company that is not
        # coming only adds latency.
        deadline = time.monotonic() + (BATCH_WINDOW_S if self._last_batch > 1 else 0.0)
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.0005)
        self._last_batch = len(batch)
        return batch

    def step(self, timeout: float = 0.5, *, retry: bool = True) -> bool:
        """One batch. Returns False when the journal refused it (and `retry` is off or we stopped)."""
        mono = self.clock.monotonic()
        self.stats.last_progress = mono
        if mono >= self._next_refresh:
            self.pipeline.car_types.refresh()
            self._next_refresh = mono + CAR_TYPE_REFRESH_EVERY_S
        if mono >= self._next_housekeeping:
            self._housekeeping()
        if self.exits is not None and mono >= self._next_rematch:
            self._next_rematch = mono + REMATCH_EVERY_S
            self._rematch()
        if self.stats.batches and failpoints.armed("ingest-hang"):
            log.error("failpoint ingest-hang: intake stops here")
            self._stop.wait()
            return False
        batch = self._take_batch(timeout)
        if not batch:
            return True
        now = self.clock.now()
        synced = self.clock.trusted()
        processed = [
            self.pipeline.process(
                m.topic,
                m.payload,
                received_at=m.received_at,
                now=now,
                clock_synced=synced,
                received_mono=m.received_mono,
            )
            for m in batch
        ]
        items = [(p.outcome, p.inbound) for p in processed if not isinstance(p.outcome, Ignored)]
        self.stats.ignored += len(batch) - len(items)
        delay = 0.5
        while True:
            try:
                results = self.journal.record_batch(
                    items,
                    serial_prefix=self.serial_prefix,
                    build_body=self.build_body,
                    repeat_rule=self.repeat_rule,
                    now=now,
                    exits=self.exits,
                )
                break
            except JournalError as exc:
                if self.stats.journal_error != str(exc):
                    log.error(
                        "journal_write_failed error=%s batch=%d (not acknowledging; broker keeps them)", exc, len(batch)
                    )
                self.stats.journal_error = str(exc)
                if not retry or self._stop.wait(delay * random.uniform(0.5, 1.0)):
                    return False
                self.stats.last_progress = self.clock.monotonic()
                delay = min(delay * 2, 30.0)
        if self.stats.journal_error is not None:
            log.info("journal_write_recovered")
            self.stats.journal_error = None
        for message in batch:
            self.ack(message)
        fresh = [
            Due(r.id, Kind.ENTRY, r.out_serial_number or "", r.body or b"", 0, inbound.received_at)
            for r, (_, inbound) in zip(results, items, strict=True)
            if r.outcome is Recorded.ENTRY and r.depends_on is None  # one after an inferred exit waits for it
        ]
        if fresh:
            for listener in self.listeners:
                listener(fresh)
        if any(r.outcome is Recorded.EXIT or (r.outcome is Recorded.ENTRY and r.depends_on) for r in results):
            for waker in self.wakers:  # exits (and entries behind an inferred exit) go by the journal's order
                waker()
        for result in results:
            if result.outcome is Recorded.ENTRY:
                self.stats.entries += 1
                log.info("entry_journaled id=%d out_serial_number=%s", result.id, result.out_serial_number)
            elif result.outcome is Recorded.EXIT:
                self.stats.exits += 1
                log.info("exit_journaled id=%d out_serial_number=%s", result.id, result.out_serial_number)
            elif result.outcome is Recorded.HELD:
                self.stats.exits += 1
                log.info("exit_held id=%d (no session yet)", result.id)
            elif result.outcome is Recorded.DUPLICATE:
                self.stats.duplicates += 1
            else:
                self.stats.rejected += 1
        self.stats.batches += 1
        self.stats.last_progress = self.clock.monotonic()
        return True

    def _rematch(self) -> None:
        """Exit reads waiting for their session: matched once it is journaled, orphans after exit_hold_s."""
        assert self.exits is not None
        try:
            matched, orphaned = self.journal.rematch(self.exits, self.clock.now(), self.clock.system())
        except JournalError as exc:
            log.warning("exit_rematch_failed error=%s", exc)
            return
        for row_id in matched:
            log.info("exit_matched id=%d (its session arrived)", row_id)
        for row_id in orphaned:
            log.warning("exit_orphaned id=%d (no session within exit_hold_s; see edgeagent sessions --orphans)", row_id)
        if matched:
            for listener in self.wakers:
                listener()

    def _housekeeping(self) -> None:
        self._next_housekeeping = self.clock.monotonic() + HOUSEKEEPING_EVERY_S
        try:
            removed = self.journal.prune(self.clock.now())
            if removed:
                log.info("journal_pruned rows=%d", removed)
        except JournalError as exc:
            log.warning("journal_prune_failed error=%s", exc)
