"""Pin the surface (STYLE §15): the CLI commands and options, exit codes, the SPEC §7 status keys,
and the import rule "pure modules import no paho, httpx or sqlite3"."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import edgeagent
from edgeagent import cli, status
from edgeagent.config import Config, load
from tests.unit.test_config import config_text, key_files

PACKAGE = Path(edgeagent.__file__).resolve().parent
COMMANDS = [
    "run", "status", "check", "events", "retry", "sessions", "attach", "dismiss", "close",
    "simulate", "sandbox", "demo",
]  # fmt: skip


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def options(command: str) -> dict[str, argparse.Action]:
    return {opt: a for a in subcommands()[command]._actions for opt in a.option_strings}


def test_commands_are_exactly_the_spec_ones() -> None:
    assert list(subcommands()) == COMMANDS


@pytest.mark.parametrize("command", ["run", "status", "check", "events", "retry", "simulate"])
def test_every_command_that_reads_the_config_takes_config(command: str) -> None:
    assert "--config" in options(command)


def test_command_options() -> None:
    assert "--json" in options("status")
    assert "--online" in options("check")
    events = options("events")
    assert events["--state"].choices == ["pending", "sent", "dead", "rejected"]
    assert events["--limit"].default == 50
    assert "--json" in events
    assert "--dead" in options("retry")
    assert {"--camera", "--plate", "--color", "--lane", "--direction"} <= set(options("simulate"))
    assert options("simulate")["--direction"].choices == ["in", "out"]
    assert {"--dir", "--port"} <= set(options("sandbox"))


def test_parsed_arguments() -> None:
    args = cli.build_parser().parse_args(["events", "--state", "rejected", "--limit", "5", "--json"])
    assert (args.command, args.state, args.limit, args.json) == ("events", "rejected", 5, True)
    args = cli.build_parser().parse_args(["retry", "3", "7"])
    assert (args.ids, args.dead) == ([3, 7], False)
    args = cli.build_parser().parse_args(["simulate", "--camera", "south-1", "--plate", "粤B12345", "--lane", "2"])
    assert (args.camera, args.plate, args.lane, args.color) == ("south-1", "粤B12345", "2", None)
    assert args.direction is None
    args = cli.build_parser().parse_args(["simulate", "--camera", "both-1", "--plate", "粤B1", "--direction", "out"])
    assert args.direction == "out"


def test_exit_codes() -> None:
    assert (cli.EXIT_OK, cli.EXIT_DEGRADED, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_CONFIG) == (0, 1, 2, 64, 78)
    assert cli.STATE_EXIT == {"ok": 0, "degraded": 1, "down": 2}


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["launch"],
        ["run", "--bogus"],
        ["events", "--state", "lost"],
        ["events", "--limit", "many"],
        ["retry", "abc"],
        ["simulate", "--camera", "south-1"],  # --plate is required
        ["simulate", "--camera", "south-1", "--plate", "粤B12345", "--direction", "left"],
    ],
    ids=[
        "no-command", "unknown-command", "unknown-option", "bad-state", "bad-limit", "bad-id", "missing-plate",
        "bad-direction",
    ],
)  # fmt: skip
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv)
    assert info.value.code == 64
    assert "error:" in capsys.readouterr().err


def test_retry_without_ids_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["retry", "--config", "/nonexistent.toml"]) == 64
    assert "give request ids, --dead or --all" in capsys.readouterr().err


def test_simulate_refuses_a_direction_the_cameras_format_cannot_carry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before anything is published (no broker here): a two-way lane would reject the read.
    key, pub = key_files(tmp_path / "keys")
    vzenith = '[[cameras]]\nid = "exit-vz"\ntopic = "device/+/message/up/ivs_result"\nformat = "vzenith"\n'
    exits = '[[exits]]\nnumber = "X01"\nname = "出口"\nsources = ["exit-vz"]\n'
    path = tmp_path / "edgeagent.toml"
    path.write_text(config_text(key, pub, cameras=vzenith, entrances=exits), encoding="utf-8")
    argv = ["simulate", "--config", str(path), "--camera", "exit-vz", "--plate", "粤B12345", "--direction", "out"]
    assert cli.main(argv) == 64
    err = capsys.readouterr().err
    assert "camera 'exit-vz': vzenith cannot report a direction (only generic, qianyi can)" in err


def test_usage_error_from_the_real_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgeagent", "events", "--state", "lost"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 64
    assert "invalid choice: 'lost'" in result.stderr


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    for command in COMMANDS:
        with pytest.raises(SystemExit) as info:
            cli.build_parser().parse_args([command, "--help"])
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: edgeagent {command}")
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"edgeagent {edgeagent.__version__}"


# -- status (SPEC §7) ----------------------------------------------------------------------------------

SPEC_STATUS_KEYS = {"state", "version", "daemon", "mqtt", "uplink", "clock", "queue", "cameras", "lot", "latency"}
SPEC_NESTED = {
    "daemon": {"running", "pid", "since"},
    "mqtt": {"connected", "last_message_at"},
    "uplink": {"last_success_at", "last_error", "base_url_in_use"},
    "clock": {"synchronized", "offset_s"},
    "queue": {"pending", "oldest_pending_age_s", "dead", "rejected", "sent_24h"},
    "lot": {"enabled_state", "reason", "checked_at"},
    "latency": {"entry_p50_s", "entry_p95_s", "exit_p50_s", "exit_p95_s"},
}
NOW = 1_720_078_200.0


@pytest.fixture
def config(tmp_path: Path) -> Config:
    key, pub = key_files(tmp_path / "keys")
    path = tmp_path / "edgeagent.toml"
    path.write_text(config_text(key, pub), encoding="utf-8")
    return load(path)


def heartbeat(**mqtt: Any) -> dict[str, Any]:
    """The runtime view the daemon writes (daemon.Daemon.runtime), reduced to what status reads."""
    return {
        "pid": 4242,
        "since": "2024-07-04T07:00:00Z",
        "started": NOW - 600,
        "heartbeat": NOW - 2,
        "mqtt": {"connected": True, "last_message_at": "2024-07-04T07:29:50Z", **mqtt},
        "uplink": {"last_success_at": None, "last_error": None, "base_url_in_use": None, "paused": False},
        "clock": {"synchronized": True, "offset_s": 0.2},
        "journal": {"error": None},
    }


def assert_spec_shape(view: Any) -> None:
    assert set(view) >= SPEC_STATUS_KEYS
    for key, nested in SPEC_NESTED.items():
        assert set(view[key]) >= nested, key
    for camera in view["cameras"]:
        assert set(camera) >= {"id", "last_read_at", "reads_24h"}
    json.dumps(view)  # it is what `status --json` prints and what goes on the status topic


def test_status_object_has_the_spec_keys(config: Config) -> None:
    queue: status.QueueView = {"pending": 2, "oldest_pending_age_s": 12.0, "dead": 0, "rejected": 1, "sent_24h": 40}
    view = status.build(config, heartbeat(), True, queue, {"south-1": (NOW - 10, 43)}, None, NOW)
    assert_spec_shape(view)
    assert view["state"] == "ok"
    assert view["version"] == edgeagent.__version__
    assert view["daemon"] == {"running": True, "pid": 4242, "since": "2024-07-04T07:00:00Z"}
    assert view["queue"] == queue
    assert view["cameras"] == [
        {"id": "south-1", "last_read_at": "2024-07-04T07:29:50Z", "reads_24h": 43},
        {"id": "north-1", "last_read_at": None, "reads_24h": 0},  # every configured camera, even a silent one
    ]


def test_status_object_when_nothing_runs(config: Config) -> None:
    view = status.build(config, None, False, None, {}, None, NOW)
    assert_spec_shape(view)
    assert view["state"] == "down"
    assert view["daemon"] == {"running": False, "pid": None, "since": None}
    assert view["mqtt"]["connected"] is False


def test_status_of_a_dead_daemon_does_not_claim_a_connection(config: Config) -> None:
    view = status.build(config, heartbeat(), False, None, {}, None, NOW)  # heartbeat file left by kill -9
    assert (view["state"], view["daemon"]["running"], view["mqtt"]["connected"]) == ("down", False, False)


@pytest.mark.parametrize(
    ("changes", "state", "problem"),
    [
        ({"heartbeat": NOW - 120}, "down", "daemon not responding"),
        ({"mqtt": {"connected": False, "last_message_at": None, "last_error": "refused"}}, "down", "MQTT broker"),
        ({"journal": {"error": "disk I/O error"}}, "down", "journal not writable"),
        ({"clock": {"synchronized": True, "offset_s": 95.0}}, "degraded", "clock is +95 s off"),
    ],
)
def test_status_states(config: Config, changes: dict[str, Any], state: str, problem: str) -> None:
    view = status.build(config, {**heartbeat(), **changes}, True, None, {}, None, NOW)
    assert view["state"] == state
    assert problem in view["problems"][0]


def test_status_screen_shows_orphans_and_both_latencies_within_80_columns(config: Config) -> None:
    sessions: status.SessionsView = {
        "open": 1, "oldest_open_age_s": 30.0, "exits_pending": 0, "orphans": 1, "fuzzy_24h": 1,
    }  # fmt: skip
    latency: status.LatencyView = {"entry_p50_s": 0.4, "entry_p95_s": 1.2, "exit_p50_s": 0.5, "exit_p95_s": 2.0}
    view = status.build(config, heartbeat(), True, None, {}, None, NOW, None, latency, sessions)
    assert view["state"] == "degraded"  # SPEC §10: while orphans are unhandled
    lines = status.render_text(view).splitlines()
    assert "  ! 1 exit read with no session: edgeagent sessions --orphans" in lines
    assert "latency  entry p50 0.4s p95 1.2s, exit p50 0.5s p95 2.0s (24h)" in lines
    assert "sessions 1 open, 0 exits waiting, 1 orphans, 1 fuzzy 24h" in lines
    assert all(len(line) <= 80 for line in lines)


# -- import rule -----------------------------------------------------------------------------------------

BANNED = {"paho", "httpx", "sqlite3"}
PURE = [
    PACKAGE / f"{name}.py"
    for name in (
        "model",
        "errors",
        "plates",
        "routing",
        "screening",
        "sessions",
        "pipeline",
        "requests",
        "policy",
        "wechatpay",
        "lotwire",
    )
]
PURE += sorted((PACKAGE / "decoders").glob("*.py"))


def imported_modules(source: Path) -> set[str]:
    """Every module an `import` statement in `source` names, wherever the statement is (functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_file(name: str) -> Path | None:
    """The source file of an `edgeagent.*` module name, or None for a name that is not a module."""
    parts = name.split(".")[1:]
    if not parts:
        return PACKAGE / "__init__.py"
    relative = Path(*parts)
    for candidate in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("source", PURE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pure_modules_import_no_adapters(source: Path) -> None:
    """Directly or through other edgeagent modules: follow the project's own imports to the bottom."""
    seen: set[Path] = set()
    todo = [source]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            assert name.split(".")[0] not in BANNED, f"{source.name} reaches {name} through {path.name}"
            if name.split(".")[0] == "edgeagent" and (found := module_file(name)) is not None:
                todo.append(found)
    assert source in seen


def test_the_import_rule_holds_at_run_time() -> None:
    """Importing every pure module in a fresh interpreter loads none of the adapters' libraries."""
    modules = sorted(
        "edgeagent." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__") for p in PURE
    )
    code = (
        "import json, sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(BANNED)!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_the_rule_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import sqlite3\n    from paho.mqtt import client\n")
    assert {"sqlite3", "paho.mqtt"} <= imported_modules(sample)


def test_the_format_type_names_every_decoder() -> None:
    """config.Format (the type of cameras[].format) and the decoder registry are one closed set."""
    from typing import get_args  # noqa: PLC0415

    from edgeagent.config import Format  # noqa: PLC0415
    from edgeagent.decoders import KNOWN_FORMATS  # noqa: PLC0415

    assert set(get_args(Format)) == set(KNOWN_FORMATS)
