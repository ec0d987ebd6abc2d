"""A whole gate for delivery tests: Mosquitto, the HTTPS sandbox, `edgeagent run`, a camera stand-in.

Nothing is mocked. The agent's `[wechatpay]` table is the sandbox's own config fragment
(`edgeagent-wechatpay.toml`) with the test's changes applied, exactly as an integrator would copy it.
Shared by tests/integration/test_delivery.py and tests/faults/test_delivery_faults.py.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgeagent.journal import Journal
from edgeagent.localbroker import free_port
from edgeagent.sandbox import Sandbox
from edgeagent.status import event_view
from tests.conftest import CAMERAS_DEFAULT, Agent, Broker, Publisher, eventually, run_cli

SOUTH, NORTH = "anpr/south-1/plate", "anpr/north-1/plate"
DELETE = object()  # a config override value that removes the key
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> T:
    """`eventually()` for a check that returns its finding or None; returns the finding."""
    found = eventually(check, timeout=timeout, interval=interval, what=what)
    assert found is not None
    return found


def toml_value(value: object) -> str:
    """A TOML literal for the simple values a config holds (JSON strings are valid TOML strings)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def table(name: str, values: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


def gate_config(
    path: Path,
    sandbox: Sandbox,
    *,
    state_dir: Path,
    mqtt_port: int,
    wechatpay: dict[str, Any] | None = None,
    parking: dict[str, Any] | None = None,
    cameras: str = CAMERAS_DEFAULT,
) -> Path:
    """The sandbox's `[wechatpay]` fragment, changed by `wechatpay` (DELETE removes a key), plus the rest."""
    fragment = tomllib.loads(sandbox.materials.config_file.read_text(encoding="utf-8"))["wechatpay"]
    for key, value in (wechatpay or {}).items():
        if value is DELETE:
            fragment.pop(key, None)
        else:
            fragment[key] = value
    park = {"parking_id": sandbox.materials.parking_id, **(parking or {})}
    mqtt = {"host": "127.0.0.1", "port": mqtt_port, "client_id": "edgeagent-test"}
    path.write_text(
        f'state_dir = {toml_value(str(state_dir))}\nserial_prefix = "T1"\n\n'
        + table("wechatpay", fragment)
        + "\n"
        + table("parking", park)
        + "\n"
        + table("mqtt", mqtt)
        + "\n"
        + cameras,
        encoding="utf-8",
    )
    return path


def closed_port_url() -> str:
    """An https URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    return f"https://127.0.0.1:{free_port()}"


def status(config: Path) -> tuple[int, dict[str, Any]]:
    """`edgeagent status --json`: (exit code, the object)."""
    result = run_cli("status", "--json", "--config", str(config))
    assert result.stdout, result.stderr
    view: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, view


def journal_rows(config_state_dir: Path) -> list[dict[str, Any]]:
    """Every journal row, oldest first, read as `events` does (read-only, never blocking the daemon)."""
    journal = Journal(config_state_dir / "journal.sqlite3", readonly=True)
    try:
        return [event_view(row) for row in reversed(journal.events(limit=1_000_000))]
    finally:
        journal.close()


def integrity(state_dir: Path) -> str:
    with sqlite3.connect(state_dir / "journal.sqlite3") as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most timestamps that fall in any half-open interval [t, t + window)."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


@dataclass
class Gate:
    """One gate: broker, sandbox, the agent's config, the agent process and a camera."""

    tmp: Path
    broker: Broker
    sandbox: Sandbox
    make_agent: Callable[[Path], Agent]
    config: Path = field(init=False)
    agent: Agent = field(init=False)
    camera: Publisher | None = None
    plates: Iterator[int] = field(default_factory=lambda: itertools.count(10001))

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    def configure(self, **kw: Any) -> Path:
        """(Re)write the agent's config; keyword arguments as for `gate_config`."""
        self.config = gate_config(
            self.tmp / "edgeagent.toml", self.sandbox, state_dir=self.state_dir, mqtt_port=self.broker.port, **kw
        )
        return self.config

    def start(self, **kw: Any) -> Agent:
        """Configure (when given changes or never configured), start the agent and wait for MQTT."""
        if kw or not hasattr(self, "config"):
            self.configure(**kw)
        self.agent = self.make_agent(self.config)
        self.agent.start()
        self.wait_running()
        if self.camera is None:
            self.camera = Publisher(self.broker.port)
        return self.agent

    def restart(self) -> None:
        self.agent.start()
        self.wait_running()

    def wait_running(self, timeout: float = 20) -> dict[str, Any]:
        """Until this agent process (not a stale heartbeat) reports MQTT connected."""

        def check() -> dict[str, Any] | None:
            assert self.agent.alive(), self.agent.log.read_text(errors="replace")[-3000:]
            view = status(self.config)[1]
            pid = self.agent.proc.pid if self.agent.proc else None
            ok = view["daemon"]["running"] and view["daemon"]["pid"] == pid and view["mqtt"]["connected"]
            return view if ok else None

        return wait_for(check, timeout=timeout, what="agent running and connected")

    def plate(self) -> str:
        """A fresh valid plate (粤B + 5 digits): never a repeat of another within the window."""
        return f"粤B{next(self.plates):05d}"

    def publish(self, topic: str = SOUTH, **read: Any) -> dict[str, Any]:
        """Publish one generic-format read (a fresh plate unless given); returns the read."""
        assert self.camera is not None
        read = {"plate": self.plate(), **read}
        self.camera.publish(topic, json.dumps(read, ensure_ascii=False).encode())
        return read

    def publish_many(self, count: int, topic: str = SOUTH) -> list[str]:
        """Publish `count` reads with fresh plates (fire and forget, then wait for all PUBACKs)."""
        assert self.camera is not None
        plates = [self.plate() for _ in range(count)]
        infos = [
            self.camera.publish(topic, json.dumps({"plate": p}, ensure_ascii=False).encode(), wait=False)
            for p in plates
        ]
        for info in infos:
            info.wait_for_publish(timeout=10)
        return plates

    def rows(self, state: str | None = None) -> list[dict[str, Any]]:
        rows = journal_rows(self.state_dir) if (self.state_dir / "journal.sqlite3").exists() else []
        return [r for r in rows if state is None or r["state"] == state]

    def entries(self) -> list[dict[str, Any]]:
        return [r for r in self.rows() if r["kind"] == "entry"]

    def wait_entries(self, plates: list[str], timeout: float = 20) -> list[dict[str, Any]]:
        """Until every plate is journaled as an entry; returns their rows in plate order."""

        def check() -> list[dict[str, Any]] | None:
            by_plate = {r["plate_number"]: r for r in self.entries()}
            return [by_plate[p] for p in plates] if all(p in by_plate for p in plates) else None

        return wait_for(check, timeout=timeout, what=f"{len(plates)} entries journaled")

    def wait_state(
        self, state: str, count: int, timeout: float = 30, what: str = "", interval: float = 0.1
    ) -> list[dict[str, Any]]:
        """Until exactly `count` entries are in `state` (and that is every entry)."""

        def check() -> list[dict[str, Any]] | None:
            entries = self.entries()
            mine = [r for r in entries if r["state"] == state]
            return mine if len(mine) == count == len(entries) else None

        return wait_for(check, timeout=timeout, interval=interval, what=what or f"{count} entries {state}")

    def status(self) -> tuple[int, dict[str, Any]]:
        return status(self.config)

    def wait_status(
        self, check: Callable[[dict[str, Any]], bool], timeout: float = 20, what: str = ""
    ) -> tuple[int, dict[str, Any]]:
        """Until `status --json` of this agent satisfies `check`; returns (exit code, view)."""

        def probe() -> tuple[int, dict[str, Any]] | None:
            code, view = self.status()
            return (code, view) if check(view) else None

        return wait_for(probe, timeout=timeout, interval=0.2, what=what or "status")

    def entry_requests(self) -> list[dict[str, Any]]:
        """The sandbox's log of entry POSTs (certificate downloads left out)."""
        return [r for r in self.sandbox.requests() if r["path"] == "/v3/parking/reminders/entry"]

    def log(self) -> str:
        return self.agent.log.read_text(errors="replace")


def started_sandbox(directory: Path, **knobs: Any) -> Sandbox:
    """A sandbox serving on a free port, its config fragment written (stop it when done)."""
    return Sandbox(directory, port=0, **knobs).start()


def now_s() -> int:
    return int(time.time())
