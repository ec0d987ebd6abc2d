"""Config parsing (SPEC §3, STYLE §5): defaults, and every error as one line `file: key.path: problem`.

The pure `parse()` is checked for each broken config, and the same lines with exit 78 are checked
from the real `edgeagent check` and `edgeagent run` commands: a broken config never starts the daemon.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent import config as config_module
from edgeagent.config import Config, load, parse
from edgeagent.decoders import KNOWN_FORMATS, REGISTRY
from edgeagent.errors import ConfigError
from edgeagent.model import CarType, MatchMode, ReentryMode, VehicleType
from tests.conftest import Keys

WECHATPAY = """\
mchid = "1900000001"
merchant_serial_no = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
merchant_private_key = "{key}"
platform_public_key = "{pub}"
platform_public_key_id = "PUB_KEY_ID_0119000000012024112700000000000042"
"""
PARKING = 'parking_id = "WXPARK001"\n'
MQTT = 'host = "127.0.0.1"\n'
CAMERAS = """\
[[cameras]]
id = "south-1"
topic = "anpr/south-1/plate"
format = "generic"

[[cameras]]
id = "north-1"
topic = "anpr/north-1/+"
format = "generic"
"""
ENTRANCES = """\
[[entrances]]
number = "A01"
name = "南门入口"
sources = ["south-1"]

[[entrances]]
number = "B01"
name = "北门入口"
sources = ["north-1:1"]
discount_template_id = [1001]
"""


def key_files(directory: Path) -> tuple[Path, Path]:
    """Placeholder key files: the config only checks that they exist (the daemon and `check` parse them)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, pub = directory / "apiclient_key.pem", directory / "wechatpay_pub.pem"
    key.write_text("not parsed by the config module\n")
    key.chmod(0o600)  # a group- or world-readable private key is refused (issue 12)
    pub.write_text("not parsed by the config module\n")
    return key, pub


def config_text(
    key: Path,
    pub: Path,
    *,
    state_dir: str = "state",
    top: str = "",
    wechatpay: str | None = None,
    parking: str = PARKING,
    mqtt: str = MQTT,
    cameras: str = CAMERAS,
    entrances: str = ENTRANCES,
) -> str:
    """A complete, valid SPEC §3 config unless a section is replaced."""
    wx = WECHATPAY.format(key=key, pub=pub) if wechatpay is None else wechatpay
    return (
        f'state_dir = "{state_dir}"\nserial_prefix = "P1G1"\n{top}\n'
        f"[wechatpay]\n{wx}\n[parking]\n{parking}\n[mqtt]\n{mqtt}\n{cameras}\n{entrances}"
    )


def parse_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "edgeagent.toml"
    path.write_text(text, encoding="utf-8")
    return load(path)


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_text(tmp_path, text)
    return info.value.problems


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return key_files(tmp_path / "keys")


# -- a valid config -------------------------------------------------------------------------------


def test_no_backup_domain_by_default_behind_another_base_url(tmp_path: Path) -> None:
    # A sandbox or a private gateway has no sibling: failing over to the real API would be wrong.
    key, pub = key_files(tmp_path / "keys")
    text = config_text(key, pub).replace("[wechatpay]\n", '[wechatpay]\nbase_url = "https://127.0.0.1:8443"\n', 1)
    config = parse_text(tmp_path, text)
    assert (config.wechatpay.base_url, config.wechatpay.backup_base_url) == ("https://127.0.0.1:8443", "")


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path, files: tuple[Path, Path]) -> None:
    key, pub = files
    config = parse_text(tmp_path, config_text(key, pub))

    assert config.state_dir == tmp_path / "state"  # relative to the config file
    assert config.journal_path == tmp_path / "state" / "journal.sqlite3"
    assert config.serial_prefix == "P1G1"
    assert config.wechatpay.merchant_private_key == key
    assert config.wechatpay.base_url == "https://api.mch.weixin.qq.com"
    assert config.wechatpay.backup_base_url == "https://api2.mch.weixin.qq.com"  # beside the official primary
    assert (config.wechatpay.timeout_s, config.wechatpay.max_in_flight, config.wechatpay.max_rate_per_s) == (10, 4, 10)
    parking = config.parking
    assert parking.repeat_window_s == 120
    assert parking.min_confidence == 0
    assert parking.max_entry_age_s == 604800
    assert parking.timestamp_source == "auto"
    assert parking.default_car_type is CarType.TEMPORARY
    assert parking.car_type_lists == ()
    assert (config.mqtt.port, config.mqtt.tls, config.mqtt.max_payload_bytes) == (1883, False, 1024 * 1024)
    assert config.mqtt.status_topic == f"edgeagent/{config.mqtt.client_id}/status"
    assert [c.id for c in config.cameras] == ["south-1", "north-1"]
    assert config.entrances[1].sources == ("north-1:1",)
    assert config.entrances[1].discount_template_id == (1001,)
    assert config.entrances[0].vehicle_type is None


