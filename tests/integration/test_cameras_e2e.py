"""Every vendor format end to end: real Mosquitto, `edgeagent run`, the journal, and the HTTPS sandbox.

One gate for the whole module: one broker, one sandbox, one agent with a camera per vendor format on
the topic filter that vendor really publishes on, each routed to its own entrance. Cameras publish
what real firmware sends (payloads are built from the verbatim samples in the golden decoder cases,
tests/data/decoders/, with fresh plates and capture times), including the awkward parts: base64
envelopes and plain HTTP-push bodies, quick + full results, offline re-sends, history re-uploads,
Frigate's refined plates, heartbeats, lane events, other event types and no-plate reads.

What is asserted is what a parking operator sees: `edgeagent events --json` has exactly the expected
rows (plate, colour, vehicle type, entrance, entry time from the camera's capture time), messages
that are not passages leave no row at all, and the sandbox accepted every entry exactly once.

Each test ends with a read it waits for: ingest keeps arrival order, so when that row is in the
journal every message published before it has been handled.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import secrets
import signal
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from edgeagent.localbroker import LocalBroker
from edgeagent.sandbox.server import Sandbox
from tests.conftest import Agent, Publisher, events, eventually, run_cli

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent.parent / "data" / "decoders"
CHINA = timezone(timedelta(hours=8))
Json = dict[str, Any]

# Camera serials as the vendors spell them: Vzenith 8-8 hex, Qianyi 12 characters.
VZ_DEVICE_SN = "265e1040-85e01fb7"  # the official MQTT sample's serial
VZ_SN_FIRST_SN = "0f823866-d2dc45ab"  # the OEM HTTP-push sample's serial
VZ_NORTH_SN = "4a0e2b1c-7d3f5e90"
QY_SN = "15ZK0A1B2C3D"
QY_POST_SN = "15ZK0A1B2C3E"

CAMERAS = f"""
# A Vzenith camera whose every message is subscribed (keep_alive, gpio_in, quick_ivs_result, ...).
[[cameras]]
id = "vz-north"
topic = "device/{VZ_NORTH_SN}/message/up/+"
format = "vzenith"

[[cameras]]
id = "vz-device"
topic = "device/{VZ_DEVICE_SN}/message/up/ivs_result"  # camera topics must not overlap (issue 12)
format = "vzenith"

[[cameras]]
id = "vz-snfirst"
topic = "{VZ_SN_FIRST_SN}/device/message/up/ivs_result"
format = "vzenith"

[[cameras]]
id = "qy-aiot"
topic = "aiot/plate/+"
format = "qianyi"

[[cameras]]
id = "qy-post"
topic = "/+/+/qymqttpost"
format = "qianyi"

[[cameras]]
id = "hik"
topic = "hikvision/+/anpr"
format = "hikvision"

[[cameras]]
id = "fr-lpr"
topic = "frigate/tracked_object_update"
format = "frigate"

[[cameras]]
id = "fr-events"
topic = "frigate/events"
format = "frigate"

[[entrances]]
number = "V1"
name = "北门入口"
sources = ["vz-north"]

[[entrances]]
number = "V2"
name = "东门入口"
sources = ["vz-device"]

[[entrances]]
number = "V3"
name = "西门入口"
sources = ["vz-snfirst"]

[[entrances]]
number = "Q1"
name = "南门入口"
sources = ["qy-aiot"]

[[entrances]]
number = "Q2"
name = "南门二号口"
sources = ["qy-post"]

[[entrances]]
number = "H1"
name = "地库入口"
sources = ["hik"]

[[entrances]]
number = "H2"
name = "地库货车道"
sources = ["hik:2"]

[[entrances]]
number = "F1"
name = "东侧车道"
sources = ["fr-lpr", "fr-events"]

