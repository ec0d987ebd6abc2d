"""One lot, several boxes (SPEC §11, issue 11): the shipped bridge and hub files on three real Mosquittos.

Box A's and box B's lane brokers run the shipped `edgeagent.conf` plus `bridge-lot.conf`; the hub runs
`edgeagent.conf` plus `hub-lot.conf` (one box's broker as the hub of a small lot) with the ACL of
`lot-hub.acl.example`. The bridges use TLS with a test CA (the certificate names 127.0.0.1) and the
per-box accounts the files describe. Box A reaches the hub through `Link`, a TCP relay on loopback
that the test can cut and restore: the bridge's link fails as a 4G uplink or a switch would, while
both brokers keep running. No agent runs here: the test's clients publish what an agent would
(lotwire snapshots, retained, QoS 1) with the agent's own broker account.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgeagent import lotwire
from edgeagent.localbroker import LocalBroker, free_port
from edgeagent.model import EntryState, PlateColor
from edgeagent.sessions import SessionState
from tests.conftest import eventually
from tests.integration.test_deploy import Client, tls_material

REPO = Path(__file__).resolve().parents[2]
MOSQ = REPO / "deploy" / "mosquitto"
MOSQUITTO = Path(os.environ.get("MOSQUITTO", "/usr/sbin/mosquitto"))
LOT = "lots/WXPARK001/sessions"
IS_ROOT = os.geteuid() == 0

pytestmark = pytest.mark.slow


def need(condition: bool, reason: str) -> None:
    if not condition:
        pytest.skip(reason)


def render_bridge(topic: str, hub: str, box: str, password: str, ca: Path) -> str:
    """bridge-lot.conf filled in as deploy/install.sh does (setting lines only), the CA path moved."""
    lines = []
    for line in (MOSQ / "bridge-lot.conf").read_text().splitlines():
        if not line.startswith("#"):
            line = line.replace("LOT_TOPIC", topic).replace("HUB_ADDRESS", hub).replace("BOX_ID", box)
            line = line.replace("HUB_PASSWORD", password).replace("/etc/mosquitto/certs/lot-hub-ca.crt", str(ca))
        lines.append(line)
    return "\n".join(lines) + "\n"


def settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def passwd(path: Path, accounts: dict[str, str]) -> None:
    for i, (user, password) in enumerate(accounts.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", path, user, password], check=True)


class Box:
    """A box's lane broker: Debian's main file (persistence, include_dir) and the shipped drop-in, with
    the agent's account, the shipped ACL plus the lot block install.sh --lot-topic adds, and extra drop-ins."""

    def __init__(self, directory: Path, agent_password: str, extra: dict[str, str]) -> None:
        self.broker = LocalBroker(directory)
        self.port = self.broker.port
        self.dir = directory
        conf_d = directory / "conf.d"
        conf_d.mkdir()
        passwd(directory / "edgeagent.passwd", {"edgeagent": agent_password})
        acl = (MOSQ / "acl.example").read_text()
        acl += f"# >>> lot (install.sh --lot-topic)\nuser edgeagent\ntopic write {LOT}/#\n# <<< lot\n"
        (directory / "edgeagent.acl").write_text(acl)
        dropin = (MOSQ / "edgeagent.conf").read_text()
        dropin = re.sub(r"^listener 1883 ", f"listener {self.port} ", dropin, flags=re.M)
        dropin = dropin.replace("/etc/mosquitto/edgeagent.", f"{directory}/edgeagent.")
        (conf_d / "edgeagent.conf").write_text(dropin)
        for name, text in extra.items():
            (conf_d / name).write_text(text)
        main = [
            "persistence true",
            f"persistence_location {directory}/",
            f"log_dest file {directory}/mosquitto.log",
            "log_type all",
            f"include_dir {conf_d}",
        ]
        if IS_ROOT:
            main.append("user root")
        self.broker.conf.write_text("\n".join(main) + "\n")
        self.log = directory / "mosquitto.log"

    def start(self) -> None:
        self.broker.start()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        self.broker.stop(sig)


