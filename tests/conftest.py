"""Shared fixtures: a real Mosquitto per test on a free port, key material, configs, the agent as a process.

Nothing is mocked: tests talk to /usr/sbin/mosquitto, a real SQLite file and (for delivery) the
project's own HTTPS sandbox. Poll with `eventually()`, never a bare sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.localbroker import LocalBroker
from edgeagent.sandbox import Sandbox

T = TypeVar("T")


def eventually(check: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> T:
    """Poll `check` until it returns something truthy (returned) or `timeout` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last  # type: ignore[no-any-return]
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")
        time.sleep(interval)


Broker = LocalBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop(signal.SIGKILL)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """The project's HTTPS WeChat Pay sandbox with its own test CA, behaving like the real API."""
    box = Sandbox(tmp_path / "sandbox", port=0).start()
    yield box
    box.stop()


@dataclass
class Keys:
    dir: Path
    merchant_key: Path
    merchant_serial: str
    platform_pub: Path
    platform_key_id: str
    platform_private: rsa.RSAPrivateKey
    merchant_private: rsa.RSAPrivateKey


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("keys")
    merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    platform = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = directory / "apiclient_key.pem"
    key_path.write_bytes(
        merchant.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    pub_path = directory / "wechatpay_pub.pem"
    pub_path.write_bytes(
        platform.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return Keys(
        directory,
        key_path,
        "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
        pub_path,
        "PUB_KEY_ID_0119000000012024112700000000000042",
        platform,
        merchant,
    )


CAMERAS_DEFAULT = (
    '[[cameras]]\nid = "south-1"\ntopic = "anpr/south-1/plate"\nformat = "generic"\n\n'
    '[[cameras]]\nid = "north-1"\ntopic = "anpr/north-1/plate"\nformat = "generic"\n\n'
    '[[entrances]]\nnumber = "A01"\nname = "南门入口"\nsources = ["south-1"]\n\n'
    '[[entrances]]\nnumber = "B01"\nname = "北门入口"\nsources = ["north-1:1"]\ndiscount_template_id = [1001]\n'
)


def write_config(
    path: Path,
    *,
    keys: Keys,
    state_dir: Path,
    mqtt_port: int,
    base_url: str = "https://127.0.0.1:9",
    ca_file: Path | None = None,
    parking: str = "",
    wechatpay: str = "",
    mqtt: str = "",
    cameras: str = CAMERAS_DEFAULT,
    client_id: str = "edgeagent-test",
    top: str = "",
) -> Path:
    """A complete config in the SPEC §3 shape, pointing at a test broker and (optionally) a sandbox."""
    path.write_text(
        f'state_dir = "{state_dir}"\nserial_prefix = "T1"\n{top}\n'
        "[wechatpay]\n"
        'mchid = "1900000001"\n'
        f'merchant_serial_no = "{keys.merchant_serial}"\n'
        f'merchant_private_key = "{keys.merchant_key}"\n'
        f'platform_public_key = "{keys.platform_pub}"\n'
        f'platform_public_key_id = "{keys.platform_key_id}"\n'
        f'base_url = "{base_url}"\n'
        f'ca_file = "{ca_file or ""}"\n'
        f"{wechatpay}\n"
        "[parking]\n"
        'parking_id = "WXPARK001"\n'
        f"{parking}\n"
        "[mqtt]\n"
        'host = "127.0.0.1"\n'
        f"port = {mqtt_port}\n"
        f'client_id = "{client_id}"\n'
        f"{mqtt}\n"
        f"{cameras}",
        encoding="utf-8",
    )
    return path


@dataclass
class Agent:
    """`edgeagent run` as a real subprocess, killable with any signal."""

    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        env = {**os.environ, "EDGEAGENT_CLOCK_SYNCED": "1", **self.env}
        self.starts += 1
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeagent", "run", "--config", str(self.config)],
                stdout=out,
                stderr=out,
                env=env,
            )

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[[Path], Agent]]:
    agents: list[Agent] = []

    def make(config: Path) -> Agent:
        agent = Agent(config, tmp_path / f"agent{len(agents)}.log")
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.kill()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m edgeagent ARGS`, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "EDGEAGENT_CLOCK_SYNCED": "1", **(env or {})},
    )


def events(config: Path, state: str | None = None, limit: int = 100000) -> list[dict[str, Any]]:
    args = ["events", "--config", str(config), "--json", "--limit", str(limit)]
    if state:
        args += ["--state", state]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


class Publisher:
    """A camera stand-in: publishes at QoS 1 and remembers which messages the broker PUBACKed."""

    def __init__(self, port: int, client_id: str = "camera-sim") -> None:
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        eventually(self.client.is_connected, what="publisher connected")

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], wait: bool = True) -> paho.MQTTMessageInfo:
        data = json.dumps(payload, ensure_ascii=False).encode() if isinstance(payload, dict) else payload
        info = self.client.publish(topic, data, qos=1)
        if wait:
            info.wait_for_publish(timeout=10)
        return info

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
