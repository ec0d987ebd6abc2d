"""What this machine allows a drain at all: N threads POSTing signed entries back to back, nothing else.

No MQTT, no journal, no loop: each thread signs an entry, POSTs it, verifies the answer and takes the
next, sharing one httpx client (a pool of N connections). The bench compares edgeagent's drain rate
with this one to tell the agent's overhead from the cost of TLS, RSA and the sandbox on these cores.

    python -m tests.bench.ceiling --config edgeagent.toml --count 2000 --threads 16 --tag c1

Prints one JSON line: {"count": …, "seconds": …, "failed": …}; out_serial_numbers are BLC<tag><n>.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx

from edgeagent import requests, wechatpay
from edgeagent.model import CarType, PlateColor, VehicleType
from tests.bench.harness import plate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()
    config = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
    wx, parking_id = config["wechatpay"], config["parking"]["parking_id"]
    key = wechatpay.load_private_key(Path(wx["merchant_private_key"]).read_bytes())
    platform = {wx["platform_public_key_id"]: wechatpay.load_public_key(Path(wx["platform_public_key"]).read_bytes())}
    limits = httpx.Limits(max_connections=args.threads, max_keepalive_connections=args.threads)
    http = httpx.Client(verify=wx["ca_file"], timeout=30, limits=limits)
    url = wx["base_url"] + requests.ENTRY_PATH
    numbers = itertools.count()
    lock = threading.Lock()
    failed = [0]

    def worker() -> None:
        while True:
            with lock:
                n = next(numbers)
            if n >= args.count:
                return
            body = requests.build_entry_body(
                requests.EntryRequest(
                    f"BLC{args.tag}{n}", parking_id, plate(24_000_000 + n), int(time.time()), PlateColor.BLUE,
                    CarType.TEMPORARY, VehicleType.SMALL,
                )
            )  # fmt: skip
            headers = wechatpay.request_headers(
                key=key,
                mchid=wx["mchid"],
                serial_no=wx["merchant_serial_no"],
                body=body,
                timestamp=int(time.time()),
                nonce=wechatpay.new_nonce(),
                wechatpay_serial=wx["platform_public_key_id"],
                user_agent="bench-ceiling/1.0",
                method="POST",
                target=requests.ENTRY_PATH,
            )
            try:
                response = http.post(url, content=body, headers=headers)
                wechatpay.verify_response(response.headers, response.content, platform, time.time())
            except Exception:
                with lock:
                    failed[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(args.threads)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    http.close()
    print(json.dumps({"count": args.count, "seconds": seconds, "failed": failed[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
