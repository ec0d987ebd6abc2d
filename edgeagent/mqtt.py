"""The MQTT adapter: paho-mqtt 2.x with manual acknowledgement and a persistent session.

Facts this rests on (reliability.md §3): an exception in a paho callback kills the network thread
while `is_connected()` stays True, so callbacks here only convert and enqueue and never raise;
MQTT 3.1.1 `clean_session=False` with a fixed client id keeps our session (v5 without a session
expiry does not); with `manual_ack=True` nothing is PUBACKed until `ack()`, which the ingest
thread calls only after the journal committed. A message id from an earlier connection is never
acked on a later one (the broker may have reused it): the broker redelivers instead, and the
journal's unique keys absorb the repeat.
"""

from __future__ import annotations

import collections
import enum
import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from edgeagent import failpoints
from edgeagent.config import CameraConfig, MqttConfig, is_loopback

log = logging.getLogger(__name__)

# Session takeover (issue 12). Under MQTT 3.1.1 a broker that hands our client id to another
# connection just closes ours: there is no "session taken over" reason code to read (that is v5's
# 0x8E). What tells it from an outage is that the broker was there all along: our connection was
# dropped and the very next attempt connected again, with no failed attempt in between. One such
# drop is also what a quick broker restart looks like; several within the window are a fight over
# our client id (a camera account, or a second agent with the same mqtt.client_id).
TAKEOVER_WINDOW_S = 600.0
TAKEOVER_REJOIN_S = 30.0


class LinkState(enum.StrEnum):
    """Connection state, owned by this adapter (written only from paho's thread and `stop`)."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Message:
    """An inbound message as the ingest thread sees it."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    received_at: float
    dup: bool
    retain: bool
    received_mono: float = 0.0