class Link:
    """A TCP relay 127.0.0.1:port → target that can be cut (every connection reset, new ones refused
    at once) and restored, standing in for the network between a box and the hub."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.is_up = True
        self.blackhole = False
        self.accepted = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if not self.is_up:
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._socks += [conn, upstream]
                self.accepted += 1
            threading.Thread(target=self._pump, args=(conn, upstream), name="link-pump", daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if not self.blackhole:
                        (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                s.close()

    def silent(self) -> None:
        """Packets vanish, no connection is closed: a 4G link that drops, a cable pulled two hops away."""
        self.blackhole = True

    def down(self) -> None:
        self.blackhole = False
        self.is_up = False
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self._socks.clear()

    def up(self) -> None:
        self.down()  # a silent link's connections are dead for good: the bridge's keepalive ends them
        self.is_up = True

    def close(self) -> None:
        self._stop = True
        self.down()
        self.server.close()


PASSWORDS = {"P1G1": "box-a-secret", "P1G2": "box-b-secret"}
AGENT = "agent-secret"


class Lot:
    """Hub, box A (P1G1, through a Link) and box B (P1G2, direct)."""

    def __init__(self, tmp: Path) -> None:
        ca, cert, key = tls_material(tmp / "tls")
        hub_port = free_port()
        hub_conf = (MOSQ / "hub-lot.conf").read_text()
        hub_conf = hub_conf.replace("listener 8883 HUB_LISTEN_ADDRESS", f"listener {hub_port} 127.0.0.1")
        hub_conf = hub_conf.replace("/etc/mosquitto/certs/lot-hub-ca.crt", str(ca))
        hub_conf = hub_conf.replace("/etc/mosquitto/certs/lot-hub.crt", str(cert))
        hub_conf = hub_conf.replace("/etc/mosquitto/certs/lot-hub.key", str(key))
        hub_conf = hub_conf.replace("/etc/mosquitto/lot-hub.", f"{tmp}/hub/lot-hub.")
        assert [s for s in settings(hub_conf) if re.search(r"\b[A-Z]+_[A-Z_]+\b", s)] == []
        (tmp / "hub").mkdir()
        passwd(tmp / "hub" / "lot-hub.passwd", PASSWORDS)
        acl = (MOSQ / "lot-hub.acl.example").read_text().replace("LOT_TOPIC", LOT).replace("user P1G3", "user P1G1")
        (tmp / "hub" / "lot-hub.acl").write_text(acl)
        self.ca = ca
        self.hub_port = hub_port
        self.hub = Box(tmp / "hub" / "broker", AGENT, {"hub-lot.conf": hub_conf})
        self.hub.start()
        self.link = Link(hub_port)
        bridge_a = render_bridge(LOT, f"127.0.0.1:{self.link.port}", "P1G1", PASSWORDS["P1G1"], ca)
        bridge_a = bridge_a.replace("\nkeepalive_interval 30\n", f"\nkeepalive_interval {KEEPALIVE_S}\n")
        bridge_b = render_bridge(LOT, f"127.0.0.1:{hub_port}", "P1G2", PASSWORDS["P1G2"], ca)
        for text in (bridge_a, bridge_b):
            assert [s for s in settings(text) if re.search(r"\b[A-Z]+_[A-Z_]+\b", s)] == []
        self.a = Box(tmp / "a", AGENT, {"bridge-lot.conf": bridge_a})
        self.b = Box(tmp / "b", AGENT, {"bridge-lot.conf": bridge_b})
        self.a.start()
        self.b.start()

    def close(self) -> None:
        for box in (self.a, self.b, self.hub):
            box.stop()
        self.link.close()


@pytest.fixture
def lot(tmp_path: Path) -> Iterator[Lot]:
    need(MOSQUITTO.exists(), f"{MOSQUITTO} is missing (apt-get install mosquitto)")
    need(shutil.which("mosquitto_passwd") is not None, "mosquitto_passwd is missing (apt-get install mosquitto)")
    made = Lot(tmp_path)
    yield made
    made.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        made.append(Client(*args, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


def serial(box: str, n: int) -> str:
    return f"{box}TESTEP{n:010d}"


def snapshot(box: str, n: int, rev: int = 1) -> lotwire.Snapshot:
    return lotwire.Snapshot(
        serial(box, n), box, rev, SessionState.OPEN, "粤B12345", PlateColor.BLUE, 1_720_078_200 + n, "A01",
        EntryState.SENT,
    )  # fmt: skip


def publish(client: Client, message: lotwire.Snapshot) -> None:
    client.publish(lotwire.topic_for(LOT, message.serial), lotwire.encode(message), retain=True)


def decoded(client: Client) -> list[lotwire.Snapshot]:
    found = [lotwire.decode(LOT, m.topic, bytes(m.payload)) for m in list(client.messages)]
    return [s for s in found if isinstance(s, lotwire.Snapshot)]


def bridged(lot: Lot, sender: Client, receiver: Client, box: str) -> None:
    """Until a probe published at `sender`'s box arrives at `receiver`: the bridges are up."""
    probe = 900_000 + int(time.monotonic() * 10) % 90_000

    def arrived() -> bool:
        publish(sender, snapshot(box, probe))
        return eventually(lambda: any(s.serial == serial(box, probe) for s in decoded(receiver)), timeout=2) or False

    def attempt() -> bool:
        try:
            return arrived()
        except AssertionError:
            return False

    eventually(attempt, timeout=90, interval=0.5, what=f"a probe from {box} across the bridges")