def test_config_values_are_frozen(tmp_path: Path, files: tuple[Path, Path]) -> None:
    config = parse_text(tmp_path, config_text(*files))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.serial_prefix = "X"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.parking.repeat_window_s = 1  # type: ignore[misc]


def test_full_spec_example_values_are_read(tmp_path: Path, files: tuple[Path, Path]) -> None:
    key, pub = files
    monthly = tmp_path / "monthly.txt"
    monthly.write_text("粤B12345\n")
    text = config_text(
        key,
        pub,
        wechatpay=WECHATPAY.format(key=key, pub=pub)
        + 'backup_base_url = "https://api2.mch.weixin.qq.com"\ntimeout_s = 5\nmax_in_flight = 2\n',
        parking=PARKING + 'timestamp_source = "camera"\nmin_confidence = 0.8\nrepeat_window_s = 60\n'
        f'car_type_lists = {{ PLATE_TYPE_MONTHLY = "{monthly}" }}\ndefault_car_type = "PLATE_TYPE_OTHERS"\n',
        mqtt=MQTT + 'tls = true\nclient_id = "gate-7"\n',
        entrances=ENTRANCES.replace(
            'sources = ["south-1"]', 'sources = ["south-1"]\nvehicle_type = "VEHICLE_TYPE_LARGE"'
        ),
    )
    config = parse_text(tmp_path, text)

    assert config.wechatpay.backup_base_url == "https://api2.mch.weixin.qq.com"
    assert config.wechatpay.timeout_s == 5.0
    assert config.parking.timestamp_source == "camera"
    assert config.parking.min_confidence == 0.8
    assert config.parking.car_type_lists == ((CarType.MONTHLY, monthly),)
    assert config.parking.default_car_type is CarType.OTHERS
    assert config.mqtt.port == 8883  # the TLS default port
    assert config.mqtt.status_topic == "edgeagent/gate-7/status"
    assert config.entrances[0].vehicle_type is VehicleType.LARGE


def test_boundaries_that_are_still_valid(tmp_path: Path, files: tuple[Path, Path]) -> None:
    number, name = "A" * 128, "南" * 64
    entrances = f'[[entrances]]\nnumber = "{number}"\nname = "{name}"\nsources = ["south-1", "north-1"]\n'
    entrances += "discount_template_id = [1, 2, 3]\n"
    config = parse_text(tmp_path, config_text(*files, entrances=entrances))
    assert config.entrances[0].number == number
    assert config.entrances[0].name == name
    assert config.entrances[0].discount_template_id == (1, 2, 3)


def test_credentials_directory_is_expanded(tmp_path: Path, files: tuple[Path, Path], monkeypatch) -> None:
    key, pub = files
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(key.parent))
    wechatpay = WECHATPAY.format(key="$CREDENTIALS_DIRECTORY/apiclient_key.pem", pub=pub)
    config = parse_text(tmp_path, config_text(key, pub, wechatpay=wechatpay))
    assert config.wechatpay.merchant_private_key == key