[[entrances]]
number = "F2"
name = "西侧车道"
sources = ["fr-lpr:gate_west", "fr-events:gate_west"]
"""


# -- the gate ------------------------------------------------------------------------------------------


@dataclass
class Gate:
    config: Path
    sandbox: Sandbox
    agent: Agent
    camera: Publisher

    def last_id(self) -> int:
        return max((row["id"] for row in events(self.config)), default=0)

    def publish(self, topic: str, payload: bytes | str | dict[str, Any]) -> bytes:
        """Publish at QoS 1 (a dict as the compact-ish JSON cameras send); return the exact bytes."""
        if isinstance(payload, dict):
            payload = json.dumps(payload, ensure_ascii=False)
        data = payload.encode() if isinstance(payload, str) else payload
        self.camera.publish(topic, data)
        return data

    def rows_after(self, since: int, closing: bytes) -> list[dict[str, Any]]:
        """The rows of messages published since row `since`, once the row of `closing` is journaled."""
        digest = _sha256(closing)

        def settled() -> list[dict[str, Any]] | None:
            rows = [row for row in events(self.config) if row["id"] > since]
            return rows if any(row["payload_sha256"] == digest for row in rows) else None

        found = eventually(settled, timeout=30, what="the closing read journaled")
        return sorted(found or [], key=lambda row: row["id"])

    def delivered(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Wait until every entry among `rows` is sent; return what the sandbox accepted for them."""
        numbers = {row["out_serial_number"] for row in rows if row["state"] != "rejected"}

        def all_sent() -> bool:
            states = {r.get("out_serial_number"): r["state"] for r in events(self.config)}
            return all(states.get(n) == "sent" for n in numbers)

        eventually(all_sent, timeout=60, what=f"{len(numbers)} entries sent")
        return [body for body in self.sandbox.accepted() if body["out_serial_number"] in numbers]


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _wait_connected(config: Path, agent: Agent) -> None:
    def connected() -> bool:
        result = run_cli("status", "--json", "--config", str(config))
        view = json.loads(result.stdout) if result.stdout else {}
        pid = agent.proc.pid if agent.proc else None
        return bool(view.get("daemon", {}).get("pid") == pid and view.get("mqtt", {}).get("connected"))

    eventually(connected, timeout=30, what="agent connected to the broker")


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    root = tmp_path_factory.mktemp("cameras-e2e")
    broker = LocalBroker(root / "broker")
    broker.start()
    sandbox = Sandbox(root / "sandbox", port=0).start()
    fragment = sandbox.materials.config_file.read_text(encoding="utf-8")
    config = root / "edgeagent.toml"
    config.write_text(
        f'state_dir = "{root / "state"}"\nserial_prefix = "CAM1"\n\n{fragment}max_rate_per_s = 50\n\n'
        f'[parking]\nparking_id = "{sandbox.materials.parking_id}"\nrepeat_window_s = 120\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nclient_id = "edgeagent-cameras-e2e"\n{CAMERAS}',
        encoding="utf-8",
    )
    agent = Agent(config, root / "agent.log")
    camera: Publisher | None = None
    try:
        agent.start()
        _wait_connected(config, agent)
        camera = Publisher(broker.port, client_id="cameras-e2e")
        yield Gate(config, sandbox, agent, camera)
    finally:
        if camera is not None:
            camera.close()
        agent.kill(signal.SIGTERM)
        sandbox.stop()
        broker.stop(signal.SIGKILL)


# -- what a row means to an operator ---------------------------------------------------------------------


def entry(camera: str, plate: str, color: str, vtype: str, entrance: str, when: float) -> tuple[Any, ...]:
    return (camera, "entry", plate, f"PLATE_COLOR_{color}", f"VEHICLE_TYPE_{vtype}", entrance, int(when))


def rejected(camera: str, reason: str, plate: str | None = None) -> tuple[Any, ...]:
    return (camera, "rejected", reason, plate)


def summary(row: dict[str, Any]) -> tuple[Any, ...]:
    if row["state"] == "rejected":
        return rejected(row["camera"], row["reason"], row["plate_number"])
    return (
        row["camera"],
        "entry",
        row["plate_number"],
        row["plate_color"],
        row["vehicle_type"],
        row["entrance_number"],
        row["enter_timestamp"],
    )


def assert_journal_and_sandbox(gate: Gate, rows: list[dict[str, Any]], expected: list[tuple[Any, ...]]) -> None:
    """Exactly the expected rows, and every entry accepted by the sandbox once, with the same fields."""
    assert sorted(map(summary, rows), key=repr) == sorted(expected, key=repr)
    accepted = gate.delivered(rows)
    entries = [row for row in rows if row["state"] != "rejected"]
    assert sorted(body["out_serial_number"] for body in accepted) == sorted(r["out_serial_number"] for r in entries)
    by_number = {body["out_serial_number"]: body for body in accepted}
    for row in entries:
        body = by_number[row["out_serial_number"]]
        sent = {key: body[key] for key in ("plate_number", "plate_color", "vehicle_type", "entrance_number")}
        assert sent | {"enter_timestamp": body["enter_timestamp"]} == {
            key: row[key] for key in (*sent, "enter_timestamp")
        }
    plates = [body["plate_number"] for body in accepted]
    assert len(plates) == len(set(plates)), f"a vehicle was sent twice: {sorted(plates)}"


# -- payloads, from the reference's verbatim samples --------------------------------------------------


