"""`edgeagent demo`: the whole flow on this machine, then a short account of what happened.

A private Mosquitto on a free port, the WeChat Pay sandbox over HTTPS with its own CA, the real
`edgeagent run` as a child process, and two simulated cameras publishing a handful of reads — a
repeated read and a no-plate read among them. Everything lives in a temporary directory that is
removed afterwards (unless --keep). Exit 0 when the sandbox accepted exactly the expected entries.
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
from edgeagent.config import load
from edgeagent.journal import Journal
from edgeagent.localbroker import LocalBroker
from edgeagent.model import PlateColor
from edgeagent.sandbox.server import Sandbox
from edgeagent.status import collect, render_text

# (camera, plate, colour, lane, what it shows)
READS: tuple[tuple[str, str, PlateColor | None, str | None, str], ...] = (
    ("south-1", "粤B12345", PlateColor.BLUE, "1", "an ordinary blue plate"),
    ("north-1", "京AD92035", PlateColor.GREEN, "1", "a new-energy plate, in the camera's vendor format"),
    ("south-1", "粤B12345", PlateColor.BLUE, "1", "the same car again, still at the barrier"),
    ("south-1", "无牌", None, "1", "a car without a plate"),
    ("south-1", "鲁VF0050", PlateColor.YELLOW, "2", "a yellow plate on lane 2 (a lorry)"),
)
EXPECTED_ENTRIES = 3


def _say(text: str = "") -> None:
    print(text, flush=True)


def _config_text(fragment: str, state_dir: Path, port: int) -> str:
    return (
        f'state_dir = "{state_dir}"\nserial_prefix = "DEMO1"\n\n{fragment}\nmax_rate_per_s = 20\n\n'
        '[parking]\nparking_id = "WXPARK001"\nrepeat_window_s = 120\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nclient_id = "edgeagent-demo"\n\n'
        '[[cameras]]\nid = "south-1"\ntopic = "anpr/south-1/plate"\nformat = "generic"\n\n'
        '[[cameras]]\nid = "north-1"\ntopic = "device/+/message/up/ivs_result"\nformat = "vzenith"\n\n'
        '[[entrances]]\nnumber = "A01"\nname = "南门入口"\nsources = ["south-1:1", "north-1"]\n\n'
        '[[entrances]]\nnumber = "A02"\nname = "南门货车道"\nsources = ["south-1:2"]\n'
        'vehicle_type = "VEHICLE_TYPE_LARGE"\n'
    )


def _wait(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


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
        if not _wait(lambda: collect(config)["mqtt"].get("connected"), 15):
            _say("   the agent did not connect to the broker; its log:\n" + log_path.read_text()[-2000:])
            return 2
        _say("\n4. Cameras publish their reads:")
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="demo-cameras")
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        for i, (camera_id, plate, color, lane, what) in enumerate(READS):
            camera = config.camera(camera_id)
            assert camera is not None
            topic, payload = simulate.render(
                camera.format,
                camera.topic,
                plate=plate,
                color=color,
                lane=lane,
                when=time.time(),
                record_id=f"demo-{i}",
            )
            client.publish(topic, payload, qos=1).wait_for_publish(5)
            shown = payload.decode("utf-8", "replace")
            shown = shown if len(shown) <= 90 else shown[:90] + "…"
            _say(f"   {camera_id:<8} {plate:<9} {what}\n            {topic}  {shown}")
            time.sleep(0.3)
        client.disconnect()
        client.loop_stop()
        accepted = _wait(lambda: len(sandbox.accepted()) >= EXPECTED_ENTRIES, 30)
        time.sleep(1.0)  # let the agent record the last outcome before we read the journal
        journal = Journal(config.journal_path, readonly=True)
        rows = list(reversed(journal.events(limit=100)))
        journal.close()
        _say("\n5. The journal (edgeagent events):")
        for row in rows:
            if row["state"] == "rejected":
                _say(f"   #{row['id']} rejected  {row['camera']}: {row['reason']} — {row['detail']}")
            else:
                _say(
                    f"   #{row['id']} {row['state']:<8}  {row['plate_number']} → {row['entrance_number']} "
                    f"{row['entrance_name']}  out_serial_number={row['out_serial_number']}  {row['plate_color']}"
                    f" {row['vehicle_type']}"
                )
        _say("\n6. What the WeChat Pay sandbox accepted (verified signature, timestamp, nonce and body):")
        for item in sandbox.accepted():
            body = item.get("body", item)
            _say(
                f"   {body.get('out_serial_number')} {body.get('plate_number')} at {body.get('entrance_number')}"
                f" → serial_number {item.get('serial_number')}"
            )
        status = collect(config)
        _say("\n7. edgeagent status:\n")
        _say("\n".join("   " + line for line in render_text(status).splitlines()))
        entries = [r for r in rows if r["state"] != "rejected"]
        ok = accepted and len(sandbox.accepted()) == EXPECTED_ENTRIES and all(r["state"] == "sent" for r in entries)
        _say(
            f"\n{'OK' if ok else 'NOT OK'}: {len(entries)} entries journaled, {len(sandbox.accepted())} accepted "
            f"by the sandbox, {len(rows) - len(entries)} reads kept as rejected with their reason."
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
