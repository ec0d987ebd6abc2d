"""`edgeagent check`: validate the config, keys and files; with `--online`, try the broker and the API.

Each finding is one line, OK or FAIL with a hint, so a technician can fix a lane from the output.
Exit 0 when everything is fine, 78 for configuration or key problems, 2 when an online probe fails.
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from edgeagent import wechatpay
from edgeagent.config import Config, load, warnings
from edgeagent.errors import ConfigError, EdgeAgentError, KeyFileError
from edgeagent.requests import LOT_ENABLED

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 2, 78


def _line(ok: bool, what: str, hint: str = "") -> bool:
    print(f"{'OK  ' if ok else 'FAIL'} {what}{'  (' + hint + ')' if hint and not ok else ''}")
    return ok


def check_keys(config: Config) -> bool:
    """Parse every key file the config names; report kind and size, never the key itself."""
    wx = config.wechatpay
    ok = True
    try:
        key = wechatpay.load_private_key(wx.merchant_private_key.read_bytes())
        bits = key.key_size
        ok &= _line(bits >= 2048, f"merchant private key: RSA {bits} bits", "WeChat Pay expects RSA 2048")
    except (OSError, KeyFileError) as exc:
        ok &= _line(
            False,
            f"merchant private key {wx.merchant_private_key}: {exc}",
            "apiclient_key.pem from the merchant platform, PKCS#8 or PKCS#1 PEM",
        )
    if wx.platform_public_key is not None:
        try:
            wechatpay.load_public_key(wx.platform_public_key.read_bytes())
            ok &= _line(True, f"WeChat Pay public key {wx.platform_public_key_id}")
        except (OSError, KeyFileError) as exc:
            ok &= _line(
                False,
                f"WeChat Pay public key {wx.platform_public_key}: {exc}",
                "download it from 商户平台 → API安全 → 微信支付公钥",
            )
    if wx.apiv3_key_file is not None:
        try:
            size = len(wx.apiv3_key_file.read_bytes().strip())
            ok &= _line(size == 32, f"APIv3 key: {size} bytes", "the APIv3 key is exactly 32 characters")
        except OSError as exc:
            ok &= _line(False, f"APIv3 key {wx.apiv3_key_file}: {exc.strerror}")
    return ok


def _probe_broker(config: Config) -> bool:
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415
    from paho.mqtt.reasoncodes import ReasonCode  # noqa: PLC0415

    from edgeagent.mqtt import apply_credentials  # noqa: PLC0415

    m = config.mqtt
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{m.client_id}-check")
    apply_credentials(client, m)
    try:
        client.connect(m.host, m.port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        return _line(False, f"MQTT broker {m.host}:{m.port}: {exc}", "is mosquitto running? host/port/tls right?")
    granted: list[bool] = []

    def on_subscribe(c: paho.Client, u: object, mid: int, codes: list[ReasonCode], p: object) -> None:
        granted.extend(not code.is_failure for code in codes)

    client.on_subscribe = on_subscribe
    client.loop_start()
    deadline = time.monotonic() + 5
    while not client.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    ok = _line(
        client.is_connected(),
        f"MQTT broker {m.host}:{m.port} accepts {m.client_id}-check",
        "check username/password_file and the broker's ACL",
    )
    if ok:
        topics = [c.topic for c in config.cameras]
        client.subscribe([(t, 1) for t in topics])
        while len(granted) < len(topics) and time.monotonic() < deadline:
            time.sleep(0.05)
        for topic, allowed in zip(topics, granted + [False] * (len(topics) - len(granted)), strict=True):
            ok &= _line(allowed, f"subscribe {topic}", "the broker's ACL refuses this topic")
    client.disconnect()
    client.loop_stop()
    return ok


def _probe_api(config: Config) -> bool:
    wx = config.wechatpay
    ok = True
    for url in filter(None, (wx.base_url, wx.backup_base_url)):
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 443
        context = ssl.create_default_context(cafile=str(wx.ca_file) if wx.ca_file else None)
        if wx.ca_file:
            context.load_verify_locations(cafile=str(wx.ca_file))
        try:
            with (
                socket.create_connection((host, port), timeout=wx.timeout_s) as raw,
                context.wrap_socket(raw, server_hostname=host),
            ):
                ok &= _line(True, f"API {url}: reachable, TLS certificate valid")
        except (OSError, ssl.SSLError) as exc:
            ok &= _line(False, f"API {url}: {exc}", "DNS, uplink, firewall, or ca_file for a private CA")
    return ok


def _probe_lot(config: Config) -> bool:
    """One signed `GET parking-lot`: proves key, serial, mchid and parking_id together (SPEC §2)."""
    from edgeagent import parking_lot  # noqa: PLC0415
    from edgeagent.clock import Clock  # noqa: PLC0415
    from edgeagent.platform_keys import PlatformKeys  # noqa: PLC0415
    from edgeagent.uplink import Uplink  # noqa: PLC0415

    wx = config.wechatpay
    clock = Clock()
    uplink = Uplink(wx, clock)
    try:
        key = wechatpay.load_private_key(wx.merchant_private_key.read_bytes())
        keys = PlatformKeys(config, uplink, key, clock)
        answer = parking_lot.query(config, uplink, keys, key, clock)
    except (OSError, KeyFileError, EdgeAgentError) as exc:
        return _line(False, f"signed request to the API: {exc}", "key, serial and mchid must belong together")
    finally:
        uplink.close()
    parking_id = config.parking.parking_id
    if answer.error:
        return _line(
            False,
            f"signed GET parking-lot for {parking_id}: {answer.error}",
            "401: key/serial/mchid or clock; 400/404: parking_id; see the API's words",
        )
    state = f"{answer.enabled_state}" + (f" ({answer.reason})" if answer.reason else "")
    _line(True, f"signed GET parking-lot: key, serial, mchid and parking_id {parking_id} accepted")
    return _line(
        answer.enabled_state == LOT_ENABLED,
        f"lot {parking_id} enabled_state {state}",
        "WeChat has not enabled this lot (or took it offline): see reason; entries still journal and send",
    )


def _probe_clock() -> bool:
    from edgeagent.clock import system_clock_synchronized  # noqa: PLC0415

    synced, how = system_clock_synchronized()
    return _line(synced, f"system clock synchronised ({how})", "enable systemd-timesyncd or chrony; signatures need it")


def run(path: Path, *, online: bool) -> int:
    try:
        config = load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    _line(True, f"config {path}: {len(config.cameras)} cameras, {len(config.entrances)} entrances")
    for warning in warnings(config):
        print(f"WARN {warning}")
    if not check_keys(config):
        return EXIT_CONFIG
    if not online:
        return EXIT_OK
    ok = _probe_broker(config)
    api = _probe_api(config)
    ok &= api
    if api:
        ok &= _probe_lot(config)
    ok &= _probe_clock()
    return EXIT_OK if ok else EXIT_FAILED