def sample(fmt: str, case: str) -> Any:
    """A golden case's payload: JSON as a dict, XML as text."""
    folder = DATA / fmt / case
    xml = folder / "payload.xml"
    if xml.exists():
        return xml.read_text(encoding="utf-8")
    return json.loads((folder / "payload.json").read_text(encoding="utf-8"))


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def image(size: int = 48_000) -> str:
    """A JPEG-sized base64 blob, as cameras inline their pictures."""
    return base64.b64encode(b"\xff\xd8\xff\xe0" + secrets.token_bytes(size)).decode("ascii")


def timeval(when: float) -> dict[str, int]:
    local = datetime.fromtimestamp(when, CHINA)  # dec* is the camera's local wall time, sec is UTC
    return {
        "decday": local.day,
        "dechour": local.hour,
        "decmin": local.minute,
        "decmon": local.month,
        "decsec": local.second,
        "decyear": local.year,
        "sec": int(when),
        "usec": int(when * 1_000_000) % 1_000_000,
    }


def vz_plate_result(
    result: dict[str, Any],
    *,
    license: str,
    when: float,
    plateid: int,
    color: int,
    plate_type: int,
    brand: int = 255,
    offline: int = 0,
    trigger: int = 4,
) -> None:
    result |= {"license": license, "colorType": color, "type": plate_type, "plateid": plateid}
    result |= {"isoffline": offline, "triggerType": trigger}
    result["car_brand"] = {"brand": 42, "type": brand, "year": 65535}
    result["timeStamp"] = {"Timeval": timeval(when)}


def vz_envelope(sn: str, plate: str, when: float, plateid: int, *, name: str = "ivs_result", **fields: Any) -> Json:
    """The official MQTT `ivs_result` (§2.2): base64 strings in an {id, sn, name, payload} envelope."""
    doc: Json = copy.deepcopy(sample("vzenith", "mqtt-official-sample-base64-envelope"))
    doc |= {"id": secrets.token_urlsafe(12)[:16], "sn": sn, "name": name}
    alarm = doc["payload"]["AlarmInfoPlate"]
    alarm |= {"serialno": sn, "deviceName": b64("北门相机")}
    vz_plate_result(alarm["result"]["PlateResult"], license=b64(plate), when=when, plateid=plateid, **fields)
    return doc  # its envelope `timestamp` stays the sample's 2021 value: never the capture time


def vz_http(sn: str, plate: str, when: float, plateid: int, **fields: Any) -> Json:
    """The OEM HTTP-push body (§2.3): plain UTF-8, relayed onto MQTT."""
    doc: Json = copy.deepcopy(sample("vzenith", "http-push-oem-sample-plain-utf8"))
    doc["AlarmInfoPlate"]["serialno"] = sn
    vz_plate_result(doc["AlarmInfoPlate"]["result"]["PlateResult"], license=plate, when=when, plateid=plateid, **fields)
    return doc


def vz_keep_alive(sn: str, now: float, *, named: bool = True) -> Json:
    """The 10-second heartbeat (§2.1); some firmware leaves the name to the topic."""
    beat: Json = {"sn": sn, "timestamp": int(now), "payload": {"timestamp": int(now)}}
    return {"id": secrets.token_urlsafe(12)[:16], "name": "keep_alive"} | beat if named else beat


def qy_msg_id(when: float) -> str:
    alphabet = string.ascii_letters + string.digits
    return f"{int(when * 1000)}{''.join(secrets.choice(alphabet) for _ in range(7))}"


def qy_result(plate: str, when_ts: int | str, msg_id: str, color: str = "蓝色", **fields: Any) -> Json:
    """The flat `cmd: "result"` of the third-party fixture (§3.2)."""
    doc: Json = dict(sample("qianyi", "third-party-fixture-sample"))
    doc |= {"msg_id": msg_id, "plate_num": plate, "plate_color": color, "utc_ts": when_ts, "sn": QY_SN}
    return doc | fields


def hik_xml(plate: str, when: float, uuid: str, **elements: str) -> str:
    """The DS-TCG405-E alert (§4.1) with fresh values; `elements` replaces any leaf by local name."""
    text: str = sample("hikvision", "xml-ds-tcg405e-sample-colour-prefix")
    values = {
        "licensePlate": plate,
        "originalLicensePlate": plate,
        "dateTime": hik_time(when),
        "UUID": uuid,
        "activePostCount": "1",
    } | elements
    for name, value in values.items():
        text, found = re.subn(rf"<{name}>[^<]*</{name}>", f"<{name}>{value}</{name}>", text, count=1)
        assert found, name
    return text


