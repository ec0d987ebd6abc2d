"""The unit, the installer and the agent on a real systemd 252 (Debian bookworm, booted in nspawn).

One box per session, and these tests are steps of one technician's day, in order: a first install
(without an index, then without the merchant key), commissioning against `edgeagent sandbox` inside
the box, the service under systemd (READY, credentials, sandboxing, kill -9, the watchdog), operators,
an upgrade over a running install with undelivered entries, and the way back out. A failed step
usually fails the ones after it; read the first failure.

Everything about the unit is read from the unit in the tree (its LoadCredential= lines, its hardening),
so a change to the unit is tested as it is.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from typing import Any

from tests.system.box import REPO, Box
from tests.system.conftest import IN_BOX_CHECKOUT, IN_BOX_WHEELS, wait_for
from tests.system.lockfile import LOCK, parse

UNIT_TEXT = (REPO / "systemd" / "edgeagent.service").read_text()
INSTALL = f"{IN_BOX_CHECKOUT}/deploy/install.sh"
WHEELS = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": IN_BOX_WHEELS}  # no network in the box: the locked wheels
SANDBOX = "/srv/wxsandbox"
CAMERA = "south-1"  # the example config's camera


def directives(text: str) -> dict[str, list[str]]:
    """[Service] key → every value given, in order (a bare `Key=` resets)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = [*found.get(key.strip(), []), value.strip()] if value.strip() else []
    return found


SERVICE = directives(UNIT_TEXT)
CREDENTIALS = [v.split(":", 1) for v in SERVICE.get("LoadCredential", [])]  # [[id, source], ...]