def test_unset_credentials_directory_is_explained(tmp_path: Path, files: tuple[Path, Path], monkeypatch) -> None:
    key, pub = files
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    wechatpay = WECHATPAY.format(key="$CREDENTIALS_DIRECTORY/apiclient_key.pem", pub=pub)
    [problem] = problems_of(tmp_path, config_text(key, pub, wechatpay=wechatpay))
    assert problem.endswith(
        "wechatpay.merchant_private_key: environment variable $CREDENTIALS_DIRECTORY is not set "
        "(systemd sets it for LoadCredential=)"
    )


def test_resolve_path_order(monkeypatch) -> None:
    monkeypatch.setenv("EDGEAGENT_CONFIG", "/srv/env.toml")
    assert config_module.resolve_path("/srv/cli.toml") == Path("/srv/cli.toml")
    assert config_module.resolve_path(None) == Path("/srv/env.toml")
    monkeypatch.delenv("EDGEAGENT_CONFIG")
    assert config_module.resolve_path(None) == Path("/etc/edgeagent/edgeagent.toml")


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nowhere.toml")
    [problem] = info.value.problems
    assert problem.startswith(f"{tmp_path / 'nowhere.toml'}: ")
    assert "not found" in problem


def test_every_accepted_format_has_a_decoder(tmp_path: Path, files: tuple[Path, Path]) -> None:
    """A format the config accepts but no decoder handles would crash intake on the first message."""
    for fmt in KNOWN_FORMATS:
        cameras = CAMERAS.replace('format = "generic"\n\n[[cameras]]', f'format = "{fmt}"\n\n[[cameras]]', 1)
        try:
            config = parse_text(tmp_path, config_text(*files, cameras=cameras))
        except ConfigError as exc:
            assert fmt not in REGISTRY, exc.problems
            [problem] = exc.problems
            assert "cameras[0].format: " in problem
            assert fmt in problem
        else:
            assert config.cameras[0].format == fmt
            assert fmt in REGISTRY, f"config accepts format {fmt!r} but no decoder is registered"


# -- errors ---------------------------------------------------------------------------------------

