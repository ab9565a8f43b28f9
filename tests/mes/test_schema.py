"""MES frame schema v1: every refusal reason, both message forms. Pure: no services."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from orchestrator.mes_schema import (
    FRAME_TYPE,
    FrameRequest,
    InlineImage,
    InvalidMessage,
    ObjectRef,
    build_envelope,
    parse_envelope,
)

IMG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # bytes only: the schema does not decode images
SHA = hashlib.sha256(IMG).hexdigest()
LIMIT = 4096
JSON = "application/json"


def envelope(**over: Any) -> dict[str, Any]:
    env = build_envelope(frame_id="f-1", source="mes://plant/line/3/station/2", line="3", station="2",
                         category="pcb1", serial="SN-1", time="2024-05-01T10:00:00Z",
                         image={"inline": base64.b64encode(IMG).decode(), "sha256": SHA})
    for path, value in over.items():  # "data__image__uri" -> env["data"]["image"]["uri"]
        *parents, leaf = path.split("__")
        node = env
        for p in parents:
            node = node[p]
        if value is _DROP:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return env


_DROP = object()


def parse(env: Any, content_type: str | None = JSON, headers: dict | None = None, limit: int = LIMIT) -> FrameRequest:
    body = env if isinstance(env, bytes) else json.dumps(env).encode()
    return parse_envelope(body, content_type, headers or {}, max_inline_bytes=limit)


def refused(fragment: str, env: Any, **kw: Any) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse(env, **kw)
    assert fragment in info.value.reason, info.value.reason


def test_valid_inline_envelope() -> None:
    req = parse(envelope())
    assert (req.frame_id, req.line, req.station, req.category, req.serial) == ("f-1", "3", "2", "pcb1", "SN-1")
    assert req.image == InlineImage(IMG, SHA)
    assert req.time is not None and req.time.utcoffset() is not None
    assert req.source == "mes://plant/line/3/station/2"


def test_valid_object_reference_and_optional_fields() -> None:
    env = envelope(data__image={"uri": "s3://inspect/incoming/3/a.png", "sha256": SHA.upper()},
                   time=_DROP, subject=_DROP, data__serial=None)
    req = parse(env, content_type="application/cloudevents+json; charset=utf-8")
    assert req.image == ObjectRef(key="incoming/3/a.png", sha256=SHA, bucket="inspect")
    assert req.time is None and req.serial is None
    assert parse(envelope(data__image={"uri": "incoming/a.png", "sha256": SHA})).image.bucket is None


def test_subject_fills_serial_and_unknown_fields_are_ignored() -> None:
    req = parse(envelope(data__serial=_DROP, data__recipe={"exposure": 3}, extension_attr="x"))
    assert req.serial == "SN-1"


def test_no_content_type_is_json_unless_raw_headers() -> None:
    assert parse(envelope(), content_type=None).frame_id == "f-1"


@pytest.mark.parametrize(("body", "fragment"), [
    (b"", "empty message body"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"{not json", "not valid JSON"),
    (b'{"id": 1, "id": 2}', "duplicate JSON key 'id'"),
    (b'{"x": NaN}', "JSON constant NaN"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'"text"', "must be a JSON object, got str"),
])
def test_malformed_bodies(body: bytes, fragment: str) -> None:
    refused(fragment, body)


def test_deeply_nested_json() -> None:
    refused("not valid JSON", b"[" * 100_000 + b"]" * 100_000, limit=1 << 20)


def test_oversized_envelope() -> None:
    refused("above the envelope limit", b" " * (LIMIT * 2 + 70_000))


@pytest.mark.parametrize(("over", "fragment"), [
    ({"specversion": _DROP}, "missing required field 'specversion'"),
    ({"specversion": "0.3"}, "unsupported specversion '0.3'"),
    ({"specversion": 1.0}, "unsupported specversion 1.0"),
    ({"type": _DROP}, "missing required field 'type'"),
    ({"type": "com.inspect.frame.v2"}, "unsupported schema version 'v2'"),
    ({"type": "com.example.other"}, "unexpected type 'com.example.other'"),
    ({"datacontenttype": "text/xml"}, "datacontenttype"),
    ({"id": _DROP}, "missing required field 'id'"),
    ({"id": ""}, "field 'id' is empty"),
    ({"id": 42}, "field 'id' must be a string, got int"),
    ({"id": "x" * 257}, "above the limit of 256"),
    ({"id": "f\x00-1"}, "control or non-printable"),
    ({"id": "f-1\n"}, "control or non-printable"),
    ({"id": " f-1"}, "leading or trailing whitespace"),
    ({"source": _DROP}, "missing required field 'source'"),
    ({"source": ["a"]}, "field 'source' must be a string, got list"),
    ({"time": "yesterday"}, "not an RFC 3339 timestamp"),
    ({"time": "2024-05-01T10:00:00"}, "no UTC offset"),
    ({"subject": "SN-2"}, "'subject' 'SN-2' and 'data.serial' 'SN-1' disagree"),
    ({"data": _DROP}, "missing required field 'data'"),
    ({"data": "x"}, "field 'data' must be an object, got str"),
    ({"data__line": _DROP}, "missing required field 'data.line'"),
    ({"data__line": 3}, "field 'data.line' must be a string, got int"),
    ({"data__line": "3.1"}, "must match [A-Za-z0-9_-]{1,64}"),
    ({"data__line": "#"}, "routing-key word"),
    ({"data__line": "l" * 65}, "above the limit of 64"),
    ({"data__station": _DROP}, "missing required field 'data.station'"),
    ({"data__station": "st*"}, "routing-key word"),
    ({"data__category": _DROP}, "missing required field 'data.category'"),
    ({"data__category": True}, "must be a string, got bool"),
    ({"data__category": "c" * 129}, "above the limit of 128"),
    ({"data__category": "pcb\x1b[31m"}, "control or non-printable"),
    ({"data__serial": 1234}, "field 'data.serial' must be a string, got int"),
    ({"data__serial": "SN\u2028"}, "control or non-printable"),
    ({"data__image": _DROP}, "missing required field 'data.image'"),
    ({"data__image": "aGVsbG8="}, "field 'data.image' must be an object, got str"),
    ({"data__image__uri": "k"}, "has both 'inline' and 'uri'"),
    ({"data__image": {"sha256": SHA}}, "has neither 'inline' nor 'uri'"),
    ({"data__image__inline": "!!!notbase64"}, "not valid base64"),
    ({"data__image__inline": "YWJj\nZGVm"}, "not valid base64"),
    ({"data__image__inline": 12}, "must be a base64 string, got int"),
    ({"data__image__inline": ""}, "inline image is empty"),
    ({"data__image__inline": base64.b64encode(b"x" * (LIMIT + 1)).decode()}, "above the inline limit of 4096"),
    ({"data__image__sha256": "abc"}, "must be 64 hexadecimal characters"),
    ({"data__image__sha256": "g" * 64}, "must be 64 hexadecimal characters"),
    ({"data__image__sha256": "0" * 64}, "sha256 mismatch"),
    ({"data__image__content_type": 5}, "data.image.content_type' must be a string"),
])
def test_envelope_refusals(over: dict[str, Any], fragment: str) -> None:
    refused(fragment, envelope(**over))


@pytest.mark.parametrize(("image", "fragment"), [
    ({"uri": "incoming/a.png"}, "'data.image.sha256' (mandatory with 'uri')"),
    ({"uri": "http://host/a.png", "sha256": SHA}, "unsupported scheme 'http'"),
    ({"uri": "s3:///a.png", "sha256": SHA}, "names no bucket"),
    ({"uri": "s3://b/", "sha256": SHA}, "invalid object key"),
    ({"uri": "/etc/passwd", "sha256": SHA}, "invalid object key"),
    ({"uri": "a/../../b.png", "sha256": SHA}, "invalid object key"),
    ({"uri": "a//b.png", "sha256": SHA}, "invalid object key"),
    ({"uri": "a\\b.png", "sha256": SHA}, "invalid object key"),
    ({"uri": "k" * 1200, "sha256": SHA}, "above the limit"),
])
def test_object_reference_refusals(image: dict[str, Any], fragment: str) -> None:
    refused(fragment, envelope(data__image=image))


def test_unsupported_content_type() -> None:
    refused("unsupported content type 'text/plain'", envelope(), content_type="text/plain")


# --- raw-body mode ------------------------------------------------------------------------

RAW_HEADERS = {"x-frame-id": "r-1", "x-line": "3", "x-station": "2", "x-category": "pcb1", "x-serial": "SN-9"}


def test_raw_body() -> None:
    req = parse(IMG, content_type="image/png", headers=dict(RAW_HEADERS, **{"x-sha256": SHA}))
    assert (req.frame_id, req.line, req.station, req.category, req.serial) == ("r-1", "3", "2", "pcb1", "SN-9")
    assert req.image == InlineImage(IMG, SHA) and req.source == "amqp" and req.time is None
    bytes_headers = {k: v.encode() for k, v in RAW_HEADERS.items()}
    assert parse(IMG, content_type="application/octet-stream", headers=bytes_headers).frame_id == "r-1"
    assert parse(IMG, content_type=None, headers=RAW_HEADERS).frame_id == "r-1"


@pytest.mark.parametrize(("over", "body", "fragment"), [
    ({"x-frame-id": None}, IMG, "missing required field 'header x-frame-id'"),
    ({"x-line": None}, IMG, "missing required field 'header x-line'"),
    ({"x-line": 3}, IMG, "header x-line' must be a string, got int"),
    ({"x-station": "a.b"}, IMG, "routing-key word"),
    ({"x-category": None}, IMG, "missing required field 'header x-category'"),
    ({"x-serial": "SN\x07"}, IMG, "control or non-printable"),
    ({"x-line": b"\xff"}, IMG, "header 'x-line' is not UTF-8"),
    ({"x-time": "noon"}, IMG, "not an RFC 3339 timestamp"),
    ({"x-sha256": "1" * 64}, IMG, "sha256 mismatch"),
    ({}, b"", "empty message body"),
    ({}, b"x" * (LIMIT + 1), "raw image body is 4097 bytes, above the inline limit"),
])
def test_raw_refusals(over: dict[str, Any], body: bytes, fragment: str) -> None:
    headers = {k: v for k, v in {**RAW_HEADERS, **over}.items() if v is not None}
    refused(fragment, body, content_type="image/png", headers=headers)


def test_frame_type_constant() -> None:
    assert FRAME_TYPE == "com.inspect.frame.v1"