def hik_time(when: float) -> str:
    return datetime.fromtimestamp(when, CHINA).isoformat(timespec="milliseconds")


def hik_json(plate: str, when: float, uuid: str, **anpr: Any) -> Json:
    """The JSON alert a Chinese-site integration shows (§4.1): every value as text."""
    doc: Json = copy.deepcopy(sample("hikvision", "json-alert-values-as-text"))
    doc |= {"dateTime": datetime.fromtimestamp(when, CHINA).isoformat(timespec="seconds"), "UUID": uuid}
    doc["ANPR"] |= {"licensePlate": plate} | anpr
    return doc


def hik_uuid() -> str:
    return f"a0fe72d4-3652-464a-aebd-{secrets.token_hex(6)}"


def frigate_id(when: float) -> str:
    return f"{when:.6f}-{secrets.token_hex(3)}"


def fr_lpr(object_id: str, plate: str, when: float, camera: str, score: float = 0.91) -> Json:
    """Frigate's `tracked_object_update` of type lpr, as its docs show it (§7)."""
    doc: Json = dict(sample("frigate", "tracked-object-update-lpr-doc-sample"))
    return doc | {"id": object_id, "name": None, "plate": plate, "score": score, "camera": camera, "timestamp": when}


def fr_event(
    kind: str, object_id: str, camera: str, when: float, plate: Any = None, *, label: str = "car", **after: Any
) -> Json:
    """A `frigate/events` message; `plate` as the docs spell it (a string) or as Frigate 0.16+ sends it."""
    doc: Json = copy.deepcopy(sample("frigate", "events-update-with-recognized-plate"))
    state = doc["after"] | {"id": object_id, "camera": camera, "label": label, "start_time": when - 4}
    state |= {"frame_time": when, "recognized_license_plate": plate} | after
    if not isinstance(plate, str):
        state.pop("recognized_license_plate_score", None)
    before = doc["before"] | {"id": object_id, "camera": camera, "label": label, "start_time": when - 4}
    return {"type": kind, "before": before, "after": state | ({"end_time": when + 2} if kind == "end" else {})}


# -- Vzenith 臻识 --------------------------------------------------------------------------------------