# (case id, section overrides as a function of (key, pub), expected "key.path: problem" prefix)
CameraTwice = CAMERAS.replace('id = "north-1"', 'id = "south-1"').replace("anpr/north-1/+", "anpr/other/+")
ERROR_CASES: list[tuple[str, dict[str, str], str]] = [
    ("unknown-top-level-key", {"top": 'statedir = "/tmp"'}, "statedir: unknown key"),
    ("unknown-key-in-table", {"mqtt": MQTT + 'hots = "broker"\n'}, "mqtt.hots: unknown key"),
    (
        "unknown-key-in-array-table",
        {"cameras": CAMERAS.replace('format = "generic"', 'fromat = "generic"', 1)},
        "cameras[0].fromat: unknown key",
    ),
    (
        "unknown-car-type-list",
        {"parking": PARKING + 'car_type_lists = { PLATE_TYPE_VIP = "/x" }\n'},
        "parking.car_type_lists.PLATE_TYPE_VIP: unknown value 'PLATE_TYPE_VIP'",
    ),
    ("wrong-type-integer", {"mqtt": MQTT + 'port = "1883"\n'}, "mqtt.port: expected an integer, got a string '1883'"),
    ("wrong-type-bool", {"mqtt": MQTT + 'tls = "yes"\n'}, "mqtt.tls: expected true or false, got a string 'yes'"),
    (
        "wrong-type-array",
        {"entrances": ENTRANCES.replace('sources = ["south-1"]', 'sources = "south-1"')},
        "entrances[0].sources: expected an array, got a string 'south-1'",
    ),
    (
        "bad-format-enum",
        {"cameras": CAMERAS.replace('format = "generic"', 'format = "hik"', 1)},
        'cameras[0].format: unknown format "hik" (known: generic, vzenith, qianyi, hikvision, frigate)',
    ),
    (
        "bad-timestamp-source",
        {"parking": PARKING + 'timestamp_source = "gps"\n'},
        "parking.timestamp_source: unknown value 'gps' (known: camera, agent, auto)",
    ),
    (
        "bad-vehicle-type",
        {"entrances": ENTRANCES.replace('sources = ["south-1"]', 'sources = ["south-1"]\nvehicle_type = "bus"')},
        "entrances[0].vehicle_type: unknown value 'bus'",
    ),
    ("out-of-range", {"parking": PARKING + "min_confidence = 97\n"}, "parking.min_confidence: must be between 0 and 1"),
    (
        "duplicate-camera-id",
        {"cameras": CameraTwice, "entrances": ENTRANCES.replace("north-1:1", "south-1:1")},
        'cameras[1].id: duplicate camera id "south-1" (also cameras[0])',
    ),
    (
        "source-names-unknown-camera",
        {"entrances": ENTRANCES.replace('sources = ["south-1"]', 'sources = ["west-9:2"]')},
        'entrances[0].sources[0]: unknown camera "west-9" (known: north-1, south-1)',
    ),
    (
        "entrance-number-with-dash",
        {"entrances": ENTRANCES.replace('number = "A01"', 'number = "A-01"')},
        "entrances[0].number: 'A-01' must be 1-128 letters and digits",
    ),
    (
        "entrance-number-too-long",
        {"entrances": ENTRANCES.replace('number = "A01"', f'number = "{"A" * 129}"')},
        "entrances[0].number: ",
    ),
    (
        "entrance-name-too-long",
        {"entrances": ENTRANCES.replace('name = "南门入口"', f'name = "{"南" * 65}"')},
        "entrances[0].name: must be 1-64 characters, got 65",
    ),
    (
        "four-discount-template-ids",
        {"entrances": ENTRANCES.replace("[1001]", "[1, 2, 3, 4]")},
        "entrances[1].discount_template_id: at most 3 template ids, got 4",
    ),
    (
        "missing-key-file",
        {"wechatpay": WECHATPAY.replace("{key}", "{key}.missing")},
        "wechatpay.merchant_private_key: file not found: ",
    ),
    ("missing-required-key", {"parking": "repeat_window_s = 60\n"}, "parking.parking_id: required key is missing"),
    ("toml-syntax-error", {"mqtt": MQTT + "port = = 1\n"}, "(syntax): "),
]


def broken_config(tmp_path: Path, overrides: dict[str, str]) -> Path:
    key, pub = key_files(tmp_path / "keys")
    values = {name: text.format(key=key, pub=pub) if "{key}" in text else text for name, text in overrides.items()}
    path = tmp_path / "edgeagent.toml"
    path.write_text(config_text(key, pub, state_dir=str(tmp_path / "state"), **values), encoding="utf-8")
    return path


