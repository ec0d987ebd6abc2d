"""`edgeagent sandbox`: the emulated API of `api.py` over HTTPS on 127.0.0.1 (SPEC §8, DESIGN "Sandbox").

WeChat Pay API v3 has no public test environment, so this is how integrators commission lanes
before they hold live credentials, and what the tests and the demo deliver to. `Sandbox` runs
in a thread (tests, demo); `serve` is the CLI command. Started, it writes `edgeagent-wechatpay.toml`
into its directory: the `[wechatpay]` table that points an agent at it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from edgeagent.errors import KeyFileError
from edgeagent.sandbox.api import CONTROL_PREFIX, Api, Reply, json_reply
from edgeagent.sandbox.ca import Materials, ensure_materials, write_file

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
HANDSHAKE_TIMEOUT_S = 10.0


class Sandbox:
    """The stand-in API over HTTPS, usable in-thread: `with Sandbox(dir, port=0, **knobs) as sandbox: …`.

    Thread-safe; `.set(**knobs)` changes behaviour while it runs (see `api.Knobs`).
    """

    def __init__(self, dir: Path, port: int = 0, *, host: str = "127.0.0.1", **knobs: object) -> None:
        self.materials: Materials = ensure_materials(Path(dir))
        self.api = Api(self.materials, **knobs)
        self._host, self._port = host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Sandbox:
        """Listen, write the config fragment (it names the port) and serve in a background thread."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.materials.server_cert_file, self.materials.server_key_file)
        self._server = _Server((self._host, self._port), self.api, context)
        self._port = self._server.server_address[1]
        write_file(self.materials.config_file, _fragment(self.materials, self.base_url).encode())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="sandbox", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the sandbox is not started")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"https://{host}:{self._port}"

    @property
    def ca_file(self) -> Path:
        return self.materials.ca_file

    def set(self, **knobs: object) -> None:
        """Change knobs, all or none (ValueError names an unknown knob or a wrong value)."""
        self.api.set(**knobs)

    def knobs(self) -> dict[str, Any]:
        return self.api.knobs()

    def accepted(self) -> list[dict[str, Any]]:
        """Accepted entries, oldest first: the body's fields plus serial_number, received_at, repeats."""
        return self.api.accepted()

    def exits(self) -> list[dict[str, Any]]:
        """Accepted exits, oldest first: the body's fields plus received_at, request_id, repeats."""
        return self.api.exits()

    def requests(self) -> list[dict[str, Any]]:
        """Every API request seen, oldest first: at, kind, method, path, status (None: dropped), code,
        out_serial_number, request_id, replayed."""
        return self.api.requests()


def _fragment(m: Materials, base_url: str) -> str:
    """The `[wechatpay]` table of SPEC §3 for this sandbox; JSON strings are valid TOML strings."""
    q = json.dumps
    return f"""\
# Written by `edgeagent sandbox`: WeChat Pay settings for a LOCAL STAND-IN of the API, for
# commissioning and tests only. Copy this table into edgeagent.toml and set, under [parking],
# parking_id = {q(m.parking_id)}. Replace it with the merchant's own values to go live.
[wechatpay]
mchid = {q(m.mchid)}
merchant_serial_no = {q(m.merchant_serial_no)}
merchant_private_key = {q(str(m.merchant_private_key_file))}
platform_public_key = {q(str(m.platform_public_key_file))}
platform_public_key_id = {q(m.platform_public_key_id)}
# Platform-certificate mode instead (certificates fetched from /v3/certificates): remove the two
# platform_public_key* lines above and use
# apiv3_key_file = {q(str(m.apiv3_key_file))}
base_url = {q(base_url)}
ca_file = {q(str(m.ca_file))}
timeout_s = 10
"""


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that does each TLS handshake in the connection's thread, not the accept loop."""

    daemon_threads = True
    block_on_close = False  # keep-alive connections must not hold up stop()

    def __init__(self, address: tuple[str, int], api: Api, context: ssl.SSLContext) -> None:
        self.api = api
        self.context = context
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._open: set[ssl.SSLSocket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def finish_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        assert isinstance(request, socket.socket)
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        with self.context.wrap_socket(request, server_side=True) as tls:
            with self._open_lock:
                self._open.add(tls)
            try:
                _Handler(tls, client_address, self)
            finally:
                with self._open_lock:
                    self._open.discard(tls)

    def close_connections(self) -> None:
        with self._open_lock:
            for tls in self._open:
                with contextlib.suppress(OSError):  # already closed by the peer
                    tls.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes (a client that does not trust the test CA) and resets are normal here.
        log.debug("sandbox_connection_error peer=%s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: httpx pools connections like against the real API
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed ACK
    # (40 ms on Linux) on a busy keep-alive connection: ~45 ms instead of ~4 ms per answer (bench).
    disable_nagle_algorithm = True
    server_version = "edgeagent-sandbox"
    timeout = 30  # idle keep-alive connections are closed after this many seconds

    def _serve(self) -> None:
        assert isinstance(self.server, _Server)
        length = self.headers.get("Content-Length", "0")
        if "Transfer-Encoding" in self.headers or not length.isdigit() or int(length) > MAX_BODY:
            self.close_connection = True
            self._send(json_reply(400, {"code": "INVALID_REQUEST", "message": f"need a Content-Length ≤ {MAX_BODY}"}))
            return
        body = self.rfile.read(int(length))
        path = urlsplit(self.path).path
        if path.startswith(CONTROL_PREFIX):
            reply: Reply | None = self.server.api.control(self.command, path, body)
        else:
            headers = {name.lower(): value for name, value in self.headers.items()}
            reply = self.server.api.respond(self.command, self.path, headers, body)
        if reply is None:
            self.close_connection = True  # drop_connection: no status line at all
            return
        self._send(reply)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def _send(self, reply: Reply) -> None:
        self.send_response_only(reply.status)  # not send_response: Date comes from the sandbox clock
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("sandbox_http " + format, *args)  # one INFO line per request comes from Sandbox.respond


def serve(dir: Path, port: int, host: str = "127.0.0.1") -> int:
    """`edgeagent sandbox`: serve until SIGINT or SIGTERM, then exit 0 (2 when it cannot start)."""
    try:
        sandbox = Sandbox(dir, port, host=host).start()
    except (OSError, KeyFileError) as exc:
        print(f"edgeagent sandbox: cannot start: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    m = sandbox.materials
    print(f"edgeagent sandbox listening on {sandbox.base_url}", flush=True)
    print(f"config fragment: {m.config_file}", flush=True)
    print(f"mchid {m.mchid}, parking_id {m.parking_id}, CA {m.ca_file}; Ctrl-C stops", flush=True)
    try:
        stop.wait()
    finally:
        sandbox.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