def test_vzenith_both_topic_layouts_envelopes_and_http_bodies(gate: Gate) -> None:
    since, now = gate.last_id(), time.time()
    device = f"device/{VZ_DEVICE_SN}/message/up/ivs_result"
    sn_first = f"{VZ_SN_FIRST_SN}/device/message/up/ivs_result"
    north = f"device/{VZ_NORTH_SN}/message/up"

    # A blue car, with its picture inline; the broker delivers it twice.
    t1 = now - 20.4
    car1 = vz_envelope(VZ_DEVICE_SN, "赣GK7M29", t1, 700101, color=1, plate_type=1)
    car1["payload"]["AlarmInfoPlate"]["result"]["PlateResult"]["full_image_content"] = image()
    first = gate.publish(device, car1)
    gate.publish(device, first)
    # A small new-energy car: colorType 5, plate type 19.
    t2 = now - 18.1
    gate.publish(device, vz_envelope(VZ_DEVICE_SN, "赣GD12345", t2, 700102, color=5, plate_type=19))
    # A lorry reported by a relayed HTTP push body: yellow, 大型货车.
    t3 = now - 17.7
    gate.publish(device, vz_http(VZ_DEVICE_SN, "鲁VF7730", t3, 90814, color=2, plate_type=3, brand=7))
    # A car the camera only reports after its link came back, three hours late, re-sent twice.
    t4 = now - 3 * 3600 - 0.5
    gate.publish(device, vz_envelope(VZ_DEVICE_SN, "赣GN8806", t4, 699990, color=1, plate_type=1, offline=1))
    gate.publish(device, vz_envelope(VZ_DEVICE_SN, "赣GN8806", t4, 699990, color=1, plate_type=1, offline=1))
    # The first car again as an offline re-send of the same record.
    gate.publish(device, vz_envelope(VZ_DEVICE_SN, "赣GK7M29", t1, 700101, color=1, plate_type=1, offline=1))
    # Lane events inside ivs_result: 车折返 (66) and 车滞留 (64) are not passages.
    gate.publish(device, vz_envelope(VZ_DEVICE_SN, "赣GR5521", now - 15, 700103, color=1, plate_type=1, trigger=66))
    gate.publish(device, vz_envelope(VZ_DEVICE_SN, "赣GR5522", now - 15, 700104, color=1, plate_type=1, trigger=64))
    # A car without a plate, base64 "_无_".
    gate.publish(device, vz_envelope(VZ_DEVICE_SN, "_无_", now - 14, 700105, color=0, plate_type=0))
    gate.publish(f"device/{VZ_DEVICE_SN}/message/up/keep_alive", vz_keep_alive(VZ_DEVICE_SN, now))

    # The SN-first layout: an envelope and a relayed HTTP body, and its no-plate doc sample.
    t5, t6 = now - 13.3, now - 12.9
    gate.publish(sn_first, vz_envelope(VZ_SN_FIRST_SN, "鲁BC6818", t5, 5501, color=1, plate_type=1, brand=2))
    gate.publish(sn_first, vz_http(VZ_SN_FIRST_SN, "鲁VH2051", t6, 5502, color=4, plate_type=2))
    no_plate = copy.deepcopy(sample("vzenith", "http-push-no-plate-offline-doc-sample"))
    no_plate["AlarmInfoPlate"]["result"]["PlateResult"] |= {"timeStamp": {"Timeval": timeval(now - 12)}}
    gate.publish(sn_first, no_plate)
    gate.publish(f"{VZ_SN_FIRST_SN}/device/message/up/keep_alive", vz_keep_alive(VZ_SN_FIRST_SN, now, named=False))

    # A camera subscribed to all its messages: heartbeats, IO, gate state, lane control are no entries...
    gate.publish(f"{north}/keep_alive", vz_keep_alive(VZ_NORTH_SN, now))
    gate.publish(f"{north}/keep_alive", vz_keep_alive(VZ_NORTH_SN, now, named=False))
    gate.publish(f"{north}/gpio_in", sample("vzenith", "gpio-in-ignored") | {"sn": VZ_NORTH_SN})
    gate.publish(f"{north}/barr_gate_status", sample("vzenith", "barrier-gate-status-ignored") | {"sn": VZ_NORTH_SN})
    gate.publish(f"{north}/lanectrl_result", sample("vzenith", "lanectrl-result-lane-event-ignored"))
    # ...and the quick result ~100 ms before the full one is the same car.
    t7 = now - 10.2
    quick = vz_envelope(VZ_NORTH_SN, "京NC7E35", t7, 42, name="quick_ivs_result", color=1, plate_type=1)
    gate.publish(f"{north}/quick_ivs_result", quick)
    full = vz_envelope(VZ_NORTH_SN, "京NC7E35", t7, 42, color=1, plate_type=1)
    full["payload"]["AlarmInfoPlate"]["result"]["PlateResult"]["full_image_content"] = image()
    gate.publish(f"{north}/ivs_result", full)
    t8 = now - 9.5
    closing = gate.publish(f"{north}/ivs_result", vz_envelope(VZ_NORTH_SN, "京N5K2P8", t8, 43, color=1, plate_type=1))

    rows = gate.rows_after(since, closing)
    assert_journal_and_sandbox(
        gate,
        rows,
        [
            entry("vz-device", "赣GK7M29", "BLUE", "SMALL", "V2", t1),
            entry("vz-device", "赣GD12345", "GREEN", "SMALL", "V2", t2),
            entry("vz-device", "鲁VF7730", "YELLOW", "LARGE", "V2", t3),
            entry("vz-device", "赣GN8806", "BLUE", "SMALL", "V2", t4),
            rejected("vz-device", "no_plate"),
            entry("vz-snfirst", "鲁BC6818", "BLUE", "SMALL", "V3", t5),
            entry("vz-snfirst", "鲁VH2051", "BLACK", "SMALL", "V3", t6),
            rejected("vz-snfirst", "no_plate"),
            entry("vz-north", "京NC7E35", "BLUE", "SMALL", "V1", t7),
            entry("vz-north", "京N5K2P8", "BLUE", "SMALL", "V1", t8),
        ],
    )


# -- Qianyi 芊熠 -------------------------------------------------------------------------------------