@pytest.mark.parametrize(("overrides", "expected"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_each_error_is_one_line_naming_file_and_key(tmp_path: Path, overrides: dict[str, str], expected: str) -> None:
    path = broken_config(tmp_path, overrides)
    with pytest.raises(ConfigError) as info:
        load(path)
    problems = info.value.problems
    assert len(problems) == 1, problems  # one mistake, one line: no follow-on noise
    [problem] = problems
    assert "\n" not in problem
    assert problem.startswith(f"{path}: {expected}"), problem
    if "(syntax)" in expected:
        assert re.search(r"line \d+", problem), problem


def test_several_errors_are_all_reported(tmp_path: Path, files: tuple[Path, Path]) -> None:
    key, pub = files
    text = config_text(
        key,
        pub,
        top="colour = 1",
        mqtt=MQTT + 'port = "x"\n',
        cameras=CAMERAS.replace('format = "generic"', 'format = "hik"', 1),
        entrances=ENTRANCES.replace('number = "A01"', 'number = "A 01"').replace("[1001]", "[1, 2, 3, 4]"),
    )
    problems = problems_of(tmp_path, text)
    keys_reported = sorted(p.split(": ")[1] for p in problems)
    assert keys_reported == [
        "cameras[0].format",
        "colour",
        "entrances[0].number",
        "entrances[1].discount_template_id",
        "mqtt.port",
    ]


def test_same_topic_on_two_cameras_is_an_error(tmp_path: Path, files: tuple[Path, Path]) -> None:
    cameras = CAMERAS.replace("anpr/north-1/+", "anpr/south-1/plate")
    [problem] = problems_of(tmp_path, config_text(*files, cameras=cameras))
    assert ': cameras[1].topic: topic "anpr/south-1/plate" is already used by cameras[0]' in problem


def test_same_source_on_two_entrances_is_an_error(tmp_path: Path, files: tuple[Path, Path]) -> None:
    entrances = ENTRANCES.replace('sources = ["north-1:1"]', 'sources = ["south-1"]')
    [problem] = problems_of(tmp_path, config_text(*files, entrances=entrances))
    assert ': entrances[1].sources[0]: "south-1" is already a source of entrances[0]' in problem


def test_plain_http_api_url_is_refused(tmp_path: Path, files: tuple[Path, Path]) -> None:
    key, pub = files
    wechatpay = WECHATPAY.format(key=key, pub=pub) + 'base_url = "http://api.mch.weixin.qq.com"\n'
    [problem] = problems_of(tmp_path, config_text(key, pub, wechatpay=wechatpay))
    assert ": wechatpay.base_url: must be an https:// URL" in problem


@pytest.mark.parametrize("prefix", ["", "P1-G1", "ABCDEFGHIJKLM"])
def test_bad_serial_prefix(tmp_path: Path, files: tuple[Path, Path], prefix: str) -> None:
    text = config_text(*files).replace('serial_prefix = "P1G1"', f'serial_prefix = "{prefix}"')
    [problem] = problems_of(tmp_path, text)
    assert f": serial_prefix: {prefix!r} must be 1-12 letters and digits" in problem


def test_config_error_parse_api_reports_the_given_label(tmp_path: Path, files: tuple[Path, Path]) -> None:
    text = config_text(*files, top="colour = 1")
    with pytest.raises(ConfigError) as info:
        parse(text, Path("edgeagent.toml"))
    assert info.value.problems[0].startswith("edgeagent.toml: colour: unknown key")


# -- the same errors from the real commands --------------------------------------------------------

CLI_CASES = [
    c
    for c in ERROR_CASES
    if c[0]
    in {
        "unknown-top-level-key",
        "unknown-key-in-table",
        "wrong-type-integer",
        "bad-format-enum",
        "duplicate-camera-id",
        "source-names-unknown-camera",
        "entrance-number-with-dash",
        "entrance-name-too-long",
        "four-discount-template-ids",
        "missing-key-file",
        "toml-syntax-error",
    }
]


def _edgeagent(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgeagent", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize(("overrides", "expected"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_check_and_run_exit_78_with_the_line(tmp_path: Path, overrides: dict[str, str], expected: str) -> None:
    path = broken_config(tmp_path, overrides)
    procs = [_edgeagent(command, "--config", str(path)) for command in ("check", "run")]  # run both at once
    outcomes = [(proc.communicate(timeout=30)[1], proc.returncode) for proc in procs]
    for stderr, returncode in outcomes:
        assert returncode == 78, stderr
        lines = stderr.splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith(f"{path}: {expected}"), stderr
    # The daemon never started: it would have created the state directory and the journal.
    assert not (tmp_path / "state").exists()


def test_a_missing_config_file_exits_78_from_check_and_run(tmp_path: Path) -> None:
    missing = tmp_path / "edgeagent.toml"
    procs = [_edgeagent(command, "--config", str(missing)) for command in ("check", "run")]
    for proc in procs:
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 78
        assert stderr.startswith(f"{missing}: ") and "not found" in stderr


def test_check_accepts_a_good_config_and_reports_every_bad_line(tmp_path: Path, keys: Keys) -> None:
    good = tmp_path / "good.toml"
    good.write_text(config_text(keys.merchant_key, keys.platform_pub, state_dir=str(tmp_path / "state")))
    proc = _edgeagent("check", "--config", str(good))
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout + stderr
    assert "merchant private key: RSA 2048 bits" in stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(
        config_text(
            keys.merchant_key,
            keys.platform_pub,
            top="colour = 1",
            cameras=CAMERAS.replace('format = "generic"', 'format = "hik"', 1),
            entrances=ENTRANCES.replace("[1001]", "[1, 2, 3, 4]"),
        )
    )
    proc = _edgeagent("check", "--config", str(bad))
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 78
    assert [line.split(": ")[1] for line in stderr.splitlines()] == [
        "cameras[0].format",
        "entrances[1].discount_template_id",
        "colour",
    ]


def test_key_file_that_is_not_a_key_fails_check_with_78(tmp_path: Path, files: tuple[Path, Path]) -> None:
    path = tmp_path / "edgeagent.toml"
    path.write_text(config_text(*files))
    proc = _edgeagent("check", "--config", str(path))
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 78
    assert "FAIL merchant private key" in stdout


# -- exits, sessions, lot (SPEC §3, §10, §11) ------------------------------------------------------

EXIT_CAMERAS = (
    CAMERAS
    + """
[[cameras]]
id = "exit-1"
topic = "anpr/exit-1/plate"
format = "vzenith"

[[cameras]]
id = "gate-q"
topic = "aiot/plate/+"
format = "qianyi"
"""
)
EXITS = """
[[exits]]
number = "X01"
name = "南门出口"
sources = ["exit-1"]
"""


def exit_config(tmp_path: Path, files: tuple[Path, Path], exits: str, *, entrances: str = ENTRANCES, top: str = ""):
    return config_text(*files, cameras=EXIT_CAMERAS, entrances=entrances + exits, top=top)


def test_exits_sessions_and_lot_defaults(tmp_path: Path, files: tuple[Path, Path]) -> None:
    config = parse_text(tmp_path, config_text(*files))
    assert config.exits == ()
    assert config.sessions == config_module.SessionsConfig(MatchMode.CONFUSABLE, 30.0, ReentryMode.CLOSE_PREVIOUS)
    assert config.lot.topic == ""  # off

    config = parse_text(tmp_path, exit_config(tmp_path, files, EXITS))
    assert config.exits == (config_module.ExitConfig("X01", "南门出口", ("exit-1",)),)


def test_sessions_and_lot_values_are_read(tmp_path: Path, files: tuple[Path, Path]) -> None:
    text = exit_config(tmp_path, files, EXITS)
    text += '\n[sessions]\nmatch = "exact"\nexit_hold_s = 0\nreentry = "keep"\n'
    text += '\n[lot]\ntopic = "lots/WXPARK001/sessions"\n'
    config = parse_text(tmp_path, text)
    assert config.sessions.match is MatchMode.EXACT
    assert config.sessions.exit_hold_s == 0.0
    assert config.sessions.reentry is ReentryMode.KEEP
    assert config.lot.topic == "lots/WXPARK001/sessions"


def test_an_exit_only_box_needs_no_entrance(tmp_path: Path, files: tuple[Path, Path]) -> None:
    config = parse_text(tmp_path, config_text(*files, cameras=EXIT_CAMERAS, entrances=EXITS))
    assert config.entrances == ()
    assert [e.number for e in config.exits] == ["X01"]
    [problem] = problems_of(tmp_path, config_text(*files, entrances=""))
    assert ": entrances: at least one [[entrances]] or [[exits]] is required" in problem


@pytest.mark.parametrize("source", ["south-1", "north-1:1", "gate-q"])  # generic, generic lane, qianyi
def test_two_way_lane_on_a_camera_that_reports_direction(tmp_path: Path, files: tuple[Path, Path], source: str) -> None:
    entrances = ENTRANCES + '\n[[entrances]]\nnumber = "Q01"\nname = "双向"\nsources = ["gate-q"]\n'
    exits = f'\n[[exits]]\nnumber = "X09"\nname = "双向出口"\nsources = ["{source}"]\n'
    config = parse_text(tmp_path, exit_config(tmp_path, files, exits, entrances=entrances))
    assert config.exits[0].sources == (source,)


def test_lanes_of_one_camera_may_split_between_entrance_and_exit(tmp_path: Path, files: tuple[Path, Path]) -> None:
    exits = '\n[[exits]]\nnumber = "X02"\nname = "北门出口"\nsources = ["north-1:2"]\n'
    config = parse_text(tmp_path, exit_config(tmp_path, files, exits))
    assert config.exits[0].sources == ("north-1:2",)  # north-1:1 is entrance B01


def test_exit_lane_source_wins_over_whole_camera_within_exits(tmp_path: Path, files: tuple[Path, Path]) -> None:
    exits = EXITS + '\n[[exits]]\nnumber = "X02"\nname = "出口二"\nsources = ["exit-1:2"]\n'
    config = parse_text(tmp_path, exit_config(tmp_path, files, exits))
    assert [e.sources for e in config.exits] == [("exit-1",), ("exit-1:2",)]


TWO_WAY_ENTRANCE = '\n[[entrances]]\nnumber = "E01"\nname = "出口相机"\nsources = ["exit-1"]\n'
EXIT_ERROR_CASES: list[tuple[str, str, str, str]] = [
    # (case id, extra [[entrances]], [[exits]] and more, expected "key.path: problem" prefix)
    (
        "two-way-on-a-camera-without-direction",
        TWO_WAY_ENTRANCE,
        EXITS,
        'exits[0].sources[0]: "exit-1" is also a source of entrances[2], but camera "exit-1" is vzenith, '
        "whose reads do not say in or out (a two-way lane needs one of: generic, qianyi)",
    ),
    (
        "whole-camera-entrance-lane-exit",
        "",
        '\n[[exits]]\nnumber = "X01"\nname = "南门出口"\nsources = ["south-1:1"]\n',
        'exits[0].sources[0]: "south-1:1" overlaps "south-1" of entrances[0] (a lane feeds an entrance or an '
        "exit; list the same source under both only for a two-way lane)",
    ),
    (
        "lane-entrance-whole-camera-exit",
        "",
        '\n[[exits]]\nnumber = "X01"\nname = "北门出口"\nsources = ["north-1"]\n',
        'exits[0].sources[0]: "north-1" overlaps "north-1:1" of entrances[1]',
    ),
    (
        "source-in-two-exits",
        "",
        EXITS + '\n[[exits]]\nnumber = "X02"\nname = "出口二"\nsources = ["exit-1"]\n',
        'exits[1].sources[0]: "exit-1" is already a source of exits[0]',
    ),
    (
        "duplicate-exit-number",
        "",
        EXITS + '\n[[exits]]\nnumber = "X01"\nname = "出口二"\nsources = ["exit-1:3"]\n',
        'exits[1].number: duplicate exit number "X01" (also exits[0])',
    ),
    (
        "exit-number-is-an-entrance-number",
        "",
        EXITS.replace('"X01"', '"A01"'),
        'exits[0].number: "A01" is already an entrance number (give the exit its own, like X01)',
    ),
    ("exit-number-with-dash", "", EXITS.replace('"X01"', '"X-01"'), "exits[0].number: 'X-01' must be 1-128"),
    ("exit-name-empty", "", EXITS.replace('"南门出口"', '""'), "exits[0].name: must be 1-64 characters, got 0"),
    ("exit-without-sources", "", EXITS.replace('["exit-1"]', "[]"), "exits[0].sources: must name at least one"),
    ("exit-missing-name", "", EXITS.replace('name = "南门出口"\n', ""), "exits[0].name: required key is missing"),
    (
        "exit-unknown-camera",
        "",
        EXITS.replace('["exit-1"]', '["exit-9"]'),
        'exits[0].sources[0]: unknown camera "exit-9"',
    ),
    (
        "exit-malformed-source",
        "",
        EXITS.replace('["exit-1"]', '["exit-1:2:3"]'),
        'exits[0].sources[0]: expected "camera" or "camera:lane", got \'exit-1:2:3\'',
    ),
    ("exit-unknown-key", "", EXITS + 'direction = "out"\n', "exits[0].direction: unknown key"),
    (
        "bad-match-mode",
        "",
        EXITS + '\n[sessions]\nmatch = "fuzzy"\n',
        "sessions.match: unknown value 'fuzzy' (known: exact, confusable)",
    ),
    (
        "bad-reentry",
        "",
        EXITS + '\n[sessions]\nreentry = "refuse"\n',
        "sessions.reentry: unknown value 'refuse' (known: close_previous, keep)",
    ),
    ("negative-exit-hold", "", EXITS + "\n[sessions]\nexit_hold_s = -1\n", "sessions.exit_hold_s: must be between 0"),
    ("sessions-unknown-key", "", EXITS + "\n[sessions]\nfuzzy_pairs = []\n", "sessions.fuzzy_pairs: unknown key"),
    ("lot-topic-wildcard", "", EXITS + '\n[lot]\ntopic = "lots/+/sessions"\n', "lot.topic: 'lots/+/sessions' must"),
    ("lot-topic-hash", "", EXITS + '\n[lot]\ntopic = "lots/#"\n', "lot.topic: 'lots/#' must be a topic name"),
    ("lot-topic-dollar", "", EXITS + '\n[lot]\ntopic = "$SYS/lot"\n', "lot.topic: '$SYS/lot' must not start"),
    ("lot-topic-trailing-slash", "", EXITS + '\n[lot]\ntopic = "lots/a/"\n', "lot.topic: 'lots/a/' must not end"),
    ("lot-topic-nul", "", EXITS + '\n[lot]\ntopic = "lots\\u0000a"\n', "lot.topic: must be at most"),
    ("lot-unknown-key", "", EXITS + '\n[lot]\nbox_id = "gate1"\n', "lot.box_id: unknown key"),
]


@pytest.mark.parametrize(
    ("entrances", "exits", "expected"), [c[1:] for c in EXIT_ERROR_CASES], ids=[c[0] for c in EXIT_ERROR_CASES]
)
def test_each_exit_error_is_one_line_naming_the_key(
    tmp_path: Path, files: tuple[Path, Path], entrances: str, exits: str, expected: str
) -> None:
    text = exit_config(tmp_path, files, exits, entrances=ENTRANCES + entrances)
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    [problem] = problems
    assert "\n" not in problem
    assert problem.startswith(f"{tmp_path / 'edgeagent.toml'}: {expected}"), problem


def test_exits_that_are_not_an_array_of_tables(tmp_path: Path, files: tuple[Path, Path]) -> None:
    [problem] = problems_of(tmp_path, exit_config(tmp_path, files, "", top='exits = "X01"'))
    assert problem.endswith(": exits: expected an array of tables ([[exits]])")


def test_every_exit_problem_is_reported_at_once(tmp_path: Path, files: tuple[Path, Path]) -> None:
    exits = (
        '\n[[exits]]\nnumber = "A01"\nname = "一"\nsources = ["south-1:1", "exit-1"]\n'
        '\n[[exits]]\nnumber = "A01"\nname = "二"\nsources = ["exit-1", "west-9"]\n'
        '\n[sessions]\nmatch = "fuzzy"\n\n[lot]\ntopic = "lots/#"\n'
    )
    problems = problems_of(tmp_path, exit_config(tmp_path, files, exits))
    assert sorted(p.split(": ")[1] for p in problems) == [
        "exits[0].number",
        "exits[0].sources[0]",
        "exits[1].number",
        "exits[1].sources[0]",
        "exits[1].sources[1]",
        "lot.topic",
        "sessions.match",
    ]


def test_the_deploy_example_parses(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "edgeagent.toml.example"
    config = parse(example.read_text("utf-8"), example, check_files=False)
    assert config.sessions == config_module.SessionsConfig()
    assert config.lot == config_module.LotConfig()
    # The example lot the README draws: two entrances, one exit, the north lane two-way.
    assert [(e.number, e.sources) for e in config.entrances] == [("A01", ("south-1",)), ("A02", ("north-1",))]
    assert [(e.number, e.sources) for e in config.exits] == [("X01", ("south-2", "north-1"))]
    assert config.cameras[0].id == "south-1"  # the camera tests/system simulates on the installed box
