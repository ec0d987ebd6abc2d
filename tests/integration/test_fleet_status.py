"""Fleet status over MQTT (SPEC §7, issue 5): the retained status object and the last will, seen by a
central dashboard subscribing to the lane broker."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import Agent, Broker, Keys, eventually, write_config

TOPIC = "edgeagent/edgeagent-test/status"


class Dashboard:
    """A subscriber to the status topic that keeps every message, flagging retained ones."""

    def __init__(self, port: int, name: str) -> None:
        self.messages: list[tuple[dict[str, Any], bool]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=name)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(TOPIC, qos=1)
        self.client.loop_start()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((json.loads(msg.payload), bool(msg.retain)))

    def states(self) -> list[str]:
        with self._lock:
            return [m["state"] for m, _ in self.messages]

    def last(self) -> dict[str, Any]:
        with self._lock:
            return self.messages[-1][0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_retained_status_and_last_will(tmp_path: Path, broker: Broker, keys: Keys) -> None:
    config = write_config(tmp_path / "edgeagent.toml", keys=keys, state_dir=tmp_path / "state", mqtt_port=broker.port)
    agent = Agent(config, tmp_path / "agent.log")
    agent.start()
    live = Dashboard(broker.port, "dashboard-live")
    try:
        eventually(lambda: "ok" in live.states(), timeout=20, what="status ok published")
        status = live.last()
        for key in ("state", "version", "daemon", "mqtt", "uplink", "clock", "queue", "cameras"):
            assert key in status
        assert status["mqtt"]["connected"] is True
        assert [c["id"] for c in status["cameras"]] == ["south-1", "north-1"]

        late = Dashboard(broker.port, "dashboard-late")  # a dashboard that connects later still sees it
        eventually(
            lambda: late.messages and late.messages[0][1] and late.messages[0][0]["state"] == "ok",
            timeout=10,
            what="retained status for a late subscriber",
        )
        late.close()

        agent.kill(signal.SIGKILL)  # power cut of the agent: the broker publishes the last will
        eventually(lambda: live.states()[-1] == "offline", timeout=20, what="last will 'offline'")
        assert live.last()["reason"] == "lost"
        after = Dashboard(broker.port, "dashboard-after")
        eventually(
            lambda: after.messages and after.messages[0][0]["state"] == "offline",
            timeout=10,
            what="the will is retained",
        )
        after.close()

        agent.start()  # back: the retained status says so again
        eventually(lambda: live.states()[-1] == "ok", timeout=20, what="ok again after restart")
        assert agent.kill(signal.SIGTERM) == 0
        eventually(lambda: live.states()[-1] == "offline", timeout=10, what="offline on a clean stop")
        assert live.last()["reason"] == "stopped"
    finally:
        live.close()
        agent.kill()