def test_qianyi_results_offline_resends_and_heartbeats(gate: Gate) -> None:
    since, now = gate.last_id(), time.time()
    topic = f"aiot/plate/{QY_SN}"

    # The third-party fixture's shape: seconds, a Chinese colour name; the broker delivers it twice.
    t1 = now - 30.6
    first = gate.publish(topic, qy_result("京AQ3K17", int(t1), qy_msg_id(t1)))
    gate.publish(topic, first)
    # The camera simulator's shape: milliseconds, vehicle type, inline pictures.
    t2 = now - 28.3
    car2 = qy_result("京AY6620", int(t2 * 1000), qy_msg_id(t2), "黄色", vehicle_type="小型车", confidence=96)
    car2 |= {"local_time": datetime.fromtimestamp(t2, CHINA).strftime("%Y-%m-%d %H:%M:%S"), "full_pic": image()}
    car2 |= {"plate_pic": image(2000), "trigger_type": "hwtrigger", "plate_val": True}
    gate.publish(topic, car2)
    # All values as strings (one integration's VO): a new-energy plate in 渐变绿.
    t3 = now - 27.9
    car3 = qy_result("京AF12345", str(int(t3 * 1000)), qy_msg_id(t3), "渐变绿", vehicle_type="未知", confidence="95")
    gate.publish(topic, car3)
    # 断网续传: a car from two hours ago, re-sent twice; then the first car re-sent as offline too.
    t4 = now - 2 * 3600 - 0.25
    resend = qy_result("京AM5563", int(t4 * 1000), qy_msg_id(t4), type="offline")
    gate.publish(topic, resend)
    gate.publish(topic, resend)
    gate.publish(topic, json.loads(first) | {"type": "offline"})
    # Not reads: the heartbeat (sic), the split picture upload, our own answer echoed back.
    gate.publish(topic, {"cmd": "mqtt_herat", "msg_id": qy_msg_id(now), "sn": QY_SN})
    gate.publish(topic, {"cmd": "image_result", "sn": QY_SN, "utc_ts": int(t2 * 1000), "full_pic": image()})
    gate.publish(topic, {"cmd": "result_rsp", "msg_id": json.loads(first)["msg_id"], "status": "ok"})
    # 无牌车: the protocol's string "null".
    gate.publish(topic, qy_result("null", int(now - 25), qy_msg_id(now - 25), "未知"))
    # A camera on the custom qymqtt topic.
    t5 = now - 24.1
    closing = gate.publish(
        f"/qymqtt/{QY_POST_SN}/qymqttpost", qy_result("京AU7710", int(t5), qy_msg_id(t5), "白色", sn=QY_POST_SN)
    )

    rows = gate.rows_after(since, closing)
    assert_journal_and_sandbox(
        gate,
        rows,
        [
            entry("qy-aiot", "京AQ3K17", "BLUE", "SMALL", "Q1", t1),
            entry("qy-aiot", "京AY6620", "YELLOW", "SMALL", "Q1", t2),
            entry("qy-aiot", "京AF12345", "GREEN", "SMALL", "Q1", t3),
            entry("qy-aiot", "京AM5563", "BLUE", "SMALL", "Q1", t4),
            rejected("qy-aiot", "no_plate"),
            entry("qy-post", "京AU7710", "WHITE", "UNKNOWN", "Q2", t5),
        ],
    )


# -- Hikvision 海康威视 --------------------------------------------------------------------------------


def test_hikvision_xml_and_json_alerts_lanes_history_and_heartbeats(gate: Gate) -> None:
    since, now = gate.last_id(), time.time()
    topic = "hikvision/gate-1/anpr"

    # The DS-TCG405-E alert with its colour character, delivered twice, then re-uploaded (activePostCount).
    t1, uuid1 = now - 40.25, hik_uuid()
    first = gate.publish(topic, hik_xml("蓝浙AX7P31", t1, uuid1, plateColor="blue"))
    gate.publish(topic, first)
    gate.publish(topic, hik_xml("蓝浙AX7P31", t1, uuid1, plateColor="blue", activePostCount="2"))
    # Lane 2 is the lorry lane: colour only from the 黄 character, a truck.
    t2 = now - 38.5
    gate.publish(topic, hik_xml("黄浙B5G372", t2, hik_uuid(), line="2", vehicleType="truck"))
    # JSON: a new-energy plate with its 绿 character.
    t3 = now - 37
    gate.publish(topic, hik_json("绿浙AD08815", t3, hik_uuid(), plateColor="newEnergyGreen", line="1"))
    # 历史数据: an hour-old passage uploaded after an outage, uploaded again.
    t4, uuid4 = now - 3600, hik_uuid()
    history = hik_json("蓝浙CK2210", t4, uuid4, alarmDataType="1", line="1")
    gate.publish(topic, history)
    gate.publish(topic, history | {"activePostCount": "2"})
    # Not reads: the videoloss heartbeat, an inactive ANPR alert, a motion event.
    gate.publish(topic, sample("hikvision", "xml-videoloss-inactive-heartbeat-ignored"))
    gate.publish(topic, hik_xml("蓝浙AX7P31", now, hik_uuid(), eventState="inactive"))
    gate.publish(topic, hik_json("蓝浙AX7P32", now, hik_uuid()) | {"eventType": "VMD"})
    # No plate: noPlate in XML, the literal 车牌 in JSON.
    gate.publish(topic, hik_xml("noPlate", now - 35, hik_uuid()))
    gate.publish(topic, hik_json("车牌", now - 34, hik_uuid(), confidenceLevel="0", line="2"))
    t5 = now - 33
    closing = gate.publish(
        topic, hik_json("黄浙E3M901", t5, hik_uuid(), plateColor="yellow", line="2", vehicleInfo={"vehicleType": "2"})
    )

    rows = gate.rows_after(since, closing)
    assert_journal_and_sandbox(
        gate,
        rows,
        [
            entry("hik", "浙AX7P31", "BLUE", "SMALL", "H1", t1),
            entry("hik", "浙B5G372", "YELLOW", "LARGE", "H2", t2),
            entry("hik", "浙AD08815", "GREEN", "SMALL", "H1", t3),
            entry("hik", "浙CK2210", "BLUE", "SMALL", "H1", t4),
            rejected("hik", "no_plate"),
            rejected("hik", "no_plate"),
            entry("hik", "浙E3M901", "YELLOW", "LARGE", "H2", t5),
        ],
    )


