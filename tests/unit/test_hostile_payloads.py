"""Issue 12: payloads an attacker with a camera account sends, one rejected row and one log line each."""

from __future__ import annotations

import json
import logging

import pytest

from edgeagent import decoders
from edgeagent.cli import terminal_safe
from edgeagent.errors import DecodeError
from edgeagent.model import Entry, PlateRead, Reason
from edgeagent.pipeline import Pipeline
from tests.unit.test_pipeline import SOUTH, config, pipeline, process, rejection  # noqa: F401

HOSTILE = {
    "deep JSON": b"[" * 100_000,
    "deep JSON object": b'{"a":' * 100_000,
    "4,301-digit integer": b'{"plate": "\xe7\xb2\xa4B12345", "time": ' + b"1" * 4301 + b"}",
    "empty XML alert": b"<EventNotificationAlert/>",
    "empty XML alert, namespaced": b'<EventNotificationAlert xmlns="http://www.hikvision.com/ver20/XMLSchema"/>',
}


@pytest.mark.parametrize("fmt", decoders.KNOWN_FORMATS)
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_payloads_are_decode_errors_in_every_format(fmt: str, name: str) -> None:
    try:
        decoders.decode(fmt, "hikvision/x/anpr", HOSTILE[name])
    except DecodeError as exc:
        assert exc.reason in (Reason.MALFORMED, Reason.BAD_FIELD, Reason.NOT_UTF8), exc
    # (a format may also ignore it: XML is not JSON to the JSON-only decoders, which say so)


def test_an_empty_hikvision_alert_names_the_missing_field() -> None:
    with pytest.raises(DecodeError) as info:
        decoders.decode("hikvision", "hik/x", b"<EventNotificationAlert/>")
    assert info.value.field == "EventNotificationAlert.eventType"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lane", "\x1b]0;pwned\x07"),
        ("lane", "1" * 65),
        ("lane", "lane 1"),
    ],
)
def test_vendor_lane_and_record_ids_are_capped_by_length_and_characters(
    pipeline: Pipeline,  # noqa: F811
    field: str,
    value: str,
) -> None:
    r = rejection(process(pipeline, SOUTH, {"plate": "粤B12345", field: value}))
    assert r.reason is Reason.BAD_FIELD
    assert "\x1b" not in r.detail and "\n" not in r.detail and "\x07" not in r.detail
    assert len(r.detail) < 200
    assert r.lane is None


@pytest.mark.parametrize("value", ["x" * 129, "id\x1b[2J", "a\nb", "粤C00001"])
def test_an_odd_record_id_never_loses_the_car_and_never_reaches_the_journal(pipeline: Pipeline, value: str) -> None:  # noqa: F811
    first = process(pipeline, SOUTH, {"plate": "粤B12345", "event_id": value}).outcome
    again = process(pipeline, SOUTH, {"plate": "粤B12345", "event_id": value, "confidence": 0.9}).outcome
    assert isinstance(first, Entry) and isinstance(again, Entry)
    assert first.dedup_key == again.dedup_key  # a redelivery of the same read is still recognised
    assert value not in first.dedup_key and "\x1b" not in first.dedup_key and len(first.dedup_key) < 80


def test_real_vendor_ids_pass(pipeline: Pipeline) -> None:  # noqa: F811
    for lane, record in (("1", "c7f1e2"), ("gate_west", "1718000000.123456-ab12cd"), ("12", "265e1040-85e01fb7:42")):
        process(pipeline, SOUTH, {"plate": "粤B12345", "lane": lane, "event_id": record})
        assert decoders.LANE_RE.fullmatch(lane) and decoders.RECORD_ID_RE.fullmatch(record)


def test_a_decoder_failure_is_one_log_line_not_a_traceback(
    pipeline: Pipeline,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(topic: str, payload: bytes) -> PlateRead:
        raise KeyError("a bug in a decoder")

    monkeypatch.setitem(decoders.REGISTRY, "generic", broken)
    with caplog.at_level(logging.DEBUG, logger="edgeagent"):
        r = rejection(process(pipeline, SOUTH, {"plate": "粤B12345"}))
    assert r.reason is Reason.MALFORMED
    [record] = [rec for rec in caplog.records if rec.name == "edgeagent.pipeline"]
    assert record.exc_info is None and "\n" not in record.getMessage()
    assert record.getMessage().startswith("decoder_failed format=generic topic='anpr/south-1/plate' error=KeyError")


def test_terminal_safe_shows_control_characters_instead_of_sending_them() -> None:
    shown = terminal_safe("粤B12345 \x1b]0;pwned\x07 \x9b2J\r\n")
    assert shown == "粤B12345 \\x1b]0;pwned\\x07 \\x9b2J\\x0d\\x0a"
    assert json.loads(json.dumps("\x1b")) == "\x1b"  # --json output escapes by itself