class MqttLink:
    """Subscribes to every camera topic at QoS 1 and hands messages to `inbox`; acks on request."""

    def __init__(
        self,
        config: MqttConfig,
        cameras: tuple[CameraConfig, ...],
        inbox: queue.Queue[Message],
        *,
        will_payload: bytes | None = None,
    ) -> None:
        self._config = config
        self._topics = sorted({c.topic for c in cameras})
        self._inbox = inbox
        self._lock = threading.Lock()
        self._state = LinkState.DISCONNECTED
        self._generation = 0
        self.connects = 0
        self.session_lost = 0
        self.last_message_at: float | None = None
        self.last_error: str | None = None
        self.callback_errors = 0
        self.retained_dropped = 0
        self._dropped_at: float | None = None  # monotonic time the broker dropped a live connection
        self._takeovers: collections.deque[float] = collections.deque(maxlen=64)
        self.takeovers = 0
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
            manual_ack=True,
        )
        client.enable_logger(logging.getLogger("edgeagent.paho"))
        # A message that cannot even be handed over is logged and counted, never allowed to kill the
        # network thread (reliability.md §3.2); our callbacks already catch everything.
        client.suppress_exceptions = True
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(50)  # outgoing (status) only
        apply_credentials(client, config)
        if will_payload is not None:
            client.will_set(config.status_topic, will_payload, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_connect_fail = self._on_connect_fail
        self._client = client

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        with self._lock:
            return self._state

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def takeovers_recent(self, now: float | None = None) -> int:
        """Drops that look like another client taking our session, within the last TAKEOVER_WINDOW_S."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return sum(1 for at in self._takeovers if now - at <= TAKEOVER_WINDOW_S)

    def thread_alive(self) -> bool:
        """Whether paho's network thread still runs (a dead one means no intake at all)."""
        thread = getattr(self._client, "_thread", None)
        return isinstance(thread, threading.Thread) and thread.is_alive()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho reconnects by itself with capped backoff."""
        if not self._config.tls and not is_loopback(self._config.host):
            log.warning(
                "mqtt_without_tls host=%s (the password and the reads cross the network in clear)", self._config.host
            )
        with self._lock:
            self._state = LinkState.CONNECTING
        self._client.connect_async(self._config.host, self._config.port, keepalive=self._config.keepalive_s)
        self._client.loop_start()

    def stop(self, final_status: bytes | None = None) -> None:
        """Publish a last status (retained) if given, disconnect cleanly, stop the network thread."""
        if final_status is not None and self.state is LinkState.CONNECTED:
            info = self._client.publish(self._config.status_topic, final_status, qos=1, retain=True)
            deadline = time.monotonic() + 2
            while not info.is_published() and time.monotonic() < deadline:
                time.sleep(0.02)
        with self._lock:
            self._state = LinkState.STOPPED
        self._client.disconnect()
        self._client.loop_stop()

    # -- acks and publishing ---------------------------------------------------------------------

    def ack(self, message: Message) -> bool:
        """PUBACK `message` if it came on the current connection; False when it must be left to redelivery."""
        if message.qos == 0:
            return True
        with self._lock:
            current = self._state is LinkState.CONNECTED and message.generation == self._generation
        if not current:
            return False
        return self._client.ack(message.mid, message.qos) == paho.MQTT_ERR_SUCCESS

    def publish_status(self, payload: bytes) -> bool:
        """Publish the retained status object (SPEC §7); False (skipped) while disconnected."""
        if self.state is not LinkState.CONNECTED:
            return False
        info = self._client.publish(self._config.status_topic, payload, qos=1, retain=True)
        return info.rc == paho.MQTT_ERR_SUCCESS

    # -- paho callbacks: convert, hand over, never raise -----------------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        try:
            if reason.is_failure:
                with self._lock:
                    self._state = LinkState.DISCONNECTED
                    self._dropped_at = None
                self.last_error = f"broker refused connection: {reason}"
                log.warning("mqtt_connect_refused host=%s reason=%s", self._config.host, reason)
                return
            with self._lock:
                self._generation += 1
                self._state = LinkState.CONNECTED
                rejoined = self._dropped_at is not None and time.monotonic() - self._dropped_at <= TAKEOVER_REJOIN_S
                self._dropped_at = None
                if rejoined:
                    self._takeovers.append(time.monotonic())
                    self.takeovers += 1
            if rejoined:
                log.warning("mqtt_session_taken_over client_id=%s count=%d", self._config.client_id, self.takeovers)
            self.connects += 1
            self.last_error = None
            if not flags.session_present and self.connects > 1:
                self.session_lost += 1
            log.info(
                "mqtt_connected host=%s port=%d session_present=%s topics=%d",
                self._config.host,
                self._config.port,
                flags.session_present,
                len(self._topics),
            )
            client.subscribe([(topic, 1) for topic in self._topics])
        except Exception:
            self.callback_errors += 1
            log.exception("mqtt_callback_error callback=on_connect")

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        try:
            for topic, code in zip(self._topics, reasons, strict=False):
                if code.is_failure:
                    self.last_error = f"broker refused subscription to {topic!r}: {code}"
                    log.error("mqtt_subscribe_refused topic=%s reason=%s", topic, code)
        except Exception:
            self.callback_errors += 1
            log.exception("mqtt_callback_error callback=on_subscribe")

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        try:
            with self._lock:
                self._dropped_at = None  # the broker is unreachable: an outage, not a takeover
        except Exception:
            self.callback_errors += 1
            log.exception("mqtt_callback_error callback=on_connect_fail")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        try:
            with self._lock:
                if self._state is LinkState.CONNECTED and reason.is_failure:
                    self._dropped_at = time.monotonic()
                if self._state is not LinkState.STOPPED:
                    self._state = LinkState.DISCONNECTED
            if reason.is_failure:
                self.last_error = f"connection lost: {reason}"
                log.warning("mqtt_disconnected reason=%s", reason)
        except Exception:
            self.callback_errors += 1
            log.exception("mqtt_callback_error callback=on_disconnect")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if failpoints.armed("paho-crash"):
            raise SystemExit("failpoint paho-crash")  # escapes suppress_exceptions, like a real bug would
        try:
            now = time.time()
            self.last_message_at = now
            if msg.retain:
                self._drop_retained(client, msg)
                return
            self._inbox.put_nowait(
                Message(
                    msg.topic,
                    bytes(msg.payload),
                    msg.mid,
                    msg.qos,
                    self.generation,
                    now,
                    bool(msg.dup),
                    bool(msg.retain),
                    time.monotonic(),
                )
            )
        except Exception:
            # Not acked, so the broker keeps it and redelivers after a reconnect.
            self.callback_errors += 1
            log.exception("mqtt_callback_error callback=on_message")

    def _drop_retained(self, client: paho.Client, msg: paho.MQTTMessage) -> None:
        """Acknowledge a retained camera read without journaling it, with one log line (issue 12).

        Under MQTT 3.1.1 the broker sets the retain flag only on what it sends because a subscription
        was made (§3.3.1.3): a read that reaches us live, or from our session's queue while we were
        away, comes with the flag off and is journaled as usual. A flagged copy is the broker
        replaying the last retained read of a camera topic at our SUBSCRIBE, which we send on every
        connect: a re-send of a read already taken, arriving again at every restart, hours or weeks
        after the car passed. Its unique key absorbs it only while the first copy's row is in the
        journal; once that row is pruned it would become a second entry with a new out_serial_number.
        Dropped rather than kept as a rejected row: the replay carries nothing a technician can act on
        in `events` (the original is the entry) and would add a row per restart; what needs fixing is
        the camera's retain setting, and this line names its topic. The one read this can cost is a
        retained one published while the broker held no session for us (before the first start, or
        after the broker lost its state), when every unretained read is lost too. Acked at once:
        nothing is committed for it, and Mosquitto matches a PUBACK by packet id, whatever the order.
        """
        self.retained_dropped += 1
        log.warning(
            "mqtt_retained_dropped topic=%r bytes=%d (a replay of the camera's last read: switch retain off "
            "in the camera's MQTT settings)",
            msg.topic,
            len(msg.payload),
        )
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)


def apply_credentials(client: paho.Client, config: MqttConfig) -> None:
    """Username/password file and TLS (always verifying the broker) as the config says."""
    if config.username:
        password = config.password_file.read_text(encoding="utf-8").strip() if config.password_file else None
        client.username_pw_set(config.username, password)
    if config.tls:
        client.tls_set(
            ca_certs=str(config.ca_file) if config.ca_file else None,
            certfile=str(config.cert_file) if config.cert_file else None,
            keyfile=str(config.key_file) if config.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )


@retry(
    retry=retry_if_exception_type(ConnectionRefusedError),  # a broker restarting: try twice more, briefly
    stop=stop_after_attempt(3),
    wait=wait_exponential(multiplier=0.25, max=1),
    reraise=True,
)
def _connect_once(client: paho.Client, config: MqttConfig) -> None:
    client.connect(config.host, config.port, keepalive=10)


def publish_once(config: MqttConfig, topic: str, payload: bytes, *, client_id: str, timeout: float = 10.0) -> None:
    """Connect with the agent's broker settings, publish one QoS 1 message, wait for its PUBACK.

    Used by `edgeagent simulate` and `check --online`; raises OSError with a readable reason.
    """
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
    apply_credentials(client, config)
    try:
        _connect_once(client, config)
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"cannot connect to MQTT broker {config.host}:{config.port}: {exc}") from exc
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise OSError(f"broker {config.host}:{config.port} did not acknowledge the message within {timeout:g} s")
    finally:
        client.disconnect()
        client.loop_stop()