def test_a_retained_snapshot_at_box_a_reaches_box_b_and_a_late_subscriber_there(
    lot: Lot, clients: Callable[..., Client]
) -> None:
    at_a = clients(lot.a.port, "edgeagent", AGENT)
    at_b = clients(lot.b.port, "edgeagent", AGENT)
    at_b.subscribe(f"{LOT}/#")
    bridged(lot, at_a, at_b, "P1G1")

    session = snapshot("P1G1", 42, rev=3)
    publish(at_a, session)
    eventually(lambda: session in decoded(at_b), what="A's snapshot at B, through the hub")
    # And back: B's own snapshot reaches A (the bridge is `both`), each message once per subscriber.
    at_a.subscribe(f"{LOT}/#")
    theirs = snapshot("P1G2", 7)
    publish(at_b, theirs)
    eventually(lambda: theirs in decoded(at_a), what="B's snapshot at A")

    # A box (re)starting later learns the lot's open sessions at once: retained on its own broker.
    late = clients(lot.b.port, "edgeagent", AGENT)
    late.subscribe(f"{LOT}/#")
    eventually(lambda: session in decoded(late), what="the retained snapshot for a late subscriber at B")
    [message] = [m for m in late.messages if m.topic == lotwire.topic_for(LOT, session.serial)]
    assert message.retain
    # The hub keeps it too (a box installed later learns from there), and the hub's own agent sees it.
    at_hub = clients(lot.hub.port, "edgeagent", AGENT)
    at_hub.subscribe(f"{LOT}/#")
    eventually(lambda: session in decoded(at_hub) and theirs in decoded(at_hub), what="both retained at the hub")

    # A repeat with the same rev is a repeat: the receiver's rule drops it.
    publish(at_a, session)
    eventually(lambda: decoded(at_b).count(session) == 2, what="the repeat at B")
    kept: dict[str, int] = {}
    taken = 0
    for s in decoded(at_b):
        if s.serial == session.serial and lotwire.newer(kept.get(s.serial), s.rev):
            kept[s.serial], taken = s.rev, taken + 1
    assert taken == 1


KEEPALIVE_S = 3  # bridge-lot.conf says 30; shortened here so a silent link is noticed within seconds


