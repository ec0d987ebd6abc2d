"""`edgeagent demo`: the whole flow on this machine, then a short account of what happened.

A private Mosquitto on a free port, the WeChat Pay sandbox over HTTPS with its own CA, the real
`edgeagent run` as a child process, and simulated cameras: two at the entrances (a repeated read and a
no-plate read among theirs) and one at the exit, where one car leaves as read, one leaves misread
(matched fuzzy, sent under its entry's plate) and one car nobody saw come in is read (an orphan).
Everything lives in a temporary directory that is removed afterwards (unless --keep).

Exit 0 when everything happened as expected: the sandbox accepted exactly the three entries and the
two exits (each under its entry's number and plate), the unknown car's exit read became the one
orphan, was never sent and made `status` degraded, and after `edgeagent dismiss` (what a technician
does once they know the read was a car that did not park) `status` is ok again. The lorry stays parked:
its session is open at the end, as a car's session is until it leaves.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent import simulate
from edgeagent.config import Config, load
from edgeagent.journal import Journal
from edgeagent.localbroker import LocalBroker
from edgeagent.model import PlateColor
from edgeagent.sandbox.server import Sandbox
from edgeagent.status import collect, render_text

# (camera, plate, colour, lane, what it shows)
Read = tuple[str, str, PlateColor | None, str | None, str]
ENTRY_READS: tuple[Read, ...] = (
    ("south-1", "粤B12345", PlateColor.BLUE, "1", "an ordinary blue plate"),
    ("north-1", "京AD92035", PlateColor.GREEN, "1", "a new-energy plate, in the camera's vendor format"),
    ("south-1", "粤B12345", PlateColor.BLUE, "1", "the same car again, still at the barrier"),
    ("south-1", "无牌", None, "1", "a car without a plate"),
    ("south-1", "鲁VF0050", PlateColor.YELLOW, "2", "a yellow plate on lane 2 (a lorry; it stays parked)"),
)
EXIT_READS: tuple[Read, ...] = (
    ("south-2", "京AD92035", PlateColor.GREEN, None, "the new-energy car leaves"),
    ("south-2", "粤B1Z345", PlateColor.BLUE, None, "the blue car leaves, its 2 misread as Z"),
    ("south-2", "浙A88888", PlateColor.BLUE, None, "a car no entrance saw (it came in before the box)"),
)
EXPECTED_ENTRIES = 3
EXPECTED_EXITS = {"京AD92035": "exact", "粤B12345": "fuzzy"}  # sent under the entry's plate
ORPHAN_PLATE = "浙A88888"
EXIT_HOLD_S = 3  # the demo's: 30 s by default, the time a late entry gets before an exit read is an orphan


def _say(text: str = "") -> None:
    print(text, flush=True)


def _config_text(fragment: str, state_dir: Path, port: int) -> str:
    return (
        f'state_dir = "{state_dir}"\nserial_prefix = "DEMO1"\n\n{fragment}\nmax_rate_per_s = 20\n\n'
        '[parking]\nparking_id = "WXPARK001"\nrepeat_window_s = 120\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nclient_id = "edgeagent-demo"\n\n'
        '[[cameras]]\nid = "south-1"\ntopic = "anpr/south-1/plate"\nformat = "generic"\n\n'
        '[[cameras]]\nid = "north-1"\ntopic = "device/+/message/up/ivs_result"\nformat = "vzenith"\n\n'
        '[[cameras]]\nid = "south-2"\ntopic = "aiot/plate/+"\nformat = "qianyi"\n\n'
        '[[entrances]]\nnumber = "A01"\nname = "南门入口"\nsources = ["south-1:1", "north-1"]\n\n'
        '[[entrances]]\nnumber = "A02"\nname = "南门货车道"\nsources = ["south-1:2"]\n'
        'vehicle_type = "VEHICLE_TYPE_LARGE"\n\n'
        '[[exits]]\nnumber = "X01"\nname = "南门出口"\nsources = ["south-2"]\n\n'
        f'[sessions]\nmatch = "confusable"\nexit_hold_s = {EXIT_HOLD_S}\n'
    )


def _wait(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def _publish(client: paho.Client, config: Config, reads: tuple[Read, ...], first_id: int) -> None:
    for i, (camera_id, plate, color, lane, what) in enumerate(reads, first_id):
        camera = config.camera(camera_id)
        assert camera is not None
        topic, payload = simulate.render(
            camera.format, camera.topic, plate=plate, color=color, lane=lane, when=time.time(), record_id=f"demo-{i}"
        )
        client.publish(topic, payload, qos=1).wait_for_publish(5)
        shown = payload.decode("utf-8", "replace")
        shown = shown if len(shown) <= 90 else shown[:90] + "…"
        _say(f"   {camera_id:<8} {plate:<9} {what}\n            {topic}  {shown}")
        time.sleep(0.3)


def _cli(config_path: Path, *args: str) -> tuple[int, str]:
    """An `edgeagent` command as a technician would type it; (exit code, its output indented)."""
    result = subprocess.run(
        [sys.executable, "-m", "edgeagent", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode, "\n".join("   " + line for line in (result.stdout + result.stderr).splitlines())


def _journal_line(row: dict[str, Any]) -> str:
    if row["state"] == "rejected":
        return f"   #{row['id']} rejected  {row['camera']}: {row['reason']} — {row['detail']}"
    if row["kind"] == "exit":
        if row["out_serial_number"] is None:
            return f"   #{row['id']} {row['state']:<8}  exit {row['plate_number']} at {row['exit_number']}: no session"
        return (
            f"   #{row['id']} {row['state']:<8}  exit {row['plate_number']} at {row['exit_number']}"
            f" → out_serial_number={row['out_serial_number']} (match {row['match']})"
        )
    return (
        f"   #{row['id']} {row['state']:<8}  {row['plate_number']} → {row['entrance_number']} "
        f"{row['entrance_name']}  out_serial_number={row['out_serial_number']}  {row['plate_color']}"
        f" {row['vehicle_type']}"
    )


def run(keep: bool = False) -> int:
    """Run the demo; returns 0 when every step did what the account says."""
    work = Path(tempfile.mkdtemp(prefix="edgeagent-demo-"))
    broker = LocalBroker(work / "broker")
    sandbox = Sandbox(work / "sandbox", port=0)
    agent: subprocess.Popen[bytes] | None = None
    ok = False
    try:
        _say(f"edgeagent demo — everything runs on this machine, in {work}\n")
        broker.start()
        _say(f"1. MQTT broker (mosquitto) listening on 127.0.0.1:{broker.port}")
        sandbox.start()
        _say(f"2. WeChat Pay sandbox at {sandbox.base_url} (its own test CA, merchant and platform keys)")
        fragment = (work / "sandbox" / "edgeagent-wechatpay.toml").read_text(encoding="utf-8")
        config_path = work / "edgeagent.toml"
        config_path.write_text(_config_text(fragment, work / "state", broker.port), encoding="utf-8")
        config = load(config_path)
        log_path = work / "agent.log"
        with log_path.open("wb") as log_file:
            agent = subprocess.Popen(
                [sys.executable, "-m", "edgeagent", "run", "--config", str(config_path)],
                stdout=log_file,
                stderr=log_file,
                env=dict(os.environ),
            )
        _say(f"3. edgeagent run (pid {agent.pid}), config {config_path}")
        _say("   entrances A01 (south-1 lane 1, north-1) and A02 (south-1 lane 2), exit X01 (south-2)")
        if not _wait(lambda: collect(config)["mqtt"].get("connected"), 15):
            _say("   the agent did not connect to the broker; its log:\n" + log_path.read_text()[-2000:])
            return 2
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="demo-cameras")
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        _say("\n4. Cars come in; the entrance cameras publish their reads:")
        _publish(client, config, ENTRY_READS, 0)
        entries_in = _wait(lambda: len(sandbox.accepted()) >= EXPECTED_ENTRIES, 30)
        _say(f"\n5. Cars leave; the exit camera publishes its reads (orphan after exit_hold_s = {EXIT_HOLD_S} s):")
        _publish(client, config, EXIT_READS, len(ENTRY_READS))
        client.disconnect()
        client.loop_stop()
        exits_out = _wait(lambda: len(sandbox.exits()) >= len(EXPECTED_EXITS), 30)
        orphaned = _wait(lambda: collect(config)["sessions"]["orphans"] >= 1, EXIT_HOLD_S + 15)
        time.sleep(1.0)  # let the agent record the last outcome before we read the journal
        journal = Journal(config.journal_path, readonly=True)
        rows = list(reversed(journal.events(limit=100)))
        journal.close()
        _say("\n6. The journal (edgeagent events):")
        for row in rows:
            _say(_journal_line(row))
        _say("\n7. What the WeChat Pay sandbox accepted (verified signature, timestamp, nonce and body):")
        for item in sandbox.accepted():
            _say(
                f"   entry {item['out_serial_number']} {item['plate_number']} at {item['entrance_number']}"
                f" → serial_number {item['serial_number']}"
            )
        for item in sandbox.exits():
            _say(f"   exit  {item['out_serial_number']} {item['plate_number']} → 204")
        _say("\n8. edgeagent sessions:\n")
        _say(_cli(config_path, "sessions")[1])
        status = collect(config)
        _say("\n9. edgeagent status (degraded until someone looks at the orphan):\n")
        _say("\n".join("   " + line for line in render_text(status).splitlines()))
        orphans = [r for r in rows if r["kind"] == "exit" and r["state"] == "orphan"]
        orphan = orphans[0] if len(orphans) == 1 else None
        dismissed = False
        if orphan is not None:
            _say(f"\n10. A technician looks at orphan exit #{orphan['id']}: {orphan['plate_number']} came in before")
            _say("    the box was installed, so there is no entry to close and nothing to send:\n")
            code, shown = _cli(config_path, "dismiss", str(orphan["id"]))
            _say(f"   $ edgeagent dismiss {orphan['id']}\n{shown}")
            dismissed = code == 0
        after = collect(config)
        _say(f"   $ edgeagent status → {after['state']}")

        entries = [r for r in rows if r["kind"] == "entry" and r["state"] != "rejected"]
        plate_of = {r["out_serial_number"]: r["plate_number"] for r in entries}
        matches = {r["out_serial_number"]: r["match"] for r in rows if r["kind"] == "exit" and r["out_serial_number"]}
        sent_exits = {
            e["plate_number"]: matches.get(e["out_serial_number"])
            for e in sandbox.exits()
            if plate_of.get(e["out_serial_number"]) == e["plate_number"]
        }
        ok = (
            entries_in
            and exits_out
            and orphaned
            and len(sandbox.accepted()) == EXPECTED_ENTRIES
            and all(r["state"] == "sent" for r in entries)
            and sent_exits == EXPECTED_EXITS
            and len(sandbox.exits()) == len(EXPECTED_EXITS)
            and orphan is not None
            and orphan["plate_number"] == ORPHAN_PLATE
            and status["state"] == "degraded"
            and dismissed
            and after["state"] == "ok"
        )
        rejected = sum(1 for r in rows if r["state"] == "rejected")
        _say(
            f"\n{'OK' if ok else 'NOT OK'}: {len(sandbox.accepted())} entries and {len(sandbox.exits())} exits accepted"
            f" by the sandbox (one exit matched fuzzy), {len(orphans)} exit read with no session\n"
            f"kept and never sent (the orphan, then dismissed), {rejected} reads rejected with their reason,"
            " 1 car still parked."
        )
        return 0 if ok else 1
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                agent.kill()
        sandbox.stop()
        broker.stop()
        if keep or not ok:
            _say(f"(kept {work} for inspection)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:  # pragma: no cover
    sys.exit(run())


if __name__ == "__main__":  # pragma: no cover
    main()
