"""`edgeagent run`: wire config → journal → MQTT → ingest → delivery, run, and shut down in order.

Threads: paho's network thread (hands messages over), `ingest` (journal, then ack), `delivery`
(outbox → WeChat Pay), `lot` (the lot's state, hourly), and the main thread, which writes the
heartbeat for `status`, publishes the retained status, and feeds the systemd watchdog only while the
working loops show progress.

Shutdown on SIGTERM/SIGINT: stop intake (ingest finishes what paho already handed over: commit,
then ack), stop delivery, publish a final status, disconnect, close the journal, STOPPING=1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import threading
import time
from types import FrameType
from typing import Any

from edgeagent import __version__, parking_lot, requests, wechatpay
from edgeagent.clock import Clock
from edgeagent.config import Config
from edgeagent.delivery import DeliveryLoop
from edgeagent.errors import JournalError, KeyFileError
from edgeagent.exits import ExitRules
from edgeagent.ingest import IngestLoop
from edgeagent.journal import Journal, RecentLookup
from edgeagent.model import Entry, Rejection
from edgeagent.mqtt import LinkState, Message, MqttLink
from edgeagent.pipeline import Pipeline
from edgeagent.platform_keys import PlatformKeys
from edgeagent.routing import Router
from edgeagent.screening import CarTypeLists, repeat_of
from edgeagent.status import LatencyView, SessionsView, StatusView, disk_view, from_journal, iso, write_heartbeat
from edgeagent.status import build as build_status
from edgeagent.systemd import Notifier, watchdog_interval_s
from edgeagent.uplink import Uplink

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 10.0
STATUS_PUBLISH_EVERY_S = 30.0
PROGRESS_STALE_S = 20.0  # a working loop silent for this long is stuck: stop feeding the watchdog
LATENCY_EVERY_S = 60.0
SESSIONS_EVERY_S = 15.0
PROGRESS_STALE_MIN_S = 5.0  # … or for WatchdogSec, when that is shorter (but never less than this)


def offline_status(config: Config, reason: str) -> bytes:
    """The retained status a dead or stopped agent leaves on `mqtt.status_topic` (SPEC §7)."""
    return json.dumps(
        {"state": "offline", "version": __version__, "client_id": config.mqtt.client_id, "reason": reason},
        ensure_ascii=False,
    ).encode()


class Daemon:
    """Owns the adapters and threads of one running agent."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.clock = Clock()
        self.started = time.time()
        self.stopping = threading.Event()
        self.notifier = Notifier()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        # The merchant key is read exactly once, here, and only ever held in memory.
        try:
            self.private_key = wechatpay.load_private_key(config.wechatpay.merchant_private_key.read_bytes())
        except OSError as exc:
            raise KeyFileError(f"wechatpay.merchant_private_key: cannot read: {exc.strerror}") from exc
        self.journal = Journal(config.journal_path)
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.link = MqttLink(config.mqtt, config.cameras, self.inbox, will_payload=offline_status(config, "lost"))
        router = Router.build(config)
        car_types = CarTypeLists(config.parking.car_type_lists, config.parking.default_car_type)
        window = config.parking.repeat_window_s

        def repeat_rule(entry: Entry, recent: RecentLookup) -> Rejection | None:
            return repeat_of(entry, recent, window)

        self.ingest = IngestLoop(
            inbox=self.inbox,
            pipeline=Pipeline(config, router, car_types),
            journal=self.journal,
            ack=self.link.ack,
            clock=self.clock,
            build_body=requests.entry_body,
            repeat_rule=repeat_rule,
            serial_prefix=config.serial_prefix,
            exits=ExitRules.from_config(config),
        )
        # Delivery: its own journal connection, one uplink, the keys that verify answers.
        self.uplink = Uplink(config.wechatpay, self.clock)
        keys = PlatformKeys(config, self.uplink, self.private_key, self.clock)
        self.delivery = DeliveryLoop(
            config,
            Journal(config.journal_path),
            self.uplink.request,
            keys,
            self.private_key,
            self.clock,
            base_url=lambda: self.uplink.base_url_in_use,
        )
        self.ingest.listeners.append(self.delivery.offer)
        self.ingest.wakers.append(self.delivery.wake)
        self.lot = parking_lot.LotWatch(
            lambda: parking_lot.query(config, self.uplink, keys, self.private_key, self.clock), self.clock
        )
        self._threads: list[threading.Thread] = []
        self._last_state: str | None = None
        self._last_published: tuple[Any, ...] = ()
        self._latency: LatencyView | None = None
        self._latency_at = 0.0
        self._sessions: SessionsView | None = None
        self._sessions_at = 0.0

    # -- runtime view ----------------------------------------------------------------------------

    def runtime(self) -> dict[str, Any]:
        """The heartbeat: what only the running process knows (the journal holds the rest)."""
        synced, how = self.clock.synchronized()
        offset = self.clock.offset
        uplink = self.delivery.runtime_status()
        return {
            "pid": os.getpid(),
            "version": __version__,
            "since": iso(self.started),
            "started": self.started,
            "heartbeat": time.time(),
            "mqtt": {
                "connected": self.link.state is LinkState.CONNECTED,
                "state": self.link.state.value,
                "last_message_at": iso(self.link.last_message_at),
                "client_id": self.config.mqtt.client_id,
                "broker": f"{self.config.mqtt.host}:{self.config.mqtt.port}",
                "connects": self.link.connects,
                "session_lost": self.link.session_lost,
                "takeovers_10min": self.link.takeovers_recent(),  # issue 12: see mqtt.TAKEOVER_WINDOW_S
                "last_error": self.link.last_error,
            },
            "uplink": uplink,
            "clock": {
                "synchronized": synced,
                "sync_source": how,
                "offset_s": None if offset is None else round(offset, 3),
            },
            "journal": {"error": self.ingest.stats.journal_error},
            "lot": self.lot.view(),
            "intake": {
                "entries": self.ingest.stats.entries,
                "rejected": self.ingest.stats.rejected,
                "duplicates": self.ingest.stats.duplicates,
                "ignored": self.ingest.stats.ignored,
                "callback_errors": self.link.callback_errors,
            },
        }

    def _healthy(self) -> bool:
        """Liveness for the watchdog: every loop made progress recently and paho's thread is alive."""
        mono = time.monotonic()
        watchdog = watchdog_interval_s()
        stale = PROGRESS_STALE_S if watchdog is None else max(PROGRESS_STALE_MIN_S, min(PROGRESS_STALE_S, 2 * watchdog))
        if mono - self.ingest.stats.last_progress > stale:
            return False
        if mono - self.delivery.last_progress() > stale:
            return False
        return self.link.thread_alive() or self.link.state is LinkState.STOPPED

    # -- lifecycle ---------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal_received signal=%s", signal.Signals(signum).name)
        self.stopping.set()

    def _start_thread(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.link.start()
        self._start_thread("ingest", self.ingest.run)
        self._start_thread("delivery", self.delivery.run)
        # Not joined at shutdown: a query may be waiting on the network, and nothing of it needs saving.
        threading.Thread(target=self.lot.run, name="lot", daemon=True).start()
        log.info(
            "agent_started version=%s journal=%s cameras=%d",
            __version__,
            self.config.journal_path,
            len(self.config.cameras),
        )
        self._heartbeat()
        self.notifier.notify("READY=1", f"STATUS=starting, journal {self.config.journal_path}")
        watchdog = watchdog_interval_s()
        next_heartbeat = next_publish = 0.0
        last_marker: tuple[Any, ...] = ()
        while not self.stopping.wait(min(1.0, watchdog or 1.0)):
            mono = time.monotonic()
            if self._healthy():
                self.notifier.notify("WATCHDOG=1")
            else:
                log.error(
                    "watchdog_starved ingest_age=%.1f paho_alive=%s",
                    mono - self.ingest.stats.last_progress,
                    self.link.thread_alive(),
                )
            # The heartbeat file is rewritten when the picture changed (a message, a state change) and
            # at least every HEARTBEAT_EVERY_S: a quiet lane costs one small write per interval.
            marker = (
                self.link.state,
                self.link.last_message_at,
                self.ingest.stats.batches,
                self.ingest.stats.journal_error,
                self.delivery.runtime_status(),
                self.lot.view(),
                self.clock.offset is not None,
            )
            if mono >= next_heartbeat or marker != last_marker:
                last_marker = marker
                status = self._heartbeat()
                next_heartbeat = mono + HEARTBEAT_EVERY_S
                # Fleet status (issue 5): retained, on every state change, after every (re)connect, and
                # at least every STATUS_PUBLISH_EVERY_S.
                key = (status["state"], tuple(status["problems"]), self.link.connects)
                if key != self._last_published or mono >= next_publish:
                    if self.link.publish_status(json.dumps(status, ensure_ascii=False).encode()):
                        self._last_published = key
                        next_publish = mono + STATUS_PUBLISH_EVERY_S
                    if status["state"] != self._last_state:
                        self._last_state = status["state"]
                        problems = "; ".join(status["problems"]) or "all good"
                        self.notifier.notify(f"STATUS={status['state']}: {problems}"[:400])
        return self.shutdown()

    def _heartbeat(self) -> StatusView:
        runtime = self.runtime()
        try:
            write_heartbeat(self.config.state_dir, runtime)
        except OSError as exc:
            log.warning("heartbeat_write_failed error=%s", exc)
        now = time.time()
        # Latency sorts a day of answers and the session counts scan the open sessions: at most once a
        # minute and every SESSIONS_EVERY_S, not on every batch (`edgeagent status` computes them itself).
        fresh_latency = now - self._latency_at >= LATENCY_EVERY_S
        fresh_sessions = now - self._sessions_at >= SESSIONS_EVERY_S
        c = from_journal(self.journal_reader, now, latency=fresh_latency, sessions=fresh_sessions)
        if c.latency is not None:
            self._latency, self._latency_at = c.latency, now
        if c.sessions is not None:
            self._sessions, self._sessions_at = c.sessions, now
        disk = disk_view(self.config.state_dir)
        status = build_status(
            self.config, runtime, True, c.queue, c.cameras, c.error, now, disk, self._latency, self._sessions
        )
        status["client_id"] = self.config.mqtt.client_id
        return status

    @property
    def journal_reader(self) -> Journal:
        reader = getattr(self, "_reader", None)
        if reader is None:
            reader = Journal(self.config.journal_path, readonly=True)
            self._reader = reader
        return reader

    def shutdown(self) -> int:
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
        log.info("agent_stopping")
        self.ingest.stop()
        self.delivery.stop()
        self.lot.stop()
        for thread in self._threads:
            thread.join(timeout=30)
            if thread.is_alive():
                log.error("thread_did_not_stop name=%s", thread.name)
        self.link.stop(final_status=offline_status(self.config, "stopped"))
        self.uplink.close()
        with contextlib.suppress(OSError):
            (self.config.state_dir / "daemon.json").unlink(missing_ok=True)
        self.journal.close()
        log.info("agent_stopped")
        return 0


def run(config: Config) -> int:
    """Start the agent and block until it is told to stop; returns the process exit code."""
    try:
        daemon = Daemon(config)
    except JournalError as exc:
        log.error("journal_open_failed error=%s", exc)
        return 2
    return daemon.run()
