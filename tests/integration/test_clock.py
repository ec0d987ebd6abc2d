"""Clock safety (issue 5): an agent whose clock is wrong and unsynchronised still sends the right times.

The sandbox's clock runs an hour ahead (its `Date` header and its own timestamp check), standing in for
a gate controller that booted after a power cut with its clock an hour behind and no NTP yet.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.sandbox import Sandbox
from tests.conftest import Agent, Broker, Publisher, eventually
from tests.integration.delivery_helpers import gate_config, journal_rows, started_sandbox, status

SKEW_S = 3600


@pytest.fixture
def skewed_sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    sandbox = started_sandbox(tmp_path / "sandbox", date_offset_s=SKEW_S)
    yield sandbox
    sandbox.stop()


def test_agent_time_corrected_once_the_api_clock_is_known(
    tmp_path: Path, broker: Broker, skewed_sandbox: Sandbox
) -> None:
    config = gate_config(
        tmp_path / "edgeagent.toml", skewed_sandbox, state_dir=tmp_path / "state", mqtt_port=broker.port
    )
    agent = Agent(config, tmp_path / "agent.log", env={"EDGEAGENT_CLOCK_SYNCED": "0"})
    agent.start()
    camera = Publisher(broker.port)
    try:
        eventually(lambda: status(config)[1]["mqtt"]["connected"], timeout=20, what="agent connected")
        published_at = time.time()
        camera.publish("anpr/south-1/plate", {"plate": "粤B54321"})  # no camera time: agent time it is

        accepted = eventually(skewed_sandbox.accepted, timeout=40, what="the entry accepted")
        # The API's clock is the truth: the car entered an hour "later" than our wrong clock said.
        assert abs(accepted[0]["enter_timestamp"] - (published_at + SKEW_S)) <= 5
        [row] = eventually(
            lambda: [r for r in journal_rows(tmp_path / "state") if r["state"] == "sent"],
            timeout=10,
            what="the entry marked sent",
        )
        assert row["time_source"] == "agent"
        assert row["clock_synced"] is False
        assert row["time_corrected"] is True
        assert row["out_serial_number"] == accepted[0]["out_serial_number"]

        # The offset comes from the signed refusals that preceded the acceptance; status has it within a beat.
        def with_offset() -> dict[str, Any] | None:
            v = status(config)[1]
            return v if v["clock"]["offset_s"] is not None else None

        view = eventually(with_offset, timeout=10, what="the offset in status")
        assert view["clock"]["synchronized"] is False
        assert abs(view["clock"]["offset_s"] - SKEW_S) < 5
        assert view["state"] == "degraded"
        assert any("clock" in problem for problem in view["problems"])

        # Once the offset is known, new reads are timed with the corrected clock straight away.
        camera.publish("anpr/south-1/plate", {"plate": "粤B54322"})
        later = eventually(
            lambda: [a for a in skewed_sandbox.accepted() if a["plate_number"] == "粤B54322"],
            timeout=30,
            what="the second entry",
        )
        assert abs(later[0]["enter_timestamp"] - (time.time() + SKEW_S)) <= 10
    finally:
        camera.close()
        agent.kill()