# -- Frigate -----------------------------------------------------------------------------------------


def test_frigate_events_and_lpr_updates_give_one_entry_per_pass(gate: Gate) -> None:
    since, now = gate.last_id(), time.time()
    lpr, evt = "frigate/tracked_object_update", "frigate/events"

    # Car A at gate_east: the object appears, OCR reads the plate, refines it, and the object ends.
    # Frigate 0.16+ sends `recognized_license_plate` as [plate, score] on frigate/events.
    ta, car_a = now - 50.3, frigate_id(now - 53)
    gate.publish(evt, fr_event("new", car_a, "gate_east", ta - 1))
    gate.publish(lpr, fr_lpr(car_a, "粤B9GX7L", ta, "gate_east"))
    gate.publish(lpr, fr_lpr(car_a, "粤B9GX74", ta + 0.8, "gate_east", 0.94))
    gate.publish(evt, fr_event("update", car_a, "gate_east", ta + 1, ["粤B9GX74", 0.94]))
    gate.publish(lpr, fr_lpr(car_a, "粤B9GX74", ta + 2.5, "gate_east", 0.96))  # standing at the barrier
    gate.publish(evt, fr_event("end", car_a, "gate_east", ta + 3, ["粤B9GX74", 0.96]))

    # Car B at gate_west, seen on frigate/events only: a new-energy plate.
    tb, car_b = now - 45.6, frigate_id(now - 48)
    gate.publish(evt, fr_event("new", car_b, "gate_west", tb - 1))
    gate.publish(evt, fr_event("update", car_b, "gate_west", tb, ["粤BD33221", 0.9]))
    end_b = gate.publish(evt, fr_event("end", car_b, "gate_west", tb + 2, ["粤BD33221", 0.93]))
    gate.publish(evt, end_b)  # the same message twice

    # Car C at gate_east, lpr updates only: a partial first read, then the plate, then again.
    tc, car_c = now - 44.2, frigate_id(now - 46)
    gate.publish(lpr, fr_lpr(car_c, "粤B5K", tc - 0.5, "gate_east", 0.6))
    plate_c = gate.publish(lpr, fr_lpr(car_c, "粤B5K2Q8", tc, "gate_east"))
    gate.publish(lpr, plate_c)
    gate.publish(lpr, fr_lpr(car_c, "粤B5K2Q8", tc + 2, "gate_east", 0.97))

    # Not plate reads: a person's events, a description and a face update.
    person = frigate_id(now - 43)
    for kind in ("new", "update", "end"):
        gate.publish(evt, fr_event(kind, person, "gate_east", now - 42, label="person"))
    gate.publish(lpr, sample("frigate", "tracked-object-update-description-ignored"))
    gate.publish(lpr, sample("frigate", "tracked-object-update-face-ignored"))

    td = now - 40.9
    closing = gate.publish(lpr, fr_lpr(frigate_id(now - 42), "粤BR0770", td, "gate_west"))

    rows = gate.rows_after(since, closing)
    # Frigate carries no colour: only the 8-character new-energy plate becomes green.
    assert_journal_and_sandbox(
        gate,
        rows,
        [
            entry("fr-lpr", "粤B9GX7L", "UNKNOWN", "UNKNOWN", "F1", ta),  # the first valid read of the pass wins
            entry("fr-events", "粤BD33221", "GREEN", "SMALL", "F2", tb),
            rejected("fr-lpr", "invalid_plate", "粤B5K"),
            entry("fr-lpr", "粤B5K2Q8", "UNKNOWN", "UNKNOWN", "F1", tc),
            entry("fr-lpr", "粤BR0770", "UNKNOWN", "UNKNOWN", "F2", td),
        ],
    )