@pytest.mark.parametrize("failure", ["reset", "silent", "restart", "power_cut"])
def test_what_the_bridge_delivers_of_messages_published_while_the_link_was_down(
    lot: Lot, clients: Callable[..., Client], capsys: pytest.CaptureFixture[str], failure: str
) -> None:
    """Mosquitto issues 3394 and 3472: why the agent re-publishes unfinished sessions (SPEC §11).

    reset: the link to the hub breaks with a TCP reset (the hub's side closed), and comes back.
    silent: packets vanish without a reset (4G), longer than the bridge's keepalive, then come back.
    restart: the link breaks, and box A's broker restarts (SIGTERM, state saved) before it is back.
    power_cut: the link breaks, and box A loses power (SIGKILL) before its broker's next autosave.
    """
    at_a = clients(lot.a.port, "edgeagent", AGENT)
    at_b = clients(lot.b.port, "edgeagent", AGENT)
    at_b.subscribe(f"{LOT}/#")
    bridged(lot, at_a, at_b, "P1G1")
    at_b.messages.clear()

    total, cut, restore = 60, 20, 40
    for n in range(total):
        if n == cut:
            if failure == "silent":
                lot.link.silent()
            else:
                lot.link.down()
                time.sleep(1)  # the bridge notices: the hub's end of the connection is gone
        if n == restore:
            if failure == "silent":
                time.sleep(KEEPALIVE_S * 1.5 + 2)  # the bridge gives the connection up
            if failure in ("restart", "power_cut"):
                at_a.close()
                lot.a.stop(signal.SIGTERM if failure == "restart" else signal.SIGKILL)
                lot.a.start()
                at_a = clients(lot.a.port, "edgeagent", AGENT)
            lot.link.up()
        publish(at_a, snapshot("P1G1", n))  # every one PUBACKed by box A's broker
        time.sleep(0.05)
    bridged(lot, at_a, at_b, "P1G1")  # the bridge is back
    time.sleep(3)  # anything Mosquitto still had queued for the hub would have gone by now

    def arrived(client: Client) -> set[int]:
        return {int(s.serial[-10:]) for s in decoded(client) if s.serial[-10:] < "0000900000"}

    live = arrived(at_b)
    late = clients(lot.b.port, "edgeagent", AGENT)
    late.subscribe(f"{LOT}/#")
    time.sleep(1)
    retained = arrived(late)
    before, during, after = set(range(cut)), set(range(cut, restore)), set(range(restore, total))
    FIGURES[failure] = (len(live & during), len(retained & during), len(during))
    with capsys.disabled():
        print(
            f"\n{failure}: of {len(during)} published at A while the link was down, {len(live & during)} reached B "
            f"live and {len(retained & during)} are retained at B; before {len(live & before)}/{len(before)}, "
            f"after {len(live & after)}/{len(after)}; bridge connections {lot.link.accepted}"
        )
    assert before <= live and after <= live  # the bridge works while it is up
    assert EXPECTED[failure](len(live & during), len(during)), FIGURES[failure]

    # What the agent does about it: re-publish every unfinished session (a higher rev), and the lot
    # catches up within one period of the link's return.
    try:
        for n in range(total):
            publish(at_a, snapshot("P1G1", n, rev=2))
    except RuntimeError:
        # Seen here in about 1 run of 3 of `restart` and `power_cut`: some seconds after restarting with
        # the bridge's queue persisted, box A's Mosquitto 2.0.11 stops answering anyone and spins at
        # 100% CPU (docs/deploy.md). Not ours to fix; shown, not hidden: the test says xfail.
        if failure in ("restart", "power_cut") and spinning(lot.a):
            pytest.xfail("box A's Mosquitto 2.0.11 hung at 100% CPU after restarting with a persisted bridge queue")
        raise
    everyone = set(range(total))
    final = clients(lot.b.port, "edgeagent", AGENT)
    final.subscribe(f"{LOT}/#")
    eventually(
        lambda: (
            {s.rev for s in decoded(final) if int(s.serial[-10:]) in everyone} == {2} and everyone <= arrived(final)
        ),
        timeout=30,
        what="the re-published revisions retained at B",
    )


def spinning(box: Box) -> bool:
    """Whether the broker process is alive but busy: running, and using CPU over one second."""
    proc = box.broker.proc
    if proc is None or proc.poll() is not None:
        return False
    stat = Path(f"/proc/{proc.pid}/stat")
    first = stat.read_text().split()
    time.sleep(1)
    second = stat.read_text().split()
    return second[2] == "R" and int(second[13]) - int(first[13]) > 50  # > 0.5 s of user CPU per second


