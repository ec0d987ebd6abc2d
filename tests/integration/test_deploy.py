"""Deployment (SPEC §9, docs/deploy.md): the unit as systemd-analyze sees it, deploy/install.sh into a
staging tree (twice, compared file by file), the staged lane broker run by a real Mosquitto, the fleet
status bridge against a TLS broker, uninstall, and the real (non --root) install in a throwaway overlay.

Nothing is mocked: the staged venv is built by pip, the broker files are loaded by /usr/sbin/mosquitto
the way Debian's mosquitto.conf would load them, and the agent is `edgeagent run`.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent import __version__
from edgeagent.config import parse
from edgeagent.localbroker import LocalBroker
from tests.conftest import Agent, Keys, events, eventually, run_cli, write_config

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"
UNINSTALL = REPO / "deploy" / "uninstall.sh"
CAMERA_USER = REPO / "deploy" / "mosquitto" / "edgeagent-camera-user"
BRIDGE = REPO / "deploy" / "mosquitto" / "bridge-central.conf"
UNIT = REPO / "systemd" / "edgeagent.service"
EXAMPLE = REPO / "deploy" / "edgeagent.toml.example"
MOSQUITTO = Path(os.environ.get("MOSQUITTO", "/usr/sbin/mosquitto"))
# What a real install would create on this machine; --root must leave all of it alone.
HOST_PATHS = ("/opt/edgeagent", "/etc/edgeagent", "/var/lib/edgeagent", "/etc/systemd/system/edgeagent.service")
CAMERA_LAN = "127.0.0.2"  # a loopback alias stands in for the camera LAN, so the second listener binds here
IS_ROOT = os.geteuid() == 0


def need(condition: bool, reason: str) -> None:
    if not condition:
        pytest.skip(reason)


# -- the unit ---------------------------------------------------------------------------------------


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_exposure_score_is_at_most_1_1() -> None:
    result = systemd_analyze("security", "--offline=yes", str(UNIT))
    need("--offline" not in result.stderr, f"this systemd-analyze has no --offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for edgeagent\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposed = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert float(match.group(1)) <= 1.1, "\n".join(exposed)  # SPEC §9 says 1.5; issue 12 tightened it


def test_unit_verifies_clean(tmp_path: Path) -> None:
    # On this machine the unit's ExecStart (/opt/edgeagent/venv/bin/edgeagent) does not exist, and
    # verify rightly says so. The same unit pointing at this checkout's edgeagent must verify clean.
    executable = Path(sys.executable).with_name("edgeagent")
    need(executable.exists(), f"{executable} is missing (pip install -e .)")
    copy = tmp_path / "edgeagent.service"
    copy.write_text(UNIT.read_text().replace("/opt/edgeagent/venv/bin/edgeagent", str(executable)))
    result = systemd_analyze("verify", str(copy))
    assert result.returncode == 0, result.stderr
    assert [line for line in (result.stdout + result.stderr).splitlines() if "edgeagent" in line] == []

    as_shipped = systemd_analyze("verify", str(UNIT))
    complaints = [line for line in (as_shipped.stdout + as_shipped.stderr).splitlines() if "edgeagent" in line]
    if not Path("/opt/edgeagent/venv/bin/edgeagent").exists():
        assert complaints == [
            "edgeagent.service: Command /opt/edgeagent/venv/bin/edgeagent is not executable: No such file or directory"
        ]


def test_unit_is_the_service_spec_9_describes() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert int(s["WatchdogSec"][0]) > 0
    assert s["Restart"] == ["always"]
    assert 0 < int(s["RestartSec"][0]) <= 30
    assert s["User"] == ["edgeagent"]
    # Issue 12: the journal belongs to the readers' group (systemd chowns the StateDirectory to
    # User:Group), the service keeps its own group for files only it may read.
    assert s["Group"] == ["edgeagent-read"]
    assert s["SupplementaryGroups"] == ["edgeagent"]
    assert s["StateDirectoryMode"] == ["2750"] and s["UMask"] == ["0027"]
    assert s["StateDirectory"] == s["ConfigurationDirectory"] == ["edgeagent"]
    assert {"network-online.target", "mosquitto.service"} <= set(" ".join(s["After"]).split())
    # Issue 12: proven not to break the agent by tests/integration/test_unit_sandbox.py.
    assert s["MemoryDenyWriteExecute"] == s["PrivateUsers"] == ["yes"]
    assert s["LimitCORE"] == ["0"]
    assert s["LoadCredential"][1:] == ["mqtt.password:/etc/edgeagent/mqtt.password"]
    # The credential the unit loads is the file the example config reads, from where docs/deploy.md
    # tells the installer to put the merchant key, and the config is where install.sh writes it.
    name, _, source = s["LoadCredential"][0].partition(":")
    assert source == f"/etc/edgeagent/{name}"
    assert f'merchant_private_key = "$CREDENTIALS_DIRECTORY/{name}"' in EXAMPLE.read_text()
    assert s["ExecStart"][0].endswith("run --config /etc/edgeagent/edgeagent.toml")


def test_scripts_are_shellcheck_clean() -> None:
    need(shutil.which("shellcheck") is not None, "shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(
        ["shellcheck", str(INSTALL), str(UNINSTALL), str(CAMERA_USER)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout


# -- install.sh --root ------------------------------------------------------------------------------

Snapshot = dict[str, tuple[object, ...]]


def snapshot(root: Path) -> Snapshot:
    """Every path under root: kind, mode, owner, group, and the content's digest or the link target."""
    tree: Snapshot = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            what: tuple[object, ...] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            what = ("dir",)
        else:
            what = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        tree[str(path.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, *what)
    return tree


def run_script(script: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class Staged:
    root: Path
    first: Snapshot
    second: Snapshot
    outputs: list[str]
    host_before: dict[str, bool]
    host_after: dict[str, bool]


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Staged:
    """deploy/install.sh --root into a fresh tree, run twice, with a snapshot after each run."""
    python = Path("/usr/bin/python3")
    need(
        python.exists() and subprocess.run([python, "-c", "import ensurepip"], capture_output=True).returncode == 0,
        "the installer builds its venv with /usr/bin/python3, missing or without venv (apt-get install python3-venv)",
    )
    need(shutil.which("mosquitto_passwd") is not None, "mosquitto_passwd is missing (apt-get install mosquitto)")
    # Both runs install the same source: a copy, so that edits in the checkout meanwhile do not count.
    source = tmp_path_factory.mktemp("source")
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(REPO / "edgeagent", source / "edgeagent", ignore=shutil.ignore_patterns("__pycache__"))
    root = tmp_path_factory.mktemp("staged")
    host_before = {p: Path(p).exists() for p in HOST_PATHS}
    first = run_script(INSTALL, "--root", str(root), "--source", str(source), "--camera-lan", CAMERA_LAN)
    assert first.returncode == 0, first.stdout + first.stderr
    snap1 = snapshot(root)
    second = run_script(INSTALL, "--root", str(root), "--source", str(source))
    assert second.returncode == 0, second.stdout + second.stderr
    return Staged(
        root,
        snap1,
        snapshot(root),
        [first.stdout, second.stdout],
        host_before,
        {p: Path(p).exists() for p in HOST_PATHS},
    )


def account_ids(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    def ids(name: str) -> dict[str, int]:
        rows = [line.split(":") for line in (root / "etc" / name).read_text().splitlines()]
        return {row[0]: int(row[2]) for row in rows} | {"root": 0}

    return ids("passwd"), ids("group")


@pytest.mark.slow
def test_install_twice_gives_the_same_tree_and_leaves_the_machine_alone(staged: Staged) -> None:
    changed = sorted(
        k for k in staged.first.keys() | staged.second.keys() if staged.first.get(k) != staged.second.get(k)
    )
    assert changed == [], f"the second run changed: {changed[:20]}"
    assert len(staged.first) > 100  # the venv is in there
    for output in staged.outputs:
        assert "--root: not run: systemctl daemon-reload" in output
    assert staged.host_after == staged.host_before


@pytest.mark.slow
def test_staged_tree_has_the_files_owners_and_modes(staged: Staged) -> None:
    root = staged.root
    users, groups = account_ids(root)
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert passwd["edgeagent"][5:] == ["/var/lib/edgeagent", "/usr/sbin/nologin"]
    members = {line.split(":")[0]: line.split(":")[3] for line in (root / "etc/group").read_text().splitlines()}
    assert members["edgeagent-read"] == "edgeagent"  # readers' group: the service, and the operators you add
    expected = {
        "etc/edgeagent": (0o750, "root", "edgeagent-read"),  # status/events readers (issue 12)
        "etc/edgeagent/edgeagent.toml": (0o640, "root", "edgeagent-read"),
        "etc/edgeagent/mqtt.password": (0o600, "root", "root"),  # LoadCredential= (issue 12)
        "etc/edgeagent/simulate.password": (0o600, "root", "root"),
        "var/lib/edgeagent": (0o2750, "edgeagent", "edgeagent-read"),  # as the unit's Group=/StateDirectoryMode=
        "etc/systemd/system/edgeagent.service": (0o644, "root", "root"),
        "etc/systemd/system/mosquitto.service.d/edgeagent.conf": (0o644, "root", "root"),
        "etc/mosquitto/conf.d/edgeagent.conf": (0o644, "root", "root"),
        "etc/mosquitto/edgeagent.passwd": (0o640, "root", "mosquitto"),
        "etc/mosquitto/edgeagent.acl": (0o640, "root", "mosquitto"),
        "usr/local/sbin/edgeagent-camera-user": (0o755, "root", "root"),
        "opt/edgeagent/venv/bin/edgeagent": (0o755, "root", "root"),
        "opt/edgeagent/share/uninstall.sh": (0o755, "root", "root"),
        "opt/edgeagent/docs/deploy.md": (0o644, "root", "root"),
    }
    for rel, (mode, owner, group) in expected.items():
        st = (root / rel).stat()
        assert stat.S_IMODE(st.st_mode) == mode, f"{rel}: mode {stat.S_IMODE(st.st_mode):o}"
        if IS_ROOT:  # only root can give a staging tree its own accounts' ids
            assert (st.st_uid, st.st_gid) == (users[owner], groups[group]), rel
    assert os.readlink(root / "usr/local/bin/edgeagent") == "/opt/edgeagent/venv/bin/edgeagent"
    wants = root / "etc/systemd/system/multi-user.target.wants/edgeagent.service"
    # No merchant key in the tree yet: the unit could not start, so it is not enabled.
    assert not wants.is_symlink()
    assert (root / "etc/systemd/system/edgeagent.service").read_text() == UNIT.read_text()
    version = subprocess.run(
        [root / "opt/edgeagent/venv/bin/edgeagent", "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.stdout.strip() == f"edgeagent {__version__}"


@pytest.mark.slow
def test_installed_config_is_the_example_with_the_broker_account_filled_in(staged: Staged) -> None:
    path = staged.root / "etc/edgeagent/edgeagent.toml"
    config = parse(path.read_text(encoding="utf-8"), path, check_files=False)
    assert config.mqtt.username == "edgeagent"
    assert config.mqtt.password_file == Path("$CREDENTIALS_DIRECTORY/mqtt.password")
    assert (staged.root / "etc/edgeagent/mqtt.password").read_text().strip()
    assert config.state_dir == Path("/var/lib/edgeagent")
    assert str(config.wechatpay.merchant_private_key) == "$CREDENTIALS_DIRECTORY/apiclient_key.pem"
    differing = set(path.read_text().splitlines()) ^ set(EXAMPLE.read_text().splitlines())
    assert {line.split("=")[0].strip() for line in differing} == {"username", "password_file"}


# -- the lane broker --------------------------------------------------------------------------------


def copy_tree(staged: Staged, dest: Path) -> Path:
    """The staged tree without its venv, for a test that changes it."""
    shutil.copytree(
        staged.root, dest, symlinks=True, ignore=lambda d, names: ["venv"] if d.endswith("edgeagent") else []
    )
    return dest


def add_camera(root: Path, name: str, topic: str) -> str:
    """edgeagent-camera-user add; returns the password it printed."""
    result = run_script(CAMERA_USER, "--root", str(root), "add", name, topic, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"broker    {CAMERA_LAN}, port 1883" in result.stdout
    return re.search(r"^  password  (\S+)$", result.stdout, re.M).group(1)  # type: ignore[union-attr]


class LaneBroker:
    """Mosquitto on the staged broker files, laid out like Debian's: a main file that sets persistence
    and includes conf.d, where the staged drop-in (and any extra ones) go, ports made free."""

    def __init__(self, root: Path, directory: Path, extra: dict[str, str] | None = None) -> None:
        need(MOSQUITTO.exists(), f"{MOSQUITTO} is missing (apt-get install mosquitto)")
        self.broker = LocalBroker(directory)
        self.port = self.broker.port
        conf_d = directory / "conf.d"
        conf_d.mkdir()
        dropin = (root / "etc/mosquitto/conf.d/edgeagent.conf").read_text()
        dropin = re.sub(r"^listener 1883 ", f"listener {self.port} ", dropin, flags=re.M)
        (conf_d / "edgeagent.conf").write_text(dropin.replace("/etc/mosquitto/", f"{root}/etc/mosquitto/"))
        for name, text in (extra or {}).items():
            (conf_d / name).write_text(text)
        main = [  # Debian's /etc/mosquitto/mosquitto.conf, paths moved into the test directory
            f"pid_file {directory}/mosquitto.pid",
            "persistence true",
            f"persistence_location {directory}/",
            f"log_dest file {directory}/mosquitto.log",
            f"include_dir {conf_d}",
        ]
        if IS_ROOT:
            main.append("user root")  # the staged files belong to the staging tree's mosquitto account
        self.broker.conf.write_text("\n".join(main) + "\n")
        self.log = directory / "mosquitto.log"
        self.dropin = dropin

    def start(self) -> None:
        self.broker.start()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.broker.stop(sig)

    def reload(self) -> None:
        assert self.broker.proc is not None
        self.broker.proc.send_signal(signal.SIGHUP)


class Client:
    """A paho client that records what it receives and how its CONNECT was answered."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None,
        *,
        host: str = "127.0.0.1",
        client_id: str = "",
        clean_session: bool = True,
        ca_file: Path | None = None,
    ) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
        )
        self.client.max_inflight_messages_set(100)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file))
        self.messages: list[paho.MQTTMessage] = []
        self.answer: Any = None
        self.subacks = 0
        self.client.on_connect = lambda c, u, flags, reason, props: setattr(self, "answer", reason)
        self.client.on_message = lambda c, u, message: self.messages.append(message)
        self.client.on_subscribe = lambda c, u, mid, codes, props: setattr(self, "subacks", self.subacks + 1)
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        eventually(lambda: self.answer is not None, what=f"CONNACK for {username}")

    @property
    def accepted(self) -> bool:
        return not self.answer.is_failure

    def subscribe(self, topic: str) -> None:
        before = self.subacks
        self.client.subscribe(topic, qos=1)
        eventually(lambda: self.subacks > before, what=f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=10)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [bytes(m.payload) for m in list(self.messages) if topic is None or m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        made.append(Client(*args, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def lanes() -> Iterator[Callable[..., LaneBroker]]:
    made: list[LaneBroker] = []

    def make(*args: Any, **kwargs: Any) -> LaneBroker:
        made.append(LaneBroker(*args, **kwargs))
        return made[-1]

    yield make
    for lane in made:
        lane.stop(signal.SIGKILL)


@pytest.mark.slow
def test_lane_broker_keeps_cameras_to_their_topics_and_queues_reads_for_the_agent(
    staged: Staged, tmp_path: Path, clients: Callable[..., Client], lanes: Callable[..., LaneBroker]
) -> None:
    root = copy_tree(staged, tmp_path / "root")
    south = add_camera(root, "south-1", "anpr/south-1/plate")
    north = add_camera(root, "north-1", "anpr/north-1/plate")
    lane = lanes(root, tmp_path / "lane")
    lane.start()
    agent_password = (root / "etc/edgeagent/mqtt.password").read_text().strip()

    assert not clients(lane.port, None, None).accepted  # no anonymous access, on either listener
    assert not clients(lane.port, None, None, host=CAMERA_LAN).accepted
    assert not clients(lane.port, "south-1", "wrong", host=CAMERA_LAN).accepted

    agent = clients(lane.port, "edgeagent", agent_password, client_id="edgeagent-gate1", clean_session=False)
    assert agent.accepted
    agent.subscribe("#")
    camera = clients(lane.port, "south-1", south, host=CAMERA_LAN)
    other = clients(lane.port, "north-1", north, host=CAMERA_LAN)
    other.subscribe("#")
    eventually(lambda: camera.accepted and other.accepted)
    camera.publish("anpr/north-1/plate", b"forged read")
    camera.publish("edgeagent/edgeagent-gate1/status", b'{"state": "forged"}')
    camera.publish("anpr/south-1/plate", b"read 1")
    eventually(lambda: b"read 1" in agent.payloads(), what="the camera's read at the agent")
    # The broker handles one connection's packets in order: anything allowed before "read 1" was there.
    assert agent.payloads() == [b"read 1"]
    other.publish("anpr/north-1/plate", b"read 2")  # its PUBACK comes after anything queued to it
    eventually(lambda: b"read 2" in agent.payloads(), what="north-1's read at the agent")
    assert other.payloads() == []  # a camera reads nothing, not even the other cameras' plates

    # The agent is away: more reads than Mosquitto's default queue (1000), then a crash of the broker
    # after its autosave interval. None may be lost.
    agent.close()
    autosave = re.search(r"^autosave_interval (\d+)$", lane.dropin, re.M)
    assert autosave is not None and int(autosave.group(1)) <= 10
    reads = [f"queued {i}".encode() for i in range(1500)]
    for info in [camera.client.publish("anpr/south-1/plate", read, qos=1) for read in reads]:
        info.wait_for_publish(timeout=30)  # every read acknowledged by the broker
    time.sleep(int(autosave.group(1)) + 2)  # the interval itself is what is under test
    lane.stop(signal.SIGKILL)
    lane.start()
    back = clients(lane.port, "edgeagent", agent_password, client_id="edgeagent-gate1", clean_session=False)
    eventually(lambda: len(set(back.payloads())) == len(reads), timeout=60, what="every queued read after the crash")
    assert set(back.payloads()) == set(reads)

    removed = run_script(CAMERA_USER, "--root", str(root), "remove", "south-1", timeout=60)
    assert removed.returncode == 0, removed.stderr
    lane.reload()
    eventually(lambda: not clients(lane.port, "south-1", south, host=CAMERA_LAN).accepted, what="south-1 refused")
    assert clients(lane.port, "north-1", north, host=CAMERA_LAN).accepted


def wait_connected(config: Path, agent: Agent) -> None:
    """Until this agent process reports its MQTT session up (it subscribes right after CONNACK)."""

    def connected() -> bool:
        view = json.loads(run_cli("status", "--json", "--config", str(config)).stdout or "{}")
        daemon, mqtt = view.get("daemon") or {}, view.get("mqtt") or {}
        return bool(agent.proc and daemon.get("pid") == agent.proc.pid and mqtt.get("connected"))

    eventually(connected, timeout=20, what="the agent logged in to the lane broker")


@pytest.mark.slow
def test_uninstall_keeps_an_undelivered_journal_unless_forced(
    staged: Staged, tmp_path: Path, keys: Keys, clients: Callable[..., Client], lanes: Callable[..., LaneBroker]
) -> None:
    root = copy_tree(staged, tmp_path / "root")
    south = add_camera(root, "south-1", "anpr/south-1/plate")
    lane = lanes(root, tmp_path / "lane")
    lane.start()
    # The agent with the installer's broker account; its journal where the staged config puts it.
    config = write_config(
        tmp_path / "agent.toml",
        keys=keys,
        state_dir=root / "var/lib/edgeagent",
        mqtt_port=lane.port,
        client_id="edgeagent-gate1",
        mqtt=f'username = "edgeagent"\npassword_file = "{root}/etc/edgeagent/mqtt.password"\n',
    )
    agent = Agent(config, tmp_path / "agent.log")
    agent.start()
    try:
        wait_connected(config, agent)
        camera = clients(lane.port, "south-1", south, host=CAMERA_LAN)
        read = {"plate": "粤B12345", "color": "blue", "time": int(time.time()), "event_id": "e1"}
        camera.publish("anpr/south-1/plate", json.dumps(read, ensure_ascii=False).encode())
        eventually(lambda: len(events(config, "pending")) == 1, timeout=20, what="the read journaled, not delivered")
    finally:
        agent.kill(signal.SIGTERM)

    journal = root / "var/lib/edgeagent/journal.sqlite3"
    kept = run_script(UNINSTALL, "--root", str(root), timeout=120)
    assert kept.returncode == 0, kept.stderr
    assert "1 pending" in kept.stdout
    assert journal.exists() and (root / "etc/edgeagent/edgeagent.toml").exists()
    assert (root / "etc/mosquitto/edgeagent.passwd").exists()
    for gone in (
        "opt/edgeagent",
        "usr/local/bin/edgeagent",
        "usr/local/sbin/edgeagent-camera-user",
        "etc/systemd/system/edgeagent.service",
        "etc/systemd/system/multi-user.target.wants/edgeagent.service",
        "etc/systemd/system/mosquitto.service.d/edgeagent.conf",
        "etc/mosquitto/conf.d/edgeagent.conf",
    ):
        assert not (root / gone).is_symlink() and not (root / gone).exists(), gone

    refused = run_script(UNINSTALL, "--root", str(root), "--purge", timeout=120)
    assert refused.returncode != 0
    assert "1 pending" in refused.stderr and "--force" in refused.stderr
    assert journal.exists()

    purged = run_script(UNINSTALL, "--root", str(root), "--purge", "--force", timeout=120)
    assert purged.returncode == 0, purged.stderr
    for gone in ("var/lib/edgeagent", "etc/edgeagent", "etc/mosquitto/edgeagent.passwd", "etc/mosquitto/edgeagent.acl"):
        assert not (root / gone).exists(), gone
    assert "edgeagent" not in account_ids(root)[0]
    assert "edgeagent-read" not in account_ids(root)[1]


# -- the readers' group (issue 12) --------------------------------------------------------------------

READER_SNIPPET = """
import json, sys
result = {}
for path in sys.argv[1:]:
    try:
        open(path, "rb").read(1)
        result[path] = "read"
    except OSError as exc:
        result[path] = type(exc).__name__
print(json.dumps(result))
"""


def as_user(
    args: list[str], uid: int, gid: int, groups: list[int], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ARGS as uid:gid with exactly these supplementary groups (setgroups), as a login would."""
    return subprocess.run(
        args,
        user=uid,
        group=gid,
        extra_groups=groups,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def systemd_state_directory(path: Path, uid: int, gid: int, mode: int) -> None:
    """What systemd does to a StateDirectory= before each start (setup_exec_directory() in v252):
    chmod to StateDirectoryMode=, then chown the tree to User:Group, recursively unless the directory
    is already theirs. A group of our own that the unit's Group= does not name is undone here."""
    path.chmod(mode)
    st = path.stat()
    if (st.st_uid, st.st_gid) != (uid, gid):
        for item in [path, *path.rglob("*")]:
            os.chown(item, uid, gid, follow_symlinks=False)


@pytest.fixture
def public_copy(staged: Staged) -> Iterator[Path]:
    """The staged tree with owners and modes kept (cp -a), somewhere other users can reach: pytest's
    temporary directories are root's only."""
    need(IS_ROOT, "needs root: the staged tree's owners and other users' access are what is under test")
    top = Path(tempfile.mkdtemp(prefix="edgeagent-readers-"))
    subprocess.run(["cp", "-a", f"{staged.root}/.", str(top)], check=True)
    top.chmod(0o755)  # after the copy: cp -a gives it the staging root's mode
    try:
        yield top
    finally:
        shutil.rmtree(top)


@pytest.mark.slow
def test_an_operator_in_edgeagent_read_runs_status_and_events_but_reads_no_secret(
    public_copy: Path, tmp_path: Path, keys: Keys, lanes: Callable[..., LaneBroker], clients: Callable[..., Client]
) -> None:
    """The service runs as the unit says (User=edgeagent, Group=edgeagent-read, SupplementaryGroups=
    edgeagent, UMask=0027, its secrets in $CREDENTIALS_DIRECTORY) on the staged files; an operator whose
    only group is edgeagent-read runs `status` and `events` and can open no secret; anyone else gets
    nothing. Before: the journal and config were the service's group's, which operators had to join."""
    root = public_copy
    users, groups = account_ids(root)
    unit = unit_settings()
    service_uid, service_gid = users[unit["User"][0]], groups[unit["Group"][0]]
    service_groups = [groups[name] for line in unit.get("SupplementaryGroups", []) for name in line.split()]
    readers = groups["edgeagent-read"]  # docs/deploy.md: operators join this group
    # Two throwaway ids that are nobody on this machine or in the staged tree.
    taken = {
        int(line.split(":")[2])
        for path in ("/etc/passwd", "/etc/group")
        for line in Path(path).read_text().splitlines()
    }
    taken |= {*users.values(), *groups.values()}
    operator, other = [uid for uid in range(64100, 64200) if uid not in taken][:2]
    etc, state = root / "etc/edgeagent", root / "var/lib/edgeagent"
    python = str(root / "opt/edgeagent/venv/bin/python")

    # What the admin adds (docs/deploy.md): the merchant key root:root 0600, a public key the service
    # reads through its own group; what systemd's LoadCredential= hands the service, readable by it only.
    shutil.copy(keys.merchant_key, etc / "apiclient_key.pem")
    os.chown(etc / "apiclient_key.pem", 0, 0)
    (etc / "apiclient_key.pem").chmod(0o600)
    shutil.copy(keys.platform_pub, etc / "wechatpay_pub.pem")
    os.chown(etc / "wechatpay_pub.pem", 0, groups["edgeagent"])
    (etc / "wechatpay_pub.pem").chmod(0o640)
    credentials = root / "run/credentials/edgeagent.service"
    credentials.mkdir(parents=True)
    for name in ("apiclient_key.pem", "mqtt.password"):
        shutil.copy(etc / name, credentials / name)
        os.chown(credentials / name, service_uid, service_gid)
        (credentials / name).chmod(0o400)
    os.chown(credentials, service_uid, service_gid)
    credentials.chmod(0o500)

    south = add_camera(root, "south-1", "anpr/south-1/plate")
    lane = lanes(root, tmp_path / "lane")
    lane.start()
    config = etc / "edgeagent.toml"
    installed = config.read_text()
    write_config(  # over the installed file: its owner and mode stay the installer's
        config,
        keys=keys,
        state_dir=state,
        mqtt_port=lane.port,
        client_id="edgeagent-gate1",
        mqtt='username = "edgeagent"\npassword_file = "$CREDENTIALS_DIRECTORY/mqtt.password"\n',
    )
    text = config.read_text().replace(str(keys.merchant_key), "$CREDENTIALS_DIRECTORY/apiclient_key.pem")
    config.write_text(text.replace(str(keys.platform_pub), str(etc / "wechatpay_pub.pem")))
    assert 'password_file = "$CREDENTIALS_DIRECTORY/mqtt.password"' in installed
    st = config.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, readers, 0o640)

    systemd_state_directory(state, service_uid, service_gid, int(unit["StateDirectoryMode"][0], 8))
    log = (tmp_path / "agent.log").open("wb")
    service = subprocess.Popen(
        [python, "-m", "edgeagent", "run", "--config", str(config)],
        user=service_uid,
        group=service_gid,
        extra_groups=service_groups,
        umask=int(unit["UMask"][0], 8),
        cwd="/",
        env={
            "PATH": "/usr/bin:/bin",
            "CREDENTIALS_DIRECTORY": str(credentials),
            "INVOCATION_ID": "0" * 32,  # "under systemd": the unit's UMask=, not the hand-started 077
            "EDGEAGENT_CLOCK_SYNCED": "1",
        },
        stdout=log,
        stderr=log,
    )
    try:
        camera = clients(lane.port, "south-1", south, host=CAMERA_LAN)

        def operator_sees(command: str) -> subprocess.CompletedProcess[str]:
            return as_user(
                [python, "-m", "edgeagent", command, "--json", "--config", str(config)], operator, readers, []
            )

        def journaled() -> list[dict[str, Any]]:
            result = operator_sees("events")
            return [r for r in json.loads(result.stdout or "[]") if r.get("plate_number") == "粤B12345"]

        def connected() -> bool:
            view = json.loads(operator_sees("status").stdout or "{}")
            return bool((view.get("daemon") or {}).get("running") and (view.get("mqtt") or {}).get("connected"))

        eventually(connected, timeout=30, what="the operator's status showing the service connected")
        read = {"plate": "粤B12345", "color": "blue", "time": int(time.time()), "event_id": "r1"}
        camera.publish("anpr/south-1/plate", json.dumps(read, ensure_ascii=False).encode())
        eventually(journaled, timeout=30, what="the read in the operator's `edgeagent events`")
        status = operator_sees("status")
        assert status.returncode in (0, 1), status.stderr  # ok or degraded (nothing delivers here)
        view = json.loads(status.stdout)
        assert view["daemon"]["pid"] == service.pid and view["queue"]["pending"] == 1

        # The daemon's files: the readers' group may read them, nobody but the service may write them.
        for path in [state, *state.iterdir()]:
            st = path.stat()
            assert (st.st_uid, st.st_gid) == (service_uid, readers), path.name
            assert stat.S_IMODE(st.st_mode) & 0o027 == 0, f"{path.name}: {stat.S_IMODE(st.st_mode):o}"

        # No secret, and nothing the service keeps to its own group.
        secrets = [etc / name for name in ("mqtt.password", "simulate.password", "apiclient_key.pem")]
        private = [*secrets, etc / "wechatpay_pub.pem", credentials / "apiclient_key.pem"]
        tried = as_user([python, "-c", READER_SNIPPET, *map(str, private)], operator, readers, [])
        assert json.loads(tried.stdout) == {str(p): "PermissionError" for p in private}, tried.stderr
        # The service itself reads what it needs and no more than root gives it.
        tried = as_user([python, "-c", READER_SNIPPET, *map(str, secrets)], service_uid, service_gid, service_groups)
        assert set(json.loads(tried.stdout).values()) == {"PermissionError"}, tried.stderr

        # Anyone not in edgeagent-read: neither the config nor the journal.
        for command in ("status", "events"):
            refused = as_user([python, "-m", "edgeagent", command, "--config", str(config)], other, other, [])
            assert refused.returncode != 0 and "Permission denied" in refused.stdout + refused.stderr, command
        tried = as_user([python, "-c", READER_SNIPPET, str(state / "journal.sqlite3")], other, other, [])
        assert json.loads(tried.stdout) == {str(state / "journal.sqlite3"): "PermissionError"}
    finally:
        service.terminate()
        service.wait(timeout=30)
        log.close()


# -- fleet status over the bridge -------------------------------------------------------------------


def tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    directory.mkdir()
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "central test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "central")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.crt", directory / "central.crt", directory / "central.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def central_broker(directory: Path, ca: Path, cert: Path, key: Path, accounts: dict[str, str]) -> LocalBroker:
    """A central broker: TLS only, password accounts, like the one the fleet bridge connects to."""
    broker = LocalBroker(directory)
    passwd = directory / "passwd"
    for i, (user, password) in enumerate(accounts.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", passwd, user, password], check=True)
    lines = [
        f"listener {broker.port} 127.0.0.1",
        f"cafile {ca}",
        f"certfile {cert}",
        f"keyfile {key}",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"log_dest file {directory}/mosquitto.log",
    ]
    if IS_ROOT:
        lines.append("user root")
    broker.conf.write_text("\n".join(lines) + "\n")
    return broker


@pytest.mark.slow
def test_fleet_status_reaches_the_central_broker_through_the_bridge_snippet(
    staged: Staged, tmp_path: Path, keys: Keys, clients: Callable[..., Client], lanes: Callable[..., LaneBroker]
) -> None:
    need(shutil.which("mosquitto_passwd") is not None, "mosquitto_passwd is missing (apt-get install mosquitto)")
    ca, cert, key = tls_material(tmp_path / "tls")
    central = central_broker(tmp_path / "central", ca, cert, key, {"WXPARK001": "lot-secret", "ops": "ops-secret"})
    central.start()
    try:
        # The snippet as docs/deploy.md says to fill it in; nothing else changed.
        bridge = (
            BRIDGE.read_text()
            .replace("CENTRAL_HOST:8883", f"127.0.0.1:{central.port}")
            .replace("/etc/mosquitto/certs/central-ca.crt", str(ca))
            .replace("CENTRAL_USERNAME", "WXPARK001")
            .replace("CENTRAL_PASSWORD", "lot-secret")
            .replace("LOT_ID", "WXPARK001")
            .replace("BOX_ID", "gate1")
        )
        settings = [line for line in bridge.splitlines() if line and not line.startswith("#")]
        assert [line for line in settings if re.search(r"\b[A-Z]+_[A-Z]+\b", line)] == []
        root = copy_tree(staged, tmp_path / "root")
        lane = lanes(root, tmp_path / "lane", extra={"bridge-central.conf": bridge})
        lane.start()

        ops = clients(central.port, "ops", "ops-secret", ca_file=ca)
        assert ops.accepted
        ops.subscribe("lots/#")
        config = write_config(
            tmp_path / "agent.toml",
            keys=keys,
            state_dir=tmp_path / "state",
            mqtt_port=lane.port,
            client_id="edgeagent-gate1",
            mqtt=f'username = "edgeagent"\npassword_file = "{root}/etc/edgeagent/mqtt.password"\n',
        )
        agent = Agent(config, tmp_path / "agent.log")
        agent.start()
        topic = "lots/WXPARK001/edgeagent/edgeagent-gate1/status"
        try:
            eventually(
                lambda: any(json.loads(p)["state"] in ("ok", "degraded") for p in ops.payloads(topic)),
                timeout=30,
                what=f"the agent's status on {topic}",
            )
            eventually(lambda: ops.payloads("lots/WXPARK001/bridge/gate1/state")[-1:] == [b"1"], what="bridge up")
            # A dashboard that connects later still gets the latest status: it is retained centrally.
            late = clients(central.port, "ops", "ops-secret", ca_file=ca)
            late.subscribe(topic)
            eventually(lambda: late.messages, what="the retained status")
            assert late.messages[0].retain
            assert json.loads(late.messages[0].payload)["queue"]["pending"] == 0
        finally:
            agent.kill(signal.SIGKILL)
        eventually(
            lambda: any(json.loads(p)["state"] == "offline" for p in ops.payloads(topic)),
            timeout=30,
            what="the agent's last will, offline, at the central broker",
        )
        lane.stop(signal.SIGKILL)
        eventually(
            lambda: ops.payloads("lots/WXPARK001/bridge/gate1/state")[-1:] == [b"0"],
            timeout=30,
            what="the bridge's will: the central broker lost the box",
        )
    finally:
        central.stop(signal.SIGKILL)


# -- one lot, several boxes: install.sh --lot-topic / --hub (SPEC §11) -----------------------------------

LOT = "lots/WXPARK001/sessions"
LOT_BLOCK = "# >>> lot (install.sh --lot-topic)"


def lot_settings(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_lot_options_set_the_topic_the_agents_acl_and_a_private_bridge(staged: Staged, tmp_path: Path) -> None:
    root = copy_tree(staged, tmp_path / "root")
    config_path = root / "etc/edgeagent/edgeagent.toml"
    config_path.write_text(config_path.read_text() + "# my own note\n")  # an operator's edit stays
    before = config_path.read_text()
    ca, _, _ = tls_material(tmp_path / "tls")
    secret = tmp_path / "hub.password"
    secret.write_text("hub-s3cret&|\\/\n")  # characters sed, awk and bash 5.2 substitution treat specially
    secret.chmod(0o600)
    first = run_script(INSTALL, "--root", str(root), "--lot-topic", LOT, "--hub", "127.0.0.1",
                       "--hub-password-file", str(secret), "--hub-ca", str(ca))  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"lot: {LOT}/# bridged to 127.0.0.1:8883 as P1G1" in first.stdout
    assert "hub-s3cret" not in first.stdout + first.stderr

    # The config: [lot] topic set in place, everything else as it was.
    config = parse(config_path.read_text(encoding="utf-8"), config_path, check_files=False)
    assert config.lot.topic == LOT
    changed = set(config_path.read_text().splitlines()) ^ set(before.splitlines())
    assert changed == {'topic = ""', f'topic = "{LOT}"'}
    # The agent's account may write the lot topic on its own broker.
    acl = (root / "etc/mosquitto/edgeagent.acl").read_text()
    assert acl.count(LOT_BLOCK) == 1
    assert f"{LOT_BLOCK}\n# The agent publishes" in acl and f"user edgeagent\ntopic write {LOT}/#\n# <<< lot\n" in acl
    # The bridge: the shipped file filled in, private, with the password from the file, the CA in place.
    bridge = root / "etc/mosquitto/conf.d/bridge-lot.conf"
    shipped = REPO / "deploy/mosquitto/bridge-lot.conf"
    expected = [
        line.replace("LOT_TOPIC", LOT).replace("HUB_ADDRESS", "127.0.0.1:8883").replace("BOX_ID", "P1G1")
        .replace("HUB_PASSWORD", "hub-s3cret&|\\/")
        for line in lot_settings(shipped)
    ]  # fmt: skip
    assert lot_settings(bridge) == expected
    assert [line for line in bridge.read_text().splitlines() if line.startswith("#")] == [
        line for line in shipped.read_text().splitlines() if line.startswith("#")
    ]
    users, groups = account_ids(root)
    for rel, mode, owner, group in (
        ("etc/mosquitto/conf.d/bridge-lot.conf", 0o640, "root", "mosquitto"),
        ("etc/edgeagent/hub.password", 0o600, "root", "root"),
        ("etc/mosquitto/certs/lot-hub-ca.crt", 0o644, "root", "root"),
    ):
        st = (root / rel).stat()
        assert stat.S_IMODE(st.st_mode) == mode, rel
        if IS_ROOT:
            assert (st.st_uid, st.st_gid) == (users[owner], groups[group]), rel
    assert (root / "etc/mosquitto/certs/lot-hub-ca.crt").read_bytes() == ca.read_bytes()
    for name in ("bridge-lot.conf", "hub-lot.conf", "lot-hub.acl.example"):
        assert (root / "opt/edgeagent/share/mosquitto" / name).read_text() == (
            REPO / "deploy/mosquitto" / name
        ).read_text()

    # Again without options: nothing changes (the hub, account, password and CA are kept).
    tree = snapshot(root)
    again = run_script(INSTALL, "--root", str(root))
    assert again.returncode == 0, again.stdout + again.stderr
    assert snapshot(root) == tree

    # Another lot topic: the config line, the one ACL block and the bridge follow it.
    moved = run_script(INSTALL, "--root", str(root), "--lot-topic", "lots/WXPARK002/sessions")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert parse(config_path.read_text(), config_path, check_files=False).lot.topic == "lots/WXPARK002/sessions"
    acl = (root / "etc/mosquitto/edgeagent.acl").read_text()
    assert acl.count(LOT_BLOCK) == 1 and "topic write lots/WXPARK002/sessions/#" in acl and LOT not in acl
    assert "topic lots/WXPARK002/sessions/# both 1" in lot_settings(bridge)

    removed = run_script(UNINSTALL, "--root", str(root), timeout=120)
    assert removed.returncode == 0, removed.stderr
    assert not bridge.exists()
    assert (root / "etc/edgeagent/hub.password").exists()  # with the rest of /etc/edgeagent


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--lot-topic", "lots/+/sessions"], "--lot-topic lots/+/sessions: give a topic name"),
        (["--lot-topic", "lots/WXPARK001/"], "no wildcards, no leading or trailing /"),
        (["--lot-topic", "$SYS/x"], "--lot-topic $SYS/x"),
        (["--hub", "hub.example.com:88a"], "--hub hub.example.com:88a: give HOST or HOST:PORT"),
        (["--hub-password", "secret"], "a password on the command line is visible in ps"),
        (["--hub-ca", "/nonexistent/ca.crt", "--hub", "h"], "/nonexistent/ca.crt: not found"),
        (["--hub-user", "P1G2"], "go with --hub HOST[:PORT]"),
    ],
)
def test_lot_options_refused_before_anything_is_installed(tmp_path: Path, args: list[str], complaint: str) -> None:
    result = run_script(INSTALL, "--root", str(tmp_path / "root"), *args, timeout=60)
    assert result.returncode != 0
    assert complaint in result.stderr
    assert not (tmp_path / "root/opt").exists()


@pytest.mark.slow
def test_hub_without_a_password_is_refused(staged: Staged, tmp_path: Path) -> None:
    root = copy_tree(staged, tmp_path / "root")
    ca, _, _ = tls_material(tmp_path / "tls")
    result = run_script(INSTALL, "--root", str(root), "--lot-topic", LOT, "--hub", "hub.lot", "--hub-ca", str(ca))
    assert result.returncode != 0
    assert "no password for the hub account P1G1: --hub-password-file FILE" in result.stderr
    assert not (root / "etc/mosquitto/conf.d/bridge-lot.conf").exists()


# -- the real install, in a throwaway overlay ---------------------------------------------------------

OVERLAY = """set -e
for d in etc opt var usr; do
    mkdir -p "$OVL/$d/upper" "$OVL/$d/work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$OVL/$d/upper,workdir=$OVL/$d/work" "/$d"
done
set +e
"""


@pytest.mark.slow
def test_real_install_upgrade_and_uninstall_in_a_throwaway_overlay(tmp_path: Path) -> None:
    """install.sh as root without --root, on this machine's own /etc, /opt, /var and /usr, except that
    a private mount namespace lays a throwaway overlay over them: useradd, chown by name, the venv
    from /usr/bin/python3, `systemctl enable` without a running systemd (as in a container)."""
    need(IS_ROOT, "the real install needs root")
    need(shutil.which("unshare") is not None, "unshare is missing (util-linux)")
    overlays = tmp_path / "overlay"

    def box(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", OVERLAY + command],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "OVL": str(overlays)},
        )

    probe = box("true")
    need(probe.returncode == 0, f"no private mount namespace with overlayfs here: {probe.stderr.strip()}")
    need(not Path("/run/systemd/system").exists(), "systemd runs here: a real install would start services")
    host_before = {p: Path(p).exists() for p in HOST_PATHS}

    first = box(f"bash {INSTALL} --camera-lan 192.0.2.10")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "systemd is not running here" in first.stdout
    stock = re.search(
        r"^include_dir\s+/etc/mosquitto/conf\.d/?\s*$", Path("/etc/mosquitto/mosquitto.conf").read_text(), re.M
    )
    assert ("has no 'include_dir /etc/mosquitto/conf.d' line" in first.stdout) == (stock is None)

    facts = box(
        "getent passwd edgeagent; stat -c '%n %U:%G %a' /etc/edgeagent /etc/edgeagent/edgeagent.toml"
        " /etc/edgeagent/mqtt.password /var/lib/edgeagent /etc/mosquitto/edgeagent.passwd"
        " /etc/mosquitto/edgeagent.acl; readlink /etc/systemd/system/multi-user.target.wants/edgeagent.service;"
        " edgeagent --version; id -nG edgeagent"
    )
    lines = facts.stdout.splitlines()
    assert lines[0].startswith("edgeagent:x:") and lines[0].endswith(":/var/lib/edgeagent:/usr/sbin/nologin")
    assert lines[1:7] == [
        "/etc/edgeagent root:edgeagent-read 750",  # the readers' group (issue 12)
        "/etc/edgeagent/edgeagent.toml root:edgeagent-read 640",
        "/etc/edgeagent/mqtt.password root:root 600",
        "/var/lib/edgeagent edgeagent:edgeagent-read 2750",
        "/etc/mosquitto/edgeagent.passwd root:mosquitto 640",
        "/etc/mosquitto/edgeagent.acl root:mosquitto 640",
    ]
    # Not enabled (no readlink line): the merchant key is not there yet, so the unit could not start.
    assert "NOT enabled: the unit needs /etc/edgeagent/apiclient_key.pem" in first.stdout
    assert lines[7:8] == [f"edgeagent {__version__}"]
    assert sorted(lines[8].split()) == ["edgeagent", "edgeagent-read"]
    assert "usermod -aG edgeagent-read" in first.stdout

    # An upgrade keeps an edited config as it is, and an edited broker drop-in with the new one beside it.
    edit = box("echo '# mine' >> /etc/edgeagent/edgeagent.toml; echo '# mine' >> /etc/mosquitto/conf.d/edgeagent.conf")
    assert edit.returncode == 0, edit.stderr
    # A journal from before issue 12 is the service group's; the upgrade hands it to the readers.
    old = box("install -o edgeagent -g edgeagent -m 0640 /dev/null /var/lib/edgeagent/daemon.json")
    assert old.returncode == 0, old.stderr
    second = box(f"bash {INSTALL}")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "kept your edited /etc/mosquitto/conf.d/edgeagent.conf" in second.stdout
    after = box("tail -n1 /etc/edgeagent/edgeagent.toml /etc/mosquitto/conf.d/edgeagent.conf;"
                " stat -c '%U:%G %a' /var/lib/edgeagent/daemon.json;"
                " grep -c '^listener 1883 192.0.2.10$' /etc/mosquitto/conf.d/edgeagent.conf.dist")  # fmt: skip
    assert after.stdout.count("# mine") == 2
    assert "edgeagent:edgeagent-read 640" in after.stdout.splitlines()
    assert after.stdout.splitlines()[-1] == "1"  # the camera-LAN address carried into the new version

    removed = box(f"bash {UNINSTALL}; ls -d /etc/edgeagent /var/lib/edgeagent /opt/edgeagent; getent passwd edgeagent")
    assert "kept /etc/edgeagent" in removed.stdout
    assert "/etc/edgeagent\n/var/lib/edgeagent\n" in removed.stdout
    assert "No such file or directory" in removed.stderr  # /opt/edgeagent
    assert "edgeagent:x:" in removed.stdout  # the account stays with the files it owns

    purged = box(
        f"bash {UNINSTALL} --purge; getent group edgeagent-read || echo no-group;"
        " getent passwd edgeagent || echo no-user; ls -d /etc/edgeagent || true"
    )
    assert purged.stdout.splitlines()[-2:] == ["no-group", "no-user"], purged.stdout + purged.stderr
    assert "cannot access '/etc/edgeagent'" in purged.stderr
    assert {p: Path(p).exists() for p in HOST_PATHS} == host_before
