"""Clock faults (issue 6, item 6): the API's clock steps two hours while entries are queued behind an
outage. The first answers refuse our timestamps (401); the agent relearns the offset from `Date`,
signs with corrected time, and delivers everything with the entry times it journaled — untouched,
because they came from a synchronised clock — each under its original out_serial_number."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeagent.sandbox import Sandbox
from tests.conftest import Agent, Broker, Publisher, eventually
from tests.integration.delivery_helpers import gate_config, journal_rows, status

pytestmark = pytest.mark.slow


def test_api_clock_step_while_entries_are_queued(tmp_path: Path, broker: Broker, sandbox: Sandbox) -> None:
    config = gate_config(
        tmp_path / "edgeagent.toml",
        sandbox,
        state_dir=tmp_path / "state",
        mqtt_port=broker.port,
        parking={"repeat_window_s": 0},
    )
    agent = Agent(config, tmp_path / "agent.log")
    agent.start()
    camera = Publisher(broker.port)
    try:
        eventually(lambda: status(config)[1]["mqtt"]["connected"], timeout=20, what="agent connected")
        camera.publish("anpr/south-1/plate", {"plate": "粤D00001"})
        eventually(lambda: len(sandbox.accepted()) == 1, timeout=20, what="one entry before the fault")

        def offset() -> list[float] | None:
            value = status(config)[1]["clock"]["offset_s"]
            return None if value is None else [float(value)]

        learnt: list[float] = eventually(offset, timeout=15, what="offset learnt")
        first_offset = learnt[0]
        assert abs(first_offset) < 5

        sandbox.set(fail_status=503, fail_count=-1)
        plates = [f"粤D{n:05d}" for n in range(2, 12)]
        for plate in plates:
            camera.publish("anpr/south-1/plate", {"plate": plate})
        eventually(
            lambda: len([r for r in journal_rows(tmp_path / "state") if r["state"] == "pending"]) == 10,
            timeout=20,
            what="ten entries queued behind the outage",
        )
        queued = {r["plate_number"]: r for r in journal_rows(tmp_path / "state") if r["state"] == "pending"}

        sandbox.set(fail_status=0, date_offset_s=7200)  # the outage ends with the API two hours ahead
        eventually(
            lambda: {a["plate_number"] for a in sandbox.accepted()} >= set(plates),
            timeout=90,
            interval=0.5,
            what="everything delivered after the step",
        )
        codes = [r["code"] for r in sandbox.requests() if r["status"] == 401]
        assert codes, "the step must have been noticed through refused timestamps first"
        for accepted in sandbox.accepted():
            if accepted["plate_number"] in queued:
                row = queued[accepted["plate_number"]]
                assert accepted["out_serial_number"] == row["out_serial_number"]
                assert accepted["enter_timestamp"] == row["enter_timestamp"]
        view = status(config)[1]
        assert abs(view["clock"]["offset_s"] - 7200) < 5
        assert view["state"] == "degraded"  # a two-hour offset is worth a technician's look
    finally:
        camera.close()
        agent.kill()
