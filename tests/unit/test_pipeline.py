"""The pipeline (size cap → decode → route → screen) over a parsed config: what the journal will receive."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from edgeagent import decoders
from edgeagent.config import CameraConfig, Config, load
from edgeagent.model import (
    REJECTED_PAYLOAD_CAP,
    Entry,
    Ignored,
    PlateColor,
    PlateRead,
    Reason,
    Rejection,
    TimeSource,
    VehicleType,
)
from edgeagent.pipeline import Pipeline, Processed, dedup_key, record_scope, redact
from edgeagent.routing import Router
from edgeagent.screening import CarTypeLists
from tests.unit.test_config import MQTT, config_text, key_files

NOW = 1_720_078_200.0
SOUTH, NORTH = "anpr/south-1/plate", "anpr/north-1/lane"
CAP = 4096


@pytest.fixture
def config(tmp_path: Path) -> Config:
    key, pub = key_files(tmp_path / "keys")
    path = tmp_path / "edgeagent.toml"
    path.write_text(config_text(key, pub, mqtt=MQTT + f"max_payload_bytes = {CAP}\n"), encoding="utf-8")
    return load(path)


@pytest.fixture
def pipeline(config: Config) -> Pipeline:
    lists = CarTypeLists(config.parking.car_type_lists, config.parking.default_car_type)
    return Pipeline(config, Router.build(config), lists)


def process(pipeline: Pipeline, topic: str, payload: bytes | dict[str, Any], clock_synced: bool = True) -> Processed:
    data = json.dumps(payload, ensure_ascii=False).encode() if isinstance(payload, dict) else payload
    return pipeline.process(topic, data, received_at=NOW, now=NOW, clock_synced=clock_synced)


def rejection(processed: Processed) -> Rejection:
    assert isinstance(processed.outcome, Rejection), processed.outcome
    return processed.outcome


def entry(processed: Processed) -> Entry:
    assert isinstance(processed.outcome, Entry), processed.outcome
    return processed.outcome


def test_a_full_read_becomes_an_entry(pipeline: Pipeline) -> None:
    read = {"plate": "粤B12345", "color": "blue", "time": NOW - 10, "lane": 1, "vehicle_type": "small",
            "confidence": 0.97, "event_id": "c7f1e2"}  # fmt: skip
    processed = process(pipeline, SOUTH, read)
    e = entry(processed)
    assert (e.camera, e.lane, e.plate_number) == ("south-1", "1", "粤B12345")
    assert (e.plate_color, e.vehicle_type) == (PlateColor.BLUE, VehicleType.SMALL)
    assert (e.enter_timestamp, e.time_source) == (int(NOW - 10), TimeSource.CAMERA)
    assert (e.entrance_number, e.entrance_name) == ("A01", "南门入口")
    assert e.dedup_key == "south-1|id|c7f1e2"
    inbound = processed.inbound
    assert inbound.topic == SOUTH
    assert inbound.received_at == NOW
    assert inbound.payload_size == len(json.dumps(read, ensure_ascii=False).encode())
    assert inbound.payload_sha256 == hashlib.sha256(json.dumps(read, ensure_ascii=False).encode()).hexdigest()


def test_lane_specific_entrance_gets_its_discounts(pipeline: Pipeline) -> None:
    e = entry(process(pipeline, NORTH, {"plate": "京A00599", "lane": "1"}))
    assert (e.entrance_number, e.discount_template_id) == ("B01", (1001,))


def test_time_in_milliseconds_is_converted_to_seconds(pipeline: Pipeline) -> None:
    e = entry(process(pipeline, SOUTH, {"plate": "粤B12345", "time": int((NOW - 30) * 1000) + 123}))
    assert (e.enter_timestamp, e.time_source) == (int(NOW - 30), TimeSource.CAMERA)


def test_time_in_the_future_is_an_entry_at_the_agents_time(pipeline: Pipeline) -> None:
    # A wrong camera clock never loses an entry (SPEC §5): the car is reported with the agent's time.
    entry = process(pipeline, SOUTH, {"plate": "粤B12345", "time": NOW + 3600}).outcome
    assert isinstance(entry, Entry)
    assert (entry.plate_number, entry.enter_timestamp, entry.time_source) == ("粤B12345", int(NOW), TimeSource.AGENT)


# -- size cap and decode errors --------------------------------------------------------------------


def test_oversized_payload_is_rejected_unparsed(pipeline: Pipeline) -> None:
    valid_but_big = json.dumps({"plate": "粤B12345", "note": "x" * CAP}).encode()
    rej = rejection(process(pipeline, SOUTH, valid_but_big))
    assert rej.reason is Reason.TOO_LARGE
    assert rej.camera == "south-1"
    assert f"{len(valid_but_big)} bytes > max_payload_bytes {CAP}" in rej.detail


def test_payload_exactly_at_the_cap_is_read(pipeline: Pipeline) -> None:
    head = b'{"plate": "\xe7\xb2\xa4B12345", "note": "'
    payload = head + b"x" * (CAP - len(head) - 2) + b'"}'
    assert len(payload) == CAP
    assert entry(process(pipeline, SOUTH, payload)).plate_number == "粤B12345"


@pytest.mark.parametrize(
    ("payload", "reason", "detail"),
    [
        (b'{"plate": "\xe7\xb2\xa4B12345",', Reason.MALFORMED, "invalid JSON at line 1"),
        (b'[{"plate": "\xe7\xb2\xa4B12345"}]', Reason.MALFORMED, "expected a JSON object, got array"),
        (b"\xff\xfe\x00p\x00l\x00a\x00t\x00e", Reason.NOT_UTF8, "payload is not UTF-8"),
        (b'{"color": "blue"}', Reason.BAD_FIELD, "plate: missing"),
        (b'{"plate": "", "time": 1720078200}', Reason.NO_PLATE, "the camera read no plate"),
        (b'{"plate": "ABC\'; DROP TABLE x;--"}', Reason.INVALID_PLATE, "is not a mainland plate"),
        (b'{"plate": "\xe7\xb2\xa4B12345", "color": "purple"}', Reason.BAD_FIELD, "color: unknown color"),
        (b'{"plate": "\xe7\xb2\xa4B12345", "time": "yesterday"}', Reason.BAD_FIELD, "time: not an ISO 8601"),
    ],
)
def test_unreadable_reads_are_rejected_with_a_specific_reason(
    pipeline: Pipeline, payload: bytes, reason: Reason, detail: str
) -> None:
    rej = rejection(process(pipeline, SOUTH, payload))
    assert rej.reason is reason
    assert detail in rej.detail
    assert rej.camera == "south-1"
    assert rej.dedup_key == f"south-1|rej|{hashlib.sha256(payload).hexdigest()}"


def test_topic_of_no_camera_is_rejected(pipeline: Pipeline) -> None:
    rej = rejection(process(pipeline, "anpr/west-9/plate", {"plate": "粤B12345"}))
    assert rej.reason is Reason.UNKNOWN_CAMERA
    assert rej.camera is None
    assert "anpr/west-9/plate" in rej.detail


@pytest.mark.parametrize("lane", ["2", None])
def test_unknown_lane_is_rejected_and_keeps_the_lane(pipeline: Pipeline, lane: str | None) -> None:
    rej = rejection(process(pipeline, NORTH, {"plate": "粤B12345", "lane": lane}))
    assert rej.reason is Reason.UNMAPPED_LANE
    assert (rej.camera, rej.lane) == ("north-1", lane)
    assert "maps to no [[entrances]]" in rej.detail


# -- dedup keys ------------------------------------------------------------------------------------


def test_vendor_record_id_makes_the_key(pipeline: Pipeline) -> None:
    first = entry(process(pipeline, SOUTH, {"plate": "粤B12345", "event_id": "e1", "confidence": 0.9}))
    again = entry(process(pipeline, SOUTH, {"plate": "粤B12345", "event_id": "e1", "confidence": 0.8}))
    assert first.dedup_key == again.dedup_key == "south-1|id|e1"
    other_camera = entry(process(pipeline, NORTH, {"plate": "粤B12345", "event_id": "e1", "lane": 1}))
    assert other_camera.dedup_key == "north-1|id|e1"  # record ids are only unique per camera


def test_plate_and_capture_time_make_the_key_without_a_record_id(pipeline: Pipeline) -> None:
    first = entry(process(pipeline, SOUTH, {"plate": "粤B12345", "time": NOW - 5}))
    reordered = entry(process(pipeline, SOUTH, b'{"time": %d, "plate": "\xe7\xb2\xa4B12345"}' % int(NOW - 5)))
    assert first.dedup_key == reordered.dedup_key == f"south-1|t|粤B12345|{NOW - 5:.3f}"
    later = entry(process(pipeline, SOUTH, {"plate": "粤B12345", "time": NOW - 4}))
    assert later.dedup_key != first.dedup_key


def test_payload_digest_is_the_last_resort_key(pipeline: Pipeline) -> None:
    payload = b'{"plate": "\xe7\xb2\xa4B12345"}'
    e = entry(process(pipeline, SOUTH, payload))
    assert e.dedup_key == f"south-1|sha|{hashlib.sha256(payload).hexdigest()}"
    assert entry(process(pipeline, SOUTH, payload)).dedup_key == e.dedup_key


def test_frigate_record_ids_belong_to_the_frigate_instance_not_the_camera() -> None:
    # One pass is published under one id on both Frigate topics; two [[cameras]] for them share it.
    lpr = CameraConfig("fr-lpr", "frigate/tracked_object_update", "frigate", None)
    evt = CameraConfig("fr-events", "frigate/events", "frigate", None)
    assert record_scope(lpr, "frigate/tracked_object_update") == record_scope(evt, "frigate/events")
    assert record_scope(lpr, "nvr2/tracked_object_update") != record_scope(lpr, "frigate/tracked_object_update")
    vzenith = CameraConfig("vz", "device/+/message/up/ivs_result", "vzenith", None)
    assert record_scope(vzenith, "device/sn/message/up/ivs_result") == "vz"  # other vendors' ids are per camera


def test_dedup_key_precedence() -> None:
    full = PlateRead("粤B12345", captured_at=NOW, record_id="r9")
    assert dedup_key("c", full, "d") == "c|id|r9"
    assert dedup_key("c", PlateRead("粤B12345", captured_at=NOW), "d") == f"c|t|粤B12345|{NOW:.3f}"
    assert dedup_key("c", PlateRead(None, captured_at=NOW), "d") == "c|sha|d"  # no plate: time alone is not enough
    assert dedup_key("c", None, "d") == "c|sha|d"


def test_a_decoder_crash_is_a_rejected_read_not_a_dead_intake(pipeline: Pipeline, monkeypatch) -> None:
    """Wrap the real decoder to fail on one payload: that message is rejected, the next one still flows."""
    real = decoders.REGISTRY["generic"]

    def flaky(topic: str, payload: bytes) -> PlateRead | Ignored:
        if b"boom" in payload:
            raise TypeError("unexpected shape")
        return real(topic, payload)

    monkeypatch.setitem(decoders.REGISTRY, "generic", flaky)
    rej = rejection(process(pipeline, SOUTH, {"plate": "粤B12345", "boom": 1}))
    assert rej.reason is Reason.MALFORMED
    assert rej.detail == "generic decoder failed: TypeError: unexpected shape"
    assert entry(process(pipeline, SOUTH, {"plate": "粤B12345"})).plate_number == "粤B12345"


# -- redaction of what a rejected row keeps ----------------------------------------------------------


def test_inline_images_never_reach_the_excerpt(pipeline: Pipeline) -> None:
    image = base64.b64encode(bytes(range(256)) * 8).decode()  # 2732 characters of base64
    payload = json.dumps({"image": image, "plate": "粤B12345", "time": "yesterday"}).encode()
    processed = process(pipeline, SOUTH, payload)
    assert rejection(processed).reason is Reason.BAD_FIELD
    excerpt = processed.inbound.payload_excerpt
    assert image[:256].encode() not in excerpt
    assert b"<%d bytes of base64 omitted>" % len(image) in excerpt
    assert b'"plate": "' in excerpt  # the rest stays readable
    assert processed.inbound.payload_size == len(payload)  # size and digest describe the real message
    assert processed.inbound.payload_sha256 == hashlib.sha256(payload).hexdigest()


def test_excerpt_is_capped() -> None:
    text = b'{"note": "' + b"word " * 10_000 + b'"}'
    excerpt = redact(text)
    assert len(excerpt) == REJECTED_PAYLOAD_CAP
    assert excerpt == text[:REJECTED_PAYLOAD_CAP]


def test_json_escaped_base64_is_redacted_too() -> None:
    escaped = b"iVBORw0KGgo\\/" * 40  # JSON may escape "/" as "\/"
    assert redact(b'{"pic": "' + escaped + b'"}') == b'{"pic": "<%d bytes of base64 omitted>"}' % len(escaped)


def test_short_tokens_are_not_redacted() -> None:
    payload = b'{"plate": "\xe7\xb2\xa4B12345", "event_id": "' + b"a" * 255 + b'"}'
    assert redact(payload) == payload
