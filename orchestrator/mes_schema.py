"""MES frame messages, schema v1: parse and validate, no I/O.

Two forms are accepted on the ``frames`` exchange:

* a JSON envelope in the spirit of CloudEvents 1.0 (structured mode), ``type`` = ``FRAME_TYPE``,
  whose ``data`` names line, station, category, serial and the image (inline base64 up to a
  limit, or an object-store reference with its SHA-256);
* a raw image body (``image/*`` or ``application/octet-stream``) with the same fields in AMQP
  headers (``RAW_HEADERS``), for cameras that cannot build JSON.

Every refusal raises ``InvalidMessage`` with a reason an integrator can act on: the reason is
recorded in the database and travels with the dead-lettered message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

FRAME_TYPE = "com.inspect.frame.v1"
_TYPE_PREFIX = "com.inspect.frame."
SPECVERSION = "1.0"
JSON_CONTENT_TYPES = frozenset({"application/json", "application/cloudevents+json"})
RAW_HEADERS = {  # AMQP header -> field (x-frame-id, x-line, x-station, x-category required)
    "x-frame-id": "id", "x-line": "line", "x-station": "station", "x-category": "category",
    "x-serial": "serial", "x-source": "source", "x-time": "time", "x-sha256": "sha256",
}
RAW_DEFAULT_SOURCE = "amqp"

# Line and station names become routing-key words (line.<line>.<station>): no dots, no wildcards.
NAME_PATTERN = "[A-Za-z0-9_-]{1,64}"
_NAME = re.compile(NAME_PATTERN)
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
MAX_ID = 256  # inspections.frame_id is String(256)
MAX_SERIAL = 256
MAX_CATEGORY = 128
MAX_SOURCE = 1024
MAX_KEY = 1024
# Room for the envelope around the base64 payload: attributes, data fields, a recipe.
ENVELOPE_OVERHEAD = 64 * 1024


class InvalidMessage(ValueError):
    """A message the intake refuses; ``reason`` says exactly why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class InlineImage:
    data: bytes
    sha256: str | None = None  # checked against data when given


@dataclass(frozen=True)
class ObjectRef:
    key: str
    sha256: str  # mandatory: the intake verifies the bytes it fetches
    bucket: str | None = None  # from s3://bucket/key; None = the intake's own bucket


@dataclass(frozen=True)
class FrameRequest:
    frame_id: str
    line: str
    station: str
    category: str
    serial: str | None
    image: InlineImage | ObjectRef
    time: datetime | None
    source: str


def _show(value: Any) -> str:
    text = repr(value)  # repr escapes control characters: safe to log and store
    return text if len(text) <= 80 else text[:77] + "..."


def opt_text(value: Any, field: str, *, max_len: int) -> str | None:
    """None stays None; anything else must be a clean printable string."""
    return None if value is None else req_text(value, field, max_len=max_len)


