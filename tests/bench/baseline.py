"""The naive baseline: a paho callback that signs and POSTs each read with httpx, then auto-acks.

What a first version of a gate agent looks like, to put edgeagent's figures in proportion: no
journal (a read is acknowledged whether or not it was delivered), no retry, one request at a time
in paho's network thread, no screening beyond the JSON. It does the same protocol work per read as
edgeagent (build the body, RSA-sign it, verify the signed answer), using the project's pure
`wechatpay` module, so the difference measured is the architecture, not the crypto.

    python -m tests.bench.baseline --config edgeagent.toml

It reads the agent's config file (the [wechatpay], [parking], [mqtt] tables and the first camera),
sends READY=1 to $NOTIFY_SOCKET once set up, and prints one line per read to stdout:
`posted <out_serial_number> <status>` or `failed <out_serial_number> <error>`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent import requests, wechatpay
from edgeagent.model import CarType, PlateColor, VehicleType

COLORS = {"blue": PlateColor.BLUE, "yellow": PlateColor.YELLOW, "green": PlateColor.GREEN}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    config = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
    wx, mqtt, camera, entrance = config["wechatpay"], config["mqtt"], config["cameras"][0], config["entrances"][0]
    parking_id = config["parking"]["parking_id"]
    key = wechatpay.load_private_key(Path(wx["merchant_private_key"]).read_bytes())
    platform = {wx["platform_public_key_id"]: wechatpay.load_public_key(Path(wx["platform_public_key"]).read_bytes())}
    http = httpx.Client(verify=wx.get("ca_file") or True, timeout=wx.get("timeout_s", 10))
    url = wx["base_url"] + requests.ENTRY_PATH
    out = sys.stdout

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        serial = "?"
        try:
            read = json.loads(msg.payload)
            serial = "BL" + re.sub(r"[^A-Za-z0-9]", "", str(read.get("event_id", "")))[:30]
            body = requests.build_entry_body(
                requests.EntryRequest(
                    out_serial_number=serial,
                    parking_id=parking_id,
                    plate_number=read["plate"],
                    enter_timestamp=int(read.get("time") or time.time()),
                    plate_color=COLORS.get(read.get("color", ""), PlateColor.UNKNOWN),
                    car_type=CarType.TEMPORARY,
                    vehicle_type=VehicleType.SMALL,
                    entrance_number=entrance["number"],
                    entrance_name=entrance["name"],
                )
            )
            headers = wechatpay.request_headers(
                key=key,
                mchid=wx["mchid"],
                serial_no=wx["merchant_serial_no"],
                body=body,
                timestamp=int(time.time()),
                nonce=wechatpay.new_nonce(),
                wechatpay_serial=wx["platform_public_key_id"],
                user_agent="naive-baseline/1.0",
                method="POST",
                target=requests.ENTRY_PATH,
            )
            response = http.post(url, content=body, headers=headers)
            wechatpay.verify_response(response.headers, response.content, platform, time.time())
            out.write(f"posted {serial} {response.status_code}\n")
        except Exception as exc:  # no retry: the read is acked and gone either way
            out.write(f"failed {serial} {exc.__class__.__name__}: {exc}\n")
        out.flush()

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(camera["topic"], qos=1)

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=mqtt["client_id"])
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect_async(mqtt["host"], mqtt.get("port", 1883))
    client.loop_start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address:  # the same moment edgeagent says READY: set up and connecting
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(b"READY=1", address)
    stop.wait()
    client.disconnect()
    client.loop_stop()
    http.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
