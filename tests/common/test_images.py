"""Bad and unusual frames: converted when possible, refused with a reason otherwise."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common.images import ImageError, decode_image, read_frame_file

LIMIT = 10_000_000


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h=32, w=48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG"),
     ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("1", "PNG"), ("RGB", "BMP"), ("RGB", "WEBP")],
)
def test_convertible_modes_become_rgb(mode, fmt):
    img = _rgb().convert(mode)
    out = decode_image(_encode(img, fmt), max_pixels=LIMIT)
    assert out.rgb.shape == (32, 48, 3) and out.rgb.dtype == np.uint8
    assert out.mode == mode and out.format == fmt


def test_16_bit_grey_keeps_full_range():
    arr = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    data = _encode(Image.fromarray(arr))  # uint16 -> mode I;16
    out = decode_image(data, max_pixels=LIMIT)
    assert out.rgb.shape == (32, 48, 3)
    assert out.rgb.min() == 0 and out.rgb.max() == 255


def test_float_images_are_refused():
    img = Image.fromarray(np.ones((8, 8), np.float32), mode="F")
    with pytest.raises(ImageError, match="cannot be converted"):
        decode_image(_encode(img, "TIFF"), max_pixels=LIMIT)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, this is not an image at all", "not a recognised image"),
        (b"%PDF-1.4 fake", "not a recognised image"),
    ],
)
def test_garbage_is_refused(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data, max_pixels=LIMIT)


def test_truncated_files_are_refused():
    for fmt in ("PNG", "JPEG"):
        data = _encode(_rgb(200, 200), fmt)
        with pytest.raises(ImageError, match="corrupt or truncated"):
            decode_image(data[: len(data) // 2], max_pixels=LIMIT)


def test_corrupted_bytes_are_refused():
    data = bytearray(_encode(_rgb(64, 64), "PNG"))
    data[100:140] = b"\x00" * 40  # break the compressed stream and its CRC
    with pytest.raises(ImageError):
        decode_image(bytes(data), max_pixels=LIMIT)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _encode(Image.new("L", (6000, 6000)), "PNG")  # tiny file, 36 Mpx
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(bomb, max_pixels=10_000_000)


def test_byte_limit():
    with pytest.raises(ImageError, match="above the limit"):
        decode_image(_encode(_rgb()), max_pixels=LIMIT, max_bytes=10)


def test_unsupported_format_is_refused():
    data = _encode(_rgb(), "PPM")
    with pytest.raises(ImageError, match="unsupported image format"):
        decode_image(data, max_pixels=LIMIT)


def test_unreadable_paths(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_frame_file(str(tmp_path / "missing.png"), max_bytes=100)
    with pytest.raises(ImageError, match="is a directory"):
        read_frame_file(str(tmp_path), max_bytes=100)
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 200)
    with pytest.raises(ImageError, match="above the limit"):
        read_frame_file(str(big), max_bytes=100)