def req_text(value: Any, field: str, *, max_len: int) -> str:
    if value is None:
        raise InvalidMessage(f"missing required field '{field}'")
    if not isinstance(value, str):
        raise InvalidMessage(f"field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidMessage(f"field '{field}' is empty")
    if len(value) > max_len:
        raise InvalidMessage(f"field '{field}' is {len(value)} characters long, above the limit of {max_len}")
    if not value.isprintable():
        raise InvalidMessage(f"field '{field}' contains control or non-printable characters: {_show(value)}")
    if value.strip() != value:
        raise InvalidMessage(f"field '{field}' has leading or trailing whitespace: {_show(value)}")
    return value


def name_field(value: Any, field: str) -> str:
    text = req_text(value, field, max_len=64)
    if not _NAME.fullmatch(text):
        raise InvalidMessage(f"field '{field}' value {_show(text)} must match {NAME_PATTERN} "
                             "(it becomes a routing-key word)")
    return text


def _sha_field(value: Any, field: str) -> str | None:
    text = opt_text(value, field, max_len=64)
    if text is not None and not _HEX64.fullmatch(text):
        raise InvalidMessage(f"field '{field}' must be 64 hexadecimal characters, got {_show(text)}")
    return text.lower() if text else None


def _time_field(value: Any, field: str) -> datetime | None:
    text = opt_text(value, field, max_len=64)
    if text is None:
        return None
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidMessage(f"field '{field}' is not an RFC 3339 timestamp: {_show(text)}") from None
    if stamp.tzinfo is None:
        raise InvalidMessage(f"field '{field}' has no UTC offset (write 'Z' or '+01:00'): {_show(text)}")
    return stamp


def _check_inline(data: bytes, sha256: str | None, max_inline_bytes: int, what: str) -> InlineImage:
    if not data:
        raise InvalidMessage(f"{what} is empty")
    if len(data) > max_inline_bytes:
        raise InvalidMessage(f"{what} is {len(data)} bytes, above the inline limit of {max_inline_bytes}; "
                             "upload the image to the object store and send a reference")
    if sha256 is not None:
        actual = sha256_hex(data)
        if actual != sha256:
            raise InvalidMessage(f"sha256 mismatch: {what} hashes to {actual}, the message says {sha256}")
    return InlineImage(data, sha256)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_envelope(body: bytes, content_type: str | None, headers: dict[str, Any] | None, *,
                   max_inline_bytes: int) -> FrameRequest:
    """One AMQP message -> FrameRequest, or InvalidMessage with the reason."""
    headers = headers or {}
    media = _media_type(content_type)
    if media in JSON_CONTENT_TYPES:
        return _parse_json(body, max_inline_bytes)
    if media.startswith("image/") or media == "application/octet-stream":
        return _parse_raw(body, headers, max_inline_bytes)
    if not media:  # no content type: headers say which form was meant
        if "x-frame-id" in headers:
            return _parse_raw(body, headers, max_inline_bytes)
        return _parse_json(body, max_inline_bytes)
    raise InvalidMessage(f"unsupported content type {_show(content_type)}: send an application/json envelope "
                         "or image bytes (image/* or application/octet-stream) with x-* headers")


# --- structured (JSON) mode ---------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # parsers disagree on which copy wins: refuse instead of guessing
            raise InvalidMessage(f"duplicate JSON key {_show(key)}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise InvalidMessage(f"JSON constant {name} is not allowed")


def _load_json(body: bytes, max_inline_bytes: int) -> Any:
    if not body:
        raise InvalidMessage("empty message body")
    limit = max_inline_bytes * 4 // 3 + 4 + ENVELOPE_OVERHEAD
    if len(body) > limit:
        raise InvalidMessage(f"message is {len(body)} bytes, above the envelope limit of {limit} "
                             f"(inline images are limited to {max_inline_bytes} bytes)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"body is not UTF-8 JSON: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidMessage("body is not valid JSON: nested too deeply") from None


def _parse_json(body: bytes, max_inline_bytes: int) -> FrameRequest:
    env = _load_json(body, max_inline_bytes)
    if not isinstance(env, dict):
        raise InvalidMessage(f"envelope must be a JSON object, got {type(env).__name__}")
    spec = env.get("specversion")
    if spec is None:
        raise InvalidMessage("missing required field 'specversion'")
    if spec != SPECVERSION:
        raise InvalidMessage(f"unsupported specversion {_show(spec)} (expected '{SPECVERSION}')")
    kind = req_text(env.get("type"), "type", max_len=256)
    if kind != FRAME_TYPE:
        if kind and kind.startswith(_TYPE_PREFIX):
            raise InvalidMessage(f"unsupported schema version {_show(kind[len(_TYPE_PREFIX):])} of "
                                 f"{_TYPE_PREFIX.rstrip('.')} (this intake reads {FRAME_TYPE})")
        raise InvalidMessage(f"unexpected type {_show(kind)} (expected '{FRAME_TYPE}')")
    dct = env.get("datacontenttype")
    if dct is not None and _media_type(dct if isinstance(dct, str) else "?") != "application/json":
        raise InvalidMessage(f"field 'datacontenttype' must be 'application/json', got {_show(dct)}")
    frame_id = req_text(env.get("id"), "id", max_len=MAX_ID)
    source = req_text(env.get("source"), "source", max_len=MAX_SOURCE)
    stamp = _time_field(env.get("time"), "time")
    subject = opt_text(env.get("subject"), "subject", max_len=MAX_SERIAL)
    data = env.get("data")
    if data is None:
        raise InvalidMessage("missing required field 'data'")
    if not isinstance(data, dict):
        raise InvalidMessage(f"field 'data' must be an object, got {type(data).__name__}")
    serial = opt_text(data.get("serial"), "data.serial", max_len=MAX_SERIAL)
    if subject is not None and serial is not None and subject != serial:
        raise InvalidMessage(f"'subject' {_show(subject)} and 'data.serial' {_show(serial)} disagree")
    return FrameRequest(
        frame_id=frame_id,
        line=name_field(data.get("line"), "data.line"),
        station=name_field(data.get("station"), "data.station"),
        category=req_text(data.get("category"), "data.category", max_len=MAX_CATEGORY),
        serial=serial or subject,
        image=_image(data.get("image"), max_inline_bytes),
        time=stamp,
        source=source,
    )


def _image(img: Any, max_inline_bytes: int) -> InlineImage | ObjectRef:
    if img is None:
        raise InvalidMessage("missing required field 'data.image'")
    if not isinstance(img, dict):
        raise InvalidMessage(f"field 'data.image' must be an object, got {type(img).__name__}")
    has_inline, has_uri = img.get("inline") is not None, img.get("uri") is not None
    if has_inline and has_uri:
        raise InvalidMessage("field 'data.image' has both 'inline' and 'uri': send exactly one")
    if not has_inline and not has_uri:
        raise InvalidMessage("field 'data.image' has neither 'inline' nor 'uri': send exactly one")
    opt_text(img.get("content_type"), "data.image.content_type", max_len=128)
    sha = _sha_field(img.get("sha256"), "data.image.sha256")
    if has_uri:
        if sha is None:  # the intake must be able to prove it fetched the bytes the camera meant
            raise InvalidMessage("missing required field 'data.image.sha256' (mandatory with 'uri')")
        bucket, key = _object_uri(img["uri"])
        return ObjectRef(key=key, sha256=sha, bucket=bucket)
    return _check_inline(_b64(img["inline"], max_inline_bytes), sha, max_inline_bytes, "inline image")


def _b64(value: Any, max_inline_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise InvalidMessage(f"field 'data.image.inline' must be a base64 string, got {type(value).__name__}")
    if len(value) > max_inline_bytes * 4 // 3 + 4:  # refuse before decoding a huge string
        raise InvalidMessage(f"inline image is about {len(value) * 3 // 4} bytes, above the inline limit of "
                             f"{max_inline_bytes}; upload the image to the object store and send a reference")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidMessage(f"field 'data.image.inline' is not valid base64: {exc}") from None


def _object_uri(value: Any) -> tuple[str | None, str]:
    uri = req_text(value, "data.image.uri", max_len=MAX_KEY + 70)
    bucket: str | None = None
    if "://" in uri:
        scheme, _, rest = uri.partition("://")
        if scheme.lower() != "s3":
            raise InvalidMessage(f"field 'data.image.uri' has unsupported scheme {_show(scheme)} "
                                 "(use s3://bucket/key or a key in the intake's bucket)")
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise InvalidMessage(f"field 'data.image.uri' names no bucket: {_show(uri)}")
    else:
        key = uri
    parts = key.split("/")
    if not key or len(key) > MAX_KEY or key.startswith("/") or "\\" in key or any(p in {"", ".", ".."} for p in parts):
        raise InvalidMessage(f"field 'data.image.uri' has an invalid object key {_show(key)}")
    return bucket, key


# --- raw-body mode ------------------------------------------------------------------------


def _header(headers: dict[str, Any], name: str) -> Any:
    value = headers.get(name)
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMessage(f"header '{name}' is not UTF-8 text") from None
    return value


def _parse_raw(body: bytes, headers: dict[str, Any], max_inline_bytes: int) -> FrameRequest:
    frame_id = req_text(_header(headers, "x-frame-id"), "header x-frame-id", max_len=MAX_ID)
    line = name_field(_header(headers, "x-line"), "header x-line")
    station = name_field(_header(headers, "x-station"), "header x-station")
    category = req_text(_header(headers, "x-category"), "header x-category", max_len=MAX_CATEGORY)
    serial = opt_text(_header(headers, "x-serial"), "header x-serial", max_len=MAX_SERIAL)
    source = opt_text(_header(headers, "x-source"), "header x-source", max_len=MAX_SOURCE) or RAW_DEFAULT_SOURCE
    stamp = _time_field(_header(headers, "x-time"), "header x-time")
    sha = _sha_field(_header(headers, "x-sha256"), "header x-sha256")
    if not body:
        raise InvalidMessage("empty message body (raw mode expects the image bytes)")
    image = _check_inline(body, sha, max_inline_bytes, "raw image body")
    return FrameRequest(frame_id=frame_id, line=line, station=station, category=category, serial=serial,
                        image=image, time=stamp, source=source)


def build_envelope(*, frame_id: str, source: str, line: str, station: str, category: str, serial: str | None,
                   image: dict[str, Any], time: str) -> dict[str, Any]:
    """The v1 envelope a publisher sends (used by ``inspect mes simulate`` and the tests)."""
    data: dict[str, Any] = {"line": line, "station": station, "category": category, "serial": serial,
                            "image": image}
    return {"specversion": SPECVERSION, "id": frame_id, "source": source, "type": FRAME_TYPE, "time": time,
            "subject": serial, "datacontenttype": "application/json", "data": data}
