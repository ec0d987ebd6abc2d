"""The daemon under a fake systemd: sd_notify over $NOTIFY_SOCKET, watchdog pings, credentials."""

from __future__ import annotations

import shutil
import signal
import socket
from pathlib import Path

from tests.conftest import Agent, Broker, Keys, eventually, run_cli, write_config


class NotifyListener:
    """What systemd would receive: every datagram sent to $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages

    def fields(self) -> list[str]:
        return [line for message in self.poll() for line in message.splitlines()]

    def close(self) -> None:
        self.sock.close()


def test_ready_watchdog_status_and_stopping(tmp_path: Path, broker: Broker, keys: Keys) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    config = write_config(tmp_path / "edgeagent.toml", keys=keys, state_dir=tmp_path / "state", mqtt_port=broker.port)
    agent = Agent(config, tmp_path / "agent.log", env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "2000000"})
    agent.start()
    try:
        eventually(lambda: "READY=1" in listener.fields(), timeout=15, what="READY=1")
        eventually(lambda: listener.fields().count("WATCHDOG=1") >= 3, timeout=15, what="watchdog pings")
        eventually(
            lambda: any(f.startswith("STATUS=ok") for f in listener.fields()),
            timeout=15,
            what="a STATUS= line saying ok",
        )
        assert agent.kill(signal.SIGTERM) == 0
        assert "STOPPING=1" in listener.fields()
        # READY comes before the first watchdog ping: systemd only arms the watchdog after READY.
        fields = listener.fields()
        assert fields.index("READY=1") < fields.index("WATCHDOG=1")
    finally:
        agent.kill()
        listener.close()


def test_merchant_key_from_credentials_directory(tmp_path: Path, broker: Broker, keys: Keys) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copy(keys.merchant_key, credentials / "apiclient_key.pem")
    config = write_config(tmp_path / "edgeagent.toml", keys=keys, state_dir=tmp_path / "state", mqtt_port=broker.port)
    text = config.read_text().replace(f'"{keys.merchant_key}"', '"$CREDENTIALS_DIRECTORY/apiclient_key.pem"')
    config.write_text(text)

    missing = run_cli("check", "--config", str(config), env={"CREDENTIALS_DIRECTORY": ""})
    assert missing.returncode == 78
    assert "wechatpay.merchant_private_key" in missing.stderr
    assert "CREDENTIALS_DIRECTORY" in missing.stderr

    ok = run_cli("check", "--config", str(config), env={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert ok.returncode == 0, ok.stderr
    assert "merchant private key: RSA 2048 bits" in ok.stdout

    agent = Agent(config, tmp_path / "agent.log", env={"CREDENTIALS_DIRECTORY": str(credentials)})
    agent.start()
    try:
        eventually(
            lambda: run_cli("status", "--json", "--config", str(config)).returncode == 0,
            timeout=20,
            what="status ok with the key from $CREDENTIALS_DIRECTORY",
        )
    finally:
        agent.kill()
