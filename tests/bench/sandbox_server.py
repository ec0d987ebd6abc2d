"""The sandbox for the bench: edgeagent's sandbox, with two costs of its own taken out of the figures.

Both are the sandbox's, not the agent's, and both would otherwise dominate what the bench measures:

1. Nagle's algorithm. The sandbox writes an answer's headers and its body in two `send`s; with Nagle
   on, the body waits for the client's ACK of the headers, which a client on a busy keep-alive
   connection delays by Linux's 40 ms minimum. Back-to-back requests then take ~45 ms instead of ~4 ms
   (measured on the bench machine). Turned off with `StreamRequestHandler.disable_nagle_algorithm`.
2. Nonce pruning. `Api._authenticate` rebuilds its dict of every nonce seen in the last 300 s on each
   request: O(requests in 5 minutes) per request. At a few hundred requests/s that grows to ~9 ms of
   CPU per request and the sandbox, not the agent, sets the pace. `NonceMemory` keeps the same rule
   (a nonce may not come again within 300 s) at O(1) per request.

Upstream fixes would be `disable_nagle_algorithm = True` on `sandbox.server._Handler` and pruning the
nonces from an expiry-ordered queue in `sandbox.api`; the bench does not edit the sandbox.

    python -m tests.bench.sandbox_server --dir DIR --port N
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import FrameType

from edgeagent.sandbox import server
from edgeagent.sandbox.api import Api


class NonceMemory:
    """What `Api._authenticate` needs of its nonce dict: prune, `in`, `setdefault`, in O(1) amortised.

    The sandbox prunes by rebuilding the dict from `.items()`; here `.items()` is empty and expired
    nonces leave from the front of an insertion-ordered queue instead (the sandbox clock is the system
    clock in the bench: no `date_offset_s`).
    """

    def __init__(self) -> None:
        self._until: dict[str, int] = {}
        self._order: deque[tuple[int, str]] = deque()
        self._lock = threading.Lock()

    def items(self) -> tuple[()]:
        return ()

    def _expire(self) -> None:
        now = time.time()
        while self._order and self._order[0][0] <= now:
            until, nonce = self._order.popleft()
            if self._until.get(nonce) == until:
                del self._until[nonce]

    def __contains__(self, nonce: object) -> bool:
        with self._lock:
            self._expire()
            return nonce in self._until

    def setdefault(self, nonce: str, until: int) -> int:
        with self._lock:
            if nonce not in self._until:
                self._until[nonce] = until
                self._order.append((until, nonce))
            return self._until[nonce]


class BenchApi(Api):
    """The sandbox's API with `NonceMemory` in place of its nonce dict; every rule is unchanged."""

    @property  # type: ignore[override]
    def _nonces(self) -> NonceMemory:
        return self._memory

    @_nonces.setter
    def _nonces(self, value: object) -> None:
        # Api.__init__ assigns {} once and _authenticate assigns the (empty) rebuilt dict on every
        # request: the memory stays.
        if not hasattr(self, "_memory"):
            self._memory = NonceMemory()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # no line per request: the bench reads /_sandbox/requests
    server._Handler.disable_nagle_algorithm = True
    sandbox = server.Sandbox(Path(args.dir), args.port)
    sandbox.api = BenchApi(sandbox.materials)
    sandbox.start()
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