def show(box: Box, *props: str) -> dict[str, str]:
    out = box.out(f"systemctl show edgeagent -p {','.join(props)}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal_since(box: Box, cursor: str) -> str:
    return box.out(f"journalctl --no-pager -o cat --after-cursor={shlex.quote(cursor)}", check=False)


def cursor(box: Box) -> str:
    out = box.out("journalctl -n 0 --show-cursor --no-pager", check=False)
    return out.rsplit("-- cursor: ", 1)[-1].strip()


def status_json(box: Box, user: str = "root") -> dict[str, Any]:
    done = box.run(f"runuser -u {user} -- edgeagent status --json", check=False)
    assert done.stdout.strip(), f"edgeagent status --json as {user}: {done.returncode} {done.stderr}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def events(box: Box, state: str | None = None) -> list[dict[str, Any]]:
    arg = f" --state {state}" if state else ""
    return json.loads(box.out(f"edgeagent events --json --limit 500{arg}"))  # type: ignore[no-any-return]


def publish(box: Box, plate: str) -> None:
    box.run(f"edgeagent simulate --camera {CAMERA} --plate {shlex.quote(plate)} --color blue")


def delivered(box: Box, plate: str) -> bool:
    return any(row["plate_number"] == plate for row in events(box, "sent"))


def ready(box: Box) -> dict[str, str]:
    """Wait until the unit is active (READY=1 arrived) with a heartbeat-fed StatusText."""

    def check() -> dict[str, str] | None:
        s = show(box, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
        return s if s["ActiveState"] == "active" and s["StatusText"].startswith(("ok:", "degraded:")) else None

    return wait_for(check, 60, "edgeagent active with StatusText ok:/degraded:")


# -- 1. a first install ------------------------------------------------------------------------------


def test_without_a_package_index_the_installer_says_so_and_installs_no_compiler(box: Box) -> None:
    done = box.run(f"{INSTALL} --no-start", check=False, env={"PIP_NO_INDEX": "1"})
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "no package index" in out and "requirements.lock" in out, out
    assert "compiler" not in out, out
    assert box.run("dpkg -s build-essential", check=False).returncode != 0


def test_first_install_without_the_merchant_key_is_not_enabled(box: Box) -> None:
    done = box.run(INSTALL, env=WHEELS)
    missing = [source for _, source in CREDENTIALS if box.run(f"test -e {source}", check=False).returncode]
    assert missing, "the first install should lack at least the merchant key"
    assert "NOT enabled" in done.stdout and all(m in done.stdout for m in missing), done.stdout
    assert box.out("systemctl is-enabled edgeagent", check=False) == "disabled"


def test_a_missing_credential_stops_the_unit_with_its_name_instead_of_a_restart_loop(box: Box) -> None:
    missing = [source for _, source in CREDENTIALS if box.run(f"test -e {source}", check=False).returncode]
    mark = cursor(box)
    box.run("systemctl start edgeagent", check=False)
    restart_s = float(SERVICE.get("RestartSec", ["0.1"])[-1])
    time.sleep(3 * restart_s + 2)  # long enough for two restarts, if it restarted
    s = show(box, "ActiveState", "NRestarts", "Result")
    log = journal_since(box, mark)
    assert s["NRestarts"] == "0" and s["ActiveState"] in ("inactive", "failed"), f"{s}\n{log}"
    for source in missing:
        assert source in log, f"the journal does not name {source}:\n{log}"
        print(f"journal: {next(line for line in log.splitlines() if source in line)}")
    status = box.run("edgeagent status", check=False).stdout
    assert all(f"{source} is missing" in status for source in missing), status


# -- 2. commissioning against the sandbox ----------------------------------------------------------

COMMISSION = r"""
import re, sys, tomllib
fragment = tomllib.load(open(sys.argv[1], "rb"))["wechatpay"]
want = {"mchid": fragment["mchid"], "merchant_serial_no": fragment["merchant_serial_no"],
        "platform_public_key": "/etc/edgeagent/wechatpay_pub.pem",
        "platform_public_key_id": fragment["platform_public_key_id"], "base_url": fragment["base_url"],
        "backup_base_url": "", "ca_file": "/etc/edgeagent/sandbox-ca.pem"}
path = sys.argv[2]
section, lines = "", []
for line in open(path, encoding="utf-8").read().splitlines():
    head = re.match(r"^\[+([^\]]+)\]+", line)
    section = head.group(1) if head else section
    key = re.match(r"^(\w+)\s*=", line)
    if section == "wechatpay" and key and key.group(1) in want:
        line = f'{key.group(1)} = "{want[key.group(1)]}"'
    lines.append(line)
open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")
"""


def start_sandbox(box: Box) -> None:
    box.run(
        "systemctl is-active -q wxsandbox || systemd-run -q --unit=wxsandbox"
        f" /opt/edgeagent/venv/bin/edgeagent sandbox --dir {SANDBOX} --port 8443"
    )
    wait_for(lambda: box.run("exec 3<>/dev/tcp/127.0.0.1/8443", check=False).returncode == 0, 30, "sandbox on :8443")


def test_commissioned_install_starts_and_reaches_ready(box: Box) -> None:
    start_sandbox(box)
    box.run(f"""
        install -m 0600 -o root -g root {SANDBOX}/apiclient_key.pem /etc/edgeagent/apiclient_key.pem
        install -m 0640 -o root -g edgeagent {SANDBOX}/wechatpay_pub.pem /etc/edgeagent/wechatpay_pub.pem
        install -m 0640 -o root -g edgeagent {SANDBOX}/ca.pem /etc/edgeagent/sandbox-ca.pem
        python3 -c {shlex.quote(COMMISSION)} {SANDBOX}/edgeagent-wechatpay.toml /etc/edgeagent/edgeagent.toml
        edgeagent-camera-user add {CAMERA} anpr/{CAMERA}/plate >/dev/null
        touch /run/systemd/timesync/synchronized 2>/dev/null || true
    """)
    done = box.run(INSTALL, env=WHEELS)
    assert "(re)started" in done.stdout, done.stdout
    assert box.out("systemctl is-enabled edgeagent") == "enabled"
    s = ready(box)
    assert s["SubState"] == "running"
    wait_for(lambda: show(box, "StatusText")["StatusText"] == "ok: all good", 60, "StatusText ok: all good")


def test_a_read_is_delivered(box: Box) -> None:
    publish(box, "粤B10001")
    wait_for(lambda: delivered(box, "粤B10001"), 30, "粤B10001 sent")


# -- 3. the service as the unit declares it ---------------------------------------------------------


def test_load_credential_hands_the_service_each_secret(box: Box) -> None:
    assert CREDENTIALS, "the unit has no LoadCredential="
    pid = show(box, "MainPID")["MainPID"]
    user = SERVICE["User"][-1]
    for cred_id, source in CREDENTIALS:
        # The service's copy: readable by the service user only; the source stays root's.
        copy = box.out(f"stat -c '%U %a' /run/credentials/edgeagent.service/{cred_id}")
        assert copy in (f"{user} 400", "root 400"), f"{cred_id}: {copy}"
        assert box.out(f"stat -c '%U' {source}") == "root"
        assert box.out(f"cmp /run/credentials/edgeagent.service/{cred_id} {source} && echo same") == "same"
    environ = box.out(f"tr '\\0' '\\n' < /proc/{pid}/environ")
    assert "CREDENTIALS_DIRECTORY=/run/credentials/edgeagent.service" in environ


# systemd's name and value for each hardening directive the unit may declare (`systemctl show` prints
# them back once systemd 252 has understood them; an unknown or misspelt one is dropped with a warning).
SHOWN_AS_IS = (
    "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "PrivateUsers", "PrivateNetwork", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectHostname", "ProtectClock", "ProtectProc", "ProcSubset", "RestrictRealtime",
    "RestrictSUIDSGID", "RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute", "RemoveIPC",
    "UMask", "Type", "User", "Group",
)  # fmt: skip
BOOLEAN = {"yes": "yes", "true": "yes", "on": "yes", "1": "yes", "no": "no", "false": "no", "off": "no", "0": "no"}


def test_systemd_understood_every_directive_and_enforces_the_sandbox(box: Box) -> None:
    log = box.out("journalctl --no-pager -o cat -u edgeagent -u init.scope", check=False)
    complaints = [line for line in log.splitlines() if "edgeagent.service:" in line and re.search(
        r"Unknown (key|lvalue)|Failed to parse|ignoring|Unknown section", line)]  # fmt: skip
    assert not complaints, "\n".join(complaints)
    declared = {k: v[-1] for k, v in SERVICE.items() if k in SHOWN_AS_IS and v}
    props = show(box, *declared)
    for key, value in declared.items():
        got = props.get(key)
        assert BOOLEAN.get(got or "", got) == BOOLEAN.get(value, value), f"{key}={value} in the unit, {got} running"
    pid = show(box, "MainPID")["MainPID"]
    proc = dict(line.split(":", 1) for line in box.out(f"cat /proc/{pid}/status").splitlines() if ":" in line)
    assert proc["Uid"].split()[0] != "0", "the agent runs as root"
    if SERVICE.get("NoNewPrivileges", ["no"])[-1] in ("yes", "true"):
        assert proc["NoNewPrivs"].strip() == "1"
    if "SystemCallFilter" in SERVICE:
        assert proc["Seccomp"].strip() == "2"
    assert int(proc["CapEff"], 16) == 0, f"effective capabilities {proc['CapEff']}"
    if SERVICE.get("CapabilityBoundingSet") == []:
        assert int(proc["CapBnd"], 16) == 0
    if SERVICE.get("PrivateUsers", ["no"])[-1] in ("yes", "true"):
        uid_map = box.out(f"cat /proc/{pid}/uid_map").split()
        assert uid_map[:3] != ["0", "0", "4294967295"], "PrivateUsers=yes but the agent sees the host's users"
    if SERVICE.get("PrivateTmp", ["no"])[-1] in ("yes", "true"):
        assert box.out(f"readlink /proc/{pid}/ns/mnt") != box.out("readlink /proc/1/ns/mnt")
    # …and it still works under all of it: signs (cffi), writes the journal, talks to broker and API.
    publish(box, "粤B10002")
    wait_for(lambda: delivered(box, "粤B10002"), 30, "粤B10002 sent under the sandbox")
    exposure = box.out("systemd-analyze security edgeagent --no-pager | tail -1", check=False)
    print(f"systemd-analyze security (live): {exposure}")


def test_kill_9_is_restarted_to_ready(box: Box) -> None:
    before = show(box, "MainPID", "NRestarts")
    box.run(f"kill -9 {before['MainPID']}")

    def restarted() -> dict[str, str] | None:
        s = show(box, "MainPID", "NRestarts", "ActiveState")
        return s if s["MainPID"] not in ("0", before["MainPID"]) and s["ActiveState"] == "active" else None

    after = wait_for(restarted, float(SERVICE.get("RestartSec", ["0"])[-1]) + 30, "a new main process after kill -9")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    ready(box)


def test_watchdog_restarts_a_frozen_agent_and_a_read_sent_meanwhile_arrives(box: Box) -> None:
    watchdog = box.out("systemctl show edgeagent -p WatchdogUSec --value")
    assert watchdog not in ("0", "infinity", ""), f"the unit has no watchdog (WatchdogUSec={watchdog})"
    seconds = float(box.out(f"systemd-analyze timespan {shlex.quote(watchdog)} | sed -n 's/.*μs: //p'")) / 1e6
    before = show(box, "MainPID", "NRestarts")
    mark = cursor(box)
    box.run(f"kill -STOP {before['MainPID']}")
    publish(box, "粤B10003")  # the broker holds it for the agent's session
    wait_for(
        lambda: show(box, "MainPID")["MainPID"] not in ("0", before["MainPID"]),
        seconds + float(SERVICE.get("RestartSec", ["0"])[-1]) + 30,
        "the watchdog's restart",
    )
    log = journal_since(box, mark)
    assert "Watchdog timeout" in log, log
    ready(box)
    wait_for(lambda: delivered(box, "粤B10003"), 30, "粤B10003 (published while frozen) sent after the restart")


# -- 4. operators ----------------------------------------------------------------------------------


def test_status_for_the_operators_group_and_refused_for_others(box: Box) -> None:
    # Operators join the readers' group (issue 12), not the service's group `edgeagent`.
    box.run("id lanetech >/dev/null 2>&1 || useradd -m -G edgeagent-read lanetech")
    box.run("id visitor >/dev/null 2>&1 || useradd -m visitor")
    status = status_json(box, "lanetech")
    assert status["state"] == "ok", status["problems"]
    pins = {name: version for name, (version, _) in parse(LOCK.read_text()).items()}
    for name in ("paho-mqtt", "httpx", "cryptography", "tenacity"):
        assert status["versions"][name] == pins[name], (name, status["versions"])
    print(f"versions running: {status['versions']}")
    refused = box.run("runuser -u visitor -- edgeagent status", check=False)
    assert refused.returncode != 0
    assert "ermission" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    # The journal systemd keeps for the readers' group (Group=, StateDirectoryMode=, UMask=), and no secret.
    owners = box.out("stat -c '%n %U:%G %a' /var/lib/edgeagent /var/lib/edgeagent/journal.sqlite3").splitlines()
    assert owners == [
        "/var/lib/edgeagent edgeagent:edgeagent-read 2750",
        "/var/lib/edgeagent/journal.sqlite3 edgeagent:edgeagent-read 640",
    ], owners
    for secret in ("mqtt.password", "simulate.password", "apiclient_key.pem"):
        peek = box.run(f"runuser -u lanetech -- head -c1 /etc/edgeagent/{secret}", check=False)
        assert peek.returncode != 0 and "ermission" in peek.stderr, secret


# -- 5. an upgrade over a running install with undelivered entries, and the way out ----------------


def test_reinstall_over_a_running_older_install_keeps_the_journal_and_its_pending_entries(box: Box) -> None:
    # An "older" release: the checkout as another version, installed over the running agent.
    box.run(f"""
        rm -rf /root/older && mkdir /root/older
        cp -r {IN_BOX_CHECKOUT}/pyproject.toml {IN_BOX_CHECKOUT}/README.md {IN_BOX_CHECKOUT}/edgeagent /root/older/
        sed -i 's/^__version__ = .*/__version__ = "0.0.1"/' /root/older/edgeagent/__init__.py
    """)
    box.run(f"{INSTALL} --source /root/older", env=WHEELS)
    ready(box)
    assert status_json(box)["version"] == "0.0.1"
    box.run("systemctl stop wxsandbox")  # the uplink goes away: entries stay pending
    for plate in ("粤B20001", "粤B20002"):
        publish(box, plate)
    wait_for(lambda: len(events(box, "pending")) >= 2, 30, "two pending entries")
    rows_before = {row["id"]: row["plate_number"] for row in events(box)}
    done = box.run(INSTALL, env=WHEELS)
    assert "(re)started" in done.stdout, done.stdout
    ready(box)
    status = status_json(box)
    assert status["version"] != "0.0.1"
    rows_after = {row["id"]: row["plate_number"] for row in events(box)}
    assert rows_before.items() <= rows_after.items(), "the upgrade lost journal rows"
    assert {"粤B20001", "粤B20002"} <= {row["plate_number"] for row in events(box, "pending")}
    start_sandbox(box)
    wait_for(lambda: delivered(box, "粤B20001") and delivered(box, "粤B20002"), 90, "the pending entries sent")


def test_uninstall_keeps_the_journal_and_purge_removes_it(box: Box) -> None:
    box.run(f"{IN_BOX_CHECKOUT}/deploy/uninstall.sh")
    assert box.run("test -f /var/lib/edgeagent/journal.sqlite3", check=False).returncode == 0
    assert box.run("test -e /etc/systemd/system/edgeagent.service", check=False).returncode != 0
    assert box.out("systemctl is-active edgeagent", check=False) in ("inactive", "failed")
    box.run(f"{IN_BOX_CHECKOUT}/deploy/uninstall.sh --purge")
    for gone in ("/var/lib/edgeagent", "/etc/edgeagent", "/opt/edgeagent"):
        assert box.run(f"test -e {gone}", check=False).returncode != 0, f"{gone} survived --purge"
    assert box.run("getent passwd edgeagent", check=False).returncode != 0
