"""MES intake test messages: good frames and more than twenty kinds of bad input.

Every case gets a line of its own, so its routing key (``line.<line>.s1``) identifies its
rejection row and its dead-lettered copy.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from tests_support import png_bytes

from orchestrator.mes_schema import build_envelope

STATION = "s1"
CATEGORY = "pcb1"


@dataclass
class Case:
    name: str
    line: str
    body: bytes
    content_type: str | None = "application/json"
    headers: dict[str, Any] = field(default_factory=dict)
    expect: str | None = None  # reason fragment; None: accepted
    frame_id: str | None = None  # accepted cases: the inspection's frame id
    register_line: bool = True

    @property
    def routing_key(self) -> str:
        return f"line.{self.line}.{STATION}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inline(data: bytes, digest: str | None = None) -> dict[str, Any]:
    return {"inline": base64.b64encode(data).decode(), "sha256": digest or sha(data)}


def envelope(frame_id: str, ln: str, image: dict[str, Any], **data_over: Any) -> dict[str, Any]:
    env = build_envelope(frame_id=frame_id, source=f"test/line/{ln}", line=ln, station=STATION,
                         category=CATEGORY, serial=f"SN-{frame_id}", image=image, time="2024-05-01T10:00:00Z")
    env["data"].update(data_over)
    return env


def jbytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def grey16_png() -> bytes:
    return _save(Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16), "PNG")


def float_tiff() -> bytes:
    return _save(Image.fromarray(np.random.default_rng(0).random((32, 32), dtype=np.float32), mode="F"), "TIFF")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png() -> bytes:
    """A 100 000 x 100 000 PNG header over a tiny stream: the pixel limit must refuse it unread."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 12_501 * 64, 9)  # a few rows; a real bomb would go on for GBs
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def corrupt_crc(png: bytes) -> bytes:
    data = bytearray(png)
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    return bytes(data)


def build_cases(run: str, upload: Callable[[str, bytes], None], bucket: str, max_inline: int) -> list[Case]:
    """Phase one: good frames (the first published three times) and the bad ones."""
    png = png_bytes(1, 64)
    n = iter(range(1000))

    def line() -> str:
        return f"L{run}-{next(n):02d}"

    def env_case(name: str, expect: str | None, image: dict[str, Any] | None = None,
                 top: dict[str, Any] | None = None, **over: Any) -> Case:
        ln = line()
        fid = f"{run}-{name}"
        env = envelope(fid, ln, image or inline(png), **over) | (top or {})
        return Case(name, ln, jbytes(env), expect=expect, frame_id=fid if expect is None else None)

    def raw_case(name: str, expect: str | None, body: bytes, ctype: str = "image/png", **hdr: Any) -> Case:
        ln = line()
        fid = f"{run}-{name}"
        headers = {"x-frame-id": fid, "x-line": ln, "x-station": STATION, "x-category": CATEGORY, **hdr}
        return Case(name, ln, body, ctype, {k: v for k, v in headers.items() if v is not None}, expect,
                    fid if expect is None else None)

    upload(f"incoming/{run}/ok.png", png)
    upload(f"incoming/{run}/other.png", png_bytes(2, 64))
    ref_ok = {"uri": f"s3://{bucket}/incoming/{run}/ok.png", "sha256": sha(png)}
    big = png_bytes(3, 220)  # above INSPECT_MAX_IMAGE_BYTES (100 000), below the inline limit
    cases = [
        env_case("good-inline", None),
        env_case("good-object-ref", None, ref_ok),
        raw_case("good-raw", None, png_bytes(4, 64), **{"x-serial": "SN-raw"}),
        env_case("good-grey16", None, inline(grey16_png())),
        env_case("good-jpeg", None, inline(_save(Image.fromarray(np.full((48, 48), 128, np.uint8)), "JPEG"))),
        # -- bad: envelope --
        Case("not-json", line(), b"{oops", expect="not valid JSON"),
        Case("not-object", line(), b"[1, 2]", expect="must be a JSON object"),
        Case("non-utf8", line(), b'{"id": "\xff"}', expect="not UTF-8 JSON"),
        Case("text-plain", line(), b"hello", "text/plain", expect="unsupported content type"),
        env_case("wrong-version", "unsupported schema version 'v2'", top={"type": "com.inspect.frame.v2"}),
        env_case("no-specversion", "missing required field 'specversion'", top={"specversion": None}),
        env_case("missing-field", "missing required field 'data.category'", category=None),
        env_case("wrong-type", "field 'data.station' must be a string, got int", station=2),
        env_case("bad-line-name", "routing-key word", line="a.b"),
        env_case("invalid-base64", "not valid base64", {"inline": "%%%not-base64%%%"}),
        env_case("sha-mismatch", "sha256 mismatch", inline(png, "0" * 64)),
        env_case("inline-too-big", "above the inline limit", inline(b"x" * (max_inline + 1))),
        Case("oversized-message", line(), b" " * (max_inline * 2 + 70_000), expect="above the envelope limit"),
        env_case("hostile-serial", "control or non-printable", serial="SN\x1b[2J\x1b[31m"),
        env_case("both-inline-and-uri", "both 'inline' and 'uri'", {**inline(png), "uri": "x.png"}),
        # -- bad: image --
        env_case("empty-inline", "inline image is empty", {"inline": ""}),
        raw_case("empty-raw", "empty message body", b""),
        raw_case("corrupt", "not a recognised image file", b"\x00garbage" * 50),
        raw_case("corrupt-crc", "corrupt or truncated", corrupt_crc(png_bytes(5, 64))),
        env_case("truncated", "corrupt or truncated", inline(png[: len(png) // 2])),
        env_case("huge", "above the limit of 100000", inline(big)),
        env_case("bomb", "possible decompression bomb", inline(bomb_png())),
        env_case("wrong-mode", "image mode F cannot be converted", inline(float_tiff())),
        # -- bad: references, registrations, headers --
        env_case("missing-object", "not found in the object store",
                 {"uri": f"incoming/{run}/nothing.png", "sha256": sha(png)}),
        env_case("object-sha-mismatch", "sha256 mismatch: object",
                 {"uri": f"incoming/{run}/other.png", "sha256": sha(png)}),
        env_case("wrong-bucket", "names bucket 'elsewhere'",
                 {"uri": f"s3://elsewhere/incoming/{run}/ok.png", "sha256": sha(png)}),
        env_case("unknown-category", "is not registered (strict mode)", category="never-registered"),
        env_case("hostile-category", "is not registered (strict mode)", category="pcb1'; DROP TABLE inspections;--"),
        raw_case("hostile-id-nul", "control or non-printable", png, **{"x-frame-id": f"{run}-id\x00; rm -rf /"}),
        raw_case("raw-missing-header", "missing required field 'header x-category'", png, **{"x-category": None}),
        raw_case("raw-non-utf8-header", "header 'x-serial' is not UTF-8", png, **{"x-serial": b"\xff\xfe"}),
    ]
    unknown = env_case("unknown-line", "is not registered; add it")
    unknown.register_line = False
    return [*cases, unknown]


def reused_id_case(run: str, original: Case) -> Case:
    """Phase two: an accepted frame's id again, with another image (must not replace it)."""
    ln = f"L{run}-reuse"
    assert original.frame_id is not None
    return Case("reused-id", ln, jbytes(envelope(original.frame_id, ln, inline(png_bytes(9, 64)))),
                expect="frame ids must be unique")