# -- the reference's samples exactly as published --------------------------------------------------------


def test_verbatim_samples_become_entries_at_the_agents_time(gate: Gate) -> None:
    """Unchanged samples carry capture times years old and are no re-sends: the entry time is now."""
    since, before = gate.last_id(), int(time.time())
    vz_mqtt, vz_http_body = "mqtt-official-sample-base64-envelope", "http-push-oem-sample-plain-utf8"
    gate.publish(f"device/{VZ_DEVICE_SN}/message/up/ivs_result", sample("vzenith", vz_mqtt))
    gate.publish(f"{VZ_SN_FIRST_SN}/device/message/up/ivs_result", sample("vzenith", vz_http_body))
    gate.publish(f"aiot/plate/{QY_SN}", sample("qianyi", "third-party-fixture-sample"))
    gate.publish("hikvision/gate-1/anpr", sample("hikvision", "xml-ds-tcg405e-sample-colour-prefix"))
    gate.publish("frigate/tracked_object_update", sample("frigate", "tracked-object-update-lpr-doc-sample"))
    closing = gate.publish("frigate/events", sample("frigate", "events-update-with-recognized-plate"))

    rows = gate.rows_after(since, closing)
    after = time.time() + 1
    entries = [row for row in rows if row["state"] != "rejected"]
    assert all(before <= row["enter_timestamp"] <= after for row in entries), (before, entries, after)
    assert {row["time_source"] for row in entries} == {"agent"}
    at = {row["plate_number"]: row["enter_timestamp"] for row in entries}
    assert_journal_and_sandbox(
        gate,
        rows,
        [
            entry("vz-device", "赣GZ7S13", "BLUE", "SMALL", "V2", at.get("赣GZ7S13", 0)),
            entry("vz-snfirst", "鲁VF0050", "BLUE", "SMALL", "V3", at.get("鲁VF0050", 0)),
            entry("qy-aiot", "京A12345", "BLUE", "SMALL", "Q1", at.get("京A12345", 0)),
            entry("hik", "浙AX2P12", "BLUE", "SMALL", "H1", at.get("浙AX2P12", 0)),
            rejected("fr-lpr", "invalid_plate", "123ABC"),  # a US plate is no mainland plate: never sent
            entry("fr-events", "粤B12345", "UNKNOWN", "UNKNOWN", "F1", at.get("粤B12345", 0)),
        ],
    )


# -- edgeagent simulate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("camera", "plate", "color", "want_color", "want_type", "entrance"),
    [
        ("vz-device", "苏E2M6K0", "blue", "BLUE", "SMALL", "V2"),
        ("vz-snfirst", "苏E7N313", "PLATE_COLOR_BLACK", "BLACK", "UNKNOWN", "V3"),
        ("qy-aiot", "苏E8T771", "yellow", "YELLOW", "LARGE", "Q1"),
        ("qy-post", "苏E6W028", "white", "WHITE", "UNKNOWN", "Q2"),
        ("hik", "苏ED20713", "green", "GREEN", "SMALL", "H1"),
        ("fr-lpr", "苏EK5520", "blue", "UNKNOWN", "UNKNOWN", "F1"),  # Frigate carries no colour
        ("fr-lpr", "苏EF88620", "green", "GREEN", "SMALL", "F1"),  # ...an 8-character plate is green
    ],
)
def test_simulate_publishes_in_the_cameras_own_format(
    gate: Gate, camera: str, plate: str, color: str, want_color: str, want_type: str, entrance: str
) -> None:
    before = int(time.time())
    result = run_cli("simulate", "--config", str(gate.config), "--camera", camera, "--plate", plate, "--color", color)
    assert result.returncode == 0, result.stderr
    assert "acknowledged by the broker" in result.stdout

    def accepted() -> dict[str, Any] | None:
        return next((body for body in gate.sandbox.accepted() if body["plate_number"] == plate), None)

    body = eventually(accepted, timeout=30, what=f"the sandbox accepted {plate}")
    assert body is not None
    assert (body["plate_color"], body["vehicle_type"], body["entrance_number"]) == (
        f"PLATE_COLOR_{want_color}",
        f"VEHICLE_TYPE_{want_type}",
        entrance,
    )
    assert before <= body["enter_timestamp"] <= time.time() + 1
    [row] = [row for row in events(gate.config) if row["plate_number"] == plate]
    assert (row["camera"], row["state"]) == (camera, "sent")
