"""Issue 12: `edgeagent simulate` publishes with its own broker account, and that account can do nothing else.

The lane broker runs the shipped deploy/mosquitto files (test_lane_security's Lane: the drop-in as
install.sh renders it, the ACL example, cameras added by edgeagent-camera-user); the agent's and
simulate's passwords are laid out as install.sh lays them out: the config names
`$CREDENTIALS_DIRECTORY/mqtt.password` (LoadCredential=), simulate.password sits next to it.
`edgeagent simulate` is the CLI, run as the docs say (`sudo edgeagent simulate ...`: no
$CREDENTIALS_DIRECTORY at a shell).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Agent, Keys, events, eventually, run_cli, write_config
from tests.integration.test_deploy import Client
from tests.integration.test_lane_security import AGENT_ID, CAMERAS, Lane, lane, set_password

__all__ = ["lane"]  # the fixture, imported to be used here

SIMULATE, SIMULATE_PASSWORD = "edgeagent-simulate", "simulate-secret"
SOUTH, NORTH = "anpr/south-1/plate", "anpr/north-1/plate"
STATUS = f"edgeagent/{AGENT_ID}/status"
LOT = "lots/WXPARK001/sessions/A01"


def installed_layout(tmp_path: Path, keys: Keys, lane: Lane, simulate_password: str) -> tuple[Path, Path]:
    """The config and secrets as install.sh leaves them: (config, the service's credentials directory)."""
    etc = tmp_path / "etc-edgeagent"
    etc.mkdir()
    credentials = tmp_path / "credentials"  # what systemd's LoadCredential= hands the service
    credentials.mkdir()
    (credentials / "mqtt.password").write_text(lane.agent_password + "\n")
    (credentials / "mqtt.password").chmod(0o400)
    (etc / "simulate.password").write_text(simulate_password + "\n")
    (etc / "simulate.password").chmod(0o600)
    config = write_config(
        etc / "edgeagent.toml",
        keys=keys,
        state_dir=tmp_path / "state",
        mqtt_port=lane.port,
        client_id=AGENT_ID,
        cameras=CAMERAS,
        mqtt='username = "edgeagent"\npassword_file = "$CREDENTIALS_DIRECTORY/mqtt.password"\n',
    )
    return config, credentials


def simulate_logins(lane: Lane) -> list[str]:
    """The usernames `edgeagent simulate` logged in with (its client id is <client_id>-simulate)."""
    log = (lane.broker.dir / "mosquitto.log").read_text(errors="replace")
    return re.findall(rf"New client connected from \S+ as {AGENT_ID}-simulate \(.*?u'([^']*)'\)", log)


@pytest.mark.slow
def test_simulate_publishes_with_its_own_account_which_can_only_write_camera_topics(
    lane: Lane, tmp_path: Path, keys: Keys, agent_factory: Any
) -> None:
    lane.camera("south-1", SOUTH)  # grants edgeagent-simulate write on this topic, as on a real box
    set_password(lane.root / "etc/mosquitto/edgeagent.passwd", SIMULATE, SIMULATE_PASSWORD)  # as install.sh does
    lane.start()
    config, credentials = installed_layout(tmp_path, keys, lane, SIMULATE_PASSWORD)
    agent: Agent = agent_factory(config)
    agent.env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    agent.start()
    eventually(
        lambda: (json.loads(run_cli("status", "--json", "--config", str(config)).stdout or "{}").get("mqtt") or {}).get(
            "connected"
        ),
        timeout=30,
        what="agent connected",
    )

    # The CLI, as a technician runs it during commissioning: the read is journaled by the agent.
    done = run_cli("simulate", "--config", str(config), "--camera", "south-1", "--plate", "粤B55555")
    assert done.returncode == 0, done.stderr
    eventually(
        lambda: [r for r in events(config) if r["plate_number"] == "粤B55555" and r["state"] != "rejected"],
        timeout=20,
        what="the simulated read journaled",
    )
    assert simulate_logins(lane) == [SIMULATE]

    # Everything else the account might try: a watcher with the agent's account (which reads every
    # topic) sees none of it arrive, while the same account's camera-topic publish after it does.
    watcher = Client(lane.port, "edgeagent", lane.agent_password, client_id="acl-watcher")
    simulate = Client(lane.port, SIMULATE, SIMULATE_PASSWORD, client_id="simulate-probe")
    camera_side = Client(lane.port, "edgeagent", lane.agent_password, client_id="agent-probe")
    try:
        assert watcher.accepted and simulate.accepted
        watcher.subscribe("#")
        simulate.subscribe(SOUTH)  # a camera topic: simulate may write it, never read it
        simulate.subscribe("anpr/#")
        simulate.subscribe("edgeagent/#")
        simulate.publish(STATUS, b'{"state": "ok", "forged": true}', retain=True)
        simulate.publish(LOT, b'{"forged": "session"}', retain=True)
        simulate.publish(NORTH, b'{"plate": "\\u7ca4B66666", "event_id": "not-granted"}')  # no camera added it
        camera_side.publish(SOUTH, b'{"plate": "\\u7ca4B77777", "event_id": "agent-account"}')  # issue 12
        simulate.publish(SOUTH, b'{"plate": "\\u7ca4B88888", "event_id": "marker"}')
        eventually(lambda: watcher.payloads(SOUTH), what="the marker at the watcher")
        # One connection's packets are handled in order: anything allowed before the marker is there.
        assert [json.loads(p)["event_id"] for p in watcher.payloads(SOUTH)] == ["marker"]
        assert watcher.payloads(LOT) == [] and watcher.payloads(NORTH) == []
        assert b"forged" not in b"".join(watcher.payloads(STATUS))
        # Its subscriptions were granted (MQTT 3.1.1 has no way to refuse them) and deliver nothing:
        # not the marker, not the agent's status.
        time.sleep(0.5)  # the watcher already has the marker: nothing is in flight to the probe
        assert simulate.payloads() == []
        entries = {r["plate_number"] for r in events(config) if r["state"] != "rejected"}
        assert entries == {"粤B55555", "粤B88888"}
    finally:
        for client in (watcher, simulate, camera_side):
            client.close()