FIGURES: dict[str, tuple[int, int, int]] = {}
EXPECTED: dict[str, Callable[[int, int], bool]] = {
    # Mosquitto 2.0.11 with bridge-lot.conf (cleansession false) and edgeagent.conf (persistence,
    # max_queued_messages 100000): the bridge's queue survives a broken link, a silent one (QoS 1
    # messages sent into it are sent again after the reconnect) and a clean restart...
    "reset": lambda got, sent: got == sent,
    "silent": lambda got, sent: got == sent,
    "restart": lambda got, sent: got == sent,
    # ...but it is memory saved every autosave_interval (10 s): a power cut loses what came since.
    "power_cut": lambda got, sent: got < sent,
}


def test_a_box_account_writes_only_the_lot_topic_and_what_the_acl_cannot_stop(
    lot: Lot, clients: Callable[..., Client], tmp_path: Path
) -> None:
    observer = clients(lot.hub.port, "edgeagent", AGENT)  # the hub box's agent account reads #
    observer.subscribe("#")
    # Box A's hub account used directly, as by whoever copied bridge-lot.conf off box A.
    thief = clients(lot.hub_port, "P1G1", PASSWORDS["P1G1"], ca_file=lot.ca)
    assert thief.accepted
    assert not clients(lot.hub_port, "P1G1", "wrong", ca_file=lot.ca).accepted
    assert not clients(lot.hub_port, None, None, ca_file=lot.ca).accepted

    forged = snapshot("P1G1", 1)
    for topic in (
        "lots/WXPARK002/sessions/" + forged.serial,  # another lot
        "edgeagent/edgeagent-gate1/status",  # the hub box's own agent status
        "anpr/south-1/plate",  # the hub box's cameras
    ):
        thief.publish(topic, lotwire.encode(forged), retain=True)
    thief.publish(lotwire.topic_for(LOT, forged.serial), lotwire.encode(forged))  # its own session: allowed
    eventually(lambda: any(m.topic.startswith(LOT + "/") for m in observer.messages), what="A's own snapshot")
    assert [m.topic for m in observer.messages] == [lotwire.topic_for(LOT, forged.serial)]
    # `LOT/#` also grants LOT itself (MQTT: `#` matches the parent level); the agents reject it.
    thief.publish(LOT, lotwire.encode(forged))
    eventually(lambda: any(m.topic == LOT for m in observer.messages), what="a message on the lot topic itself")
    rejected = lotwire.decode(LOT, LOT, lotwire.encode(forged))
    assert isinstance(rejected, lotwire.Rejected) and rejected.reason is lotwire.Reason.FOREIGN_TOPIC
    thief.subscribe("lots/WXPARK002/#")
    thief.subscribe("anpr/#")
    time.sleep(0.5)
    assert [m.topic for m in thief.messages] == []

    # What the ACL cannot stop: A writing B's session, even claiming to be B. A receiver takes it as
    # B's (its `box` is the number's owner); a `box` that is not the owner it does reject. The owner,
    # B, hears a snapshot on its own topic that it did not write, and re-publishes over it (SPEC §11).
    victim = snapshot("P1G2", 5)
    claim = replace(victim, rev=99, plate_number="粤B99999")
    thief.publish(lotwire.topic_for(LOT, victim.serial), lotwire.encode(claim), retain=True)
    eventually(lambda: claim in decoded(observer), what="the forged snapshot, past the ACL")
    # A's own snapshot body on B's number: `box` is not the number's owner, every receiver rejects it.
    wrong_box = lotwire.encode(forged)
    found = lotwire.decode(LOT, lotwire.topic_for(LOT, victim.serial), wrong_box)
    assert isinstance(found, lotwire.Rejected) and found.reason is lotwire.Reason.WRONG_BOX

    # Per-box prefixes cannot be written as Mosquitto ACL patterns: the broker refuses the file.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "acl").write_text(f"pattern write {LOT}/%u#\n")
    broker = LocalBroker(bad)
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", f"acl_file {bad}/acl"))
    with pytest.raises(RuntimeError, match="mosquitto exited"):
        broker.start(timeout=5)
    assert "Invalid ACL topic" in (bad / "mosquitto.log").read_text()
