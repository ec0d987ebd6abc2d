"""The sandbox for the bench: edgeagent's own sandbox in a process of its own, quiet.

It used to patch two of the sandbox's costs out of the figures (Nagle's algorithm on answers, and a
nonce dict rebuilt on every request); both are fixed in the sandbox itself now
(`sandbox.server._Handler.disable_nagle_algorithm`, `sandbox.nonces.NonceMemory`), so the bench
measures the sandbox that ships. What remains is a separate interpreter (its own GIL, so the sandbox
does not compete with the agent under test) and no log line per request (the bench reads
/_sandbox/requests).

    python -m tests.bench.sandbox_server --dir DIR --port N
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from edgeagent.sandbox import Sandbox


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # no line per request: the bench reads /_sandbox/requests
    sandbox = Sandbox(Path(args.dir), args.port).start()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"bench sandbox listening on {sandbox.base_url}", flush=True)
    stop.wait()
    sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
