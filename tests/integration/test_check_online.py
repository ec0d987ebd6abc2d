"""`edgeagent check --online` against a real broker and the HTTPS sandbox, and the status screen's size."""

from __future__ import annotations

import json
from pathlib import Path

from edgeagent.sandbox import Sandbox
from tests.conftest import Agent, Broker, eventually, run_cli
from tests.integration.delivery_helpers import closed_port_url, gate_config, started_sandbox


def test_check_online_all_good(tmp_path: Path, broker: Broker, sandbox: Sandbox) -> None:
    config = gate_config(tmp_path / "edgeagent.toml", sandbox, state_dir=tmp_path / "state", mqtt_port=broker.port)
    result = run_cli("check", "--online", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert all(line.startswith("OK") for line in lines), lines
    assert any("subscribe anpr/south-1/plate" in line for line in lines)
    assert any(sandbox.base_url in line and "TLS certificate valid" in line for line in lines)
    assert any("system clock synchronised" in line for line in lines)


def test_check_online_names_each_failure(tmp_path: Path, broker: Broker, sandbox: Sandbox) -> None:
    config = gate_config(
        tmp_path / "edgeagent.toml",
        sandbox,
        state_dir=tmp_path / "state",
        mqtt_port=broker.port,
        wechatpay={"base_url": closed_port_url()},
    )
    broker.stop()
    result = run_cli("check", "--online", "--config", str(config), env={"EDGEAGENT_CLOCK_SYNCED": "0"})
    assert result.returncode == 2
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert any("MQTT broker" in line and "mosquitto running" in line for line in fails), fails
    assert any("API https://127.0.0.1" in line for line in fails), fails
    assert any("clock" in line for line in fails), fails

    other_ca = tmp_path / "other-ca"
    other = started_sandbox(other_ca)  # a different test CA: the agent's ca_file does not trust it
    try:
        config = gate_config(
            tmp_path / "edgeagent2.toml",
            sandbox,
            state_dir=tmp_path / "state",
            mqtt_port=broker.port,
            wechatpay={"base_url": other.base_url},
        )
        result = run_cli("check", "--online", "--config", str(config))
        assert result.returncode == 2
        assert any(
            "CERTIFICATE_VERIFY_FAILED" in line or "certificate" in line.lower()
            for line in result.stdout.splitlines()
            if line.startswith("FAIL")
        )
    finally:
        other.stop()


def test_status_screen_fits_a_terminal(tmp_path: Path, broker: Broker, sandbox: Sandbox) -> None:
    cameras = "".join(f'[[cameras]]\nid = "lane-camera-{i:02d}"\ntopic = "anpr/{i}/plate"\n\n' for i in range(14))
    cameras += '[[entrances]]\nnumber = "A01"\nname = "南门入口"\nsources = ["lane-camera-00"]\n'
    config = gate_config(
        tmp_path / "edgeagent.toml",
        sandbox,
        state_dir=tmp_path / "state",
        mqtt_port=broker.port,
        wechatpay={"base_url": closed_port_url()},
        cameras=cameras,
    )
    agent = Agent(config, tmp_path / "agent.log")
    agent.start()
    try:
        eventually(
            lambda: json.loads(run_cli("status", "--json", "--config", str(config)).stdout)["mqtt"]["connected"],
            timeout=20,
            what="agent connected",
        )
        result = run_cli("status", "--config", str(config))
        assert result.returncode == 0
        lines = result.stdout.rstrip("\n").splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines), lines
        assert lines[0].endswith(": OK")
        assert any("more (edgeagent status --json)" in line for line in lines)
    finally:
        agent.kill()
    down = run_cli("status", "--config", str(config))
    assert down.returncode == 2
    assert "DOWN" in down.stdout.splitlines()[0] and "daemon not running" in down.stdout
