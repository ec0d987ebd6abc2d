"""The merchant private key is read once and never logged or written anywhere else (SPEC, issue 3)."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.conftest import Agent, Broker, Keys, Publisher, events, eventually, run_cli, write_config


def key_fragments(pem: Path) -> list[bytes]:
    """Distinctive slices of the key's base64 body (any one found elsewhere means a leak)."""
    body = b"".join(line for line in pem.read_bytes().splitlines() if not line.startswith(b"-----"))
    return [body[i : i + 24] for i in range(0, len(body) - 24, 200)]


def test_private_key_never_leaves_its_file(tmp_path: Path, broker: Broker, keys: Keys) -> None:
    config = write_config(tmp_path / "edgeagent.toml", keys=keys, state_dir=tmp_path / "state", mqtt_port=broker.port)
    agent = Agent(config, tmp_path / "agent.log")
    agent.start()
    camera = Publisher(broker.port)
    try:
        eventually(lambda: "mqtt_connected" in agent.log.read_text(), timeout=20, what="agent connected")
        camera.publish("anpr/south-1/plate", {"plate": "粤B12345"})
        eventually(lambda: events(config), timeout=20, what="an entry")
        checked = run_cli("check", "--config", str(config))
        assert checked.returncode == 0
        assert agent.kill(signal.SIGTERM) == 0
    finally:
        camera.close()
        agent.kill()
    fragments = key_fragments(keys.merchant_key)
    outputs = [checked.stdout.encode(), checked.stderr.encode()]
    files = [p for p in (tmp_path / "state").rglob("*") if p.is_file()] + [agent.log]
    for blob in outputs + [p.read_bytes() for p in files]:
        assert not any(fragment in blob for fragment in fragments), "private key material leaked"
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in files)
