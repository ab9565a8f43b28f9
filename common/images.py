"""Decoding and validating camera frames: one place that says why an image is refused.

Used by the orchestrator (refuse before queueing) and the workers (decode for the model).
Greyscale, palette, alpha, CMYK, YCbCr, LAB and 16-bit images are converted to 8-bit RGB;
float images, empty or truncated files, non-images and decompression bombs are refused.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# We enforce our own pixel limit before decoding; PIL's global one would raise at 2x its
# default and warn below that, which would make the limit depend on PIL's version.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

CONTENT_TYPES = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "BMP": ("image/bmp", "bmp"),
    "TIFF": ("image/tiff", "tif"),
    "WEBP": ("image/webp", "webp"),
    "GIF": ("image/gif", "gif"),
}
_DIRECT_RGB = {"1", "L", "P", "PA", "LA", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "La"}


class ImageError(ValueError):
    """A frame that cannot be inspected, with a reason fit for an operator."""


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # (H, W, 3) uint8
    format: str
    mode: str  # the mode before conversion
    content_type: str
    ext: str

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> DecodedImage:
    """Bytes -> 8-bit RGB array, or ImageError saying why not."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(f"file is {len(data)} bytes, above the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if fmt not in CONTENT_TYPES:
                raise ImageError(f"unsupported image format {fmt}")
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError(f"image has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise ImageError(
                    f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                    "(possible decompression bomb)"
                )
            img.seek(0)  # multi-frame files: the first frame is the camera frame
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not a recognised image file") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from exc
    mode = img.mode
    rgb = _to_rgb(img)
    content_type, ext = CONTENT_TYPES[fmt]
    return DecodedImage(rgb=rgb, format=fmt, mode=mode, content_type=content_type, ext=ext)


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in _DIRECT_RGB:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageError(f"{mode} image with values outside 0..65535 cannot be converted")
        grey = (arr >> 8).astype(np.uint8)  # 16-bit -> 8-bit keeps the camera's full range
        return np.repeat(grey[..., None], 3, axis=2)
    raise ImageError(f"image mode {mode} cannot be converted to 8-bit RGB")


def read_frame_file(path: str, *, max_bytes: int) -> bytes:
    """Read a frame from disk with the reasons users need (missing, unreadable, too big)."""
    import os

    try:
        if os.path.isdir(path):
            raise IsADirectoryError(path)
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ImageError(f"{path}: file is {size} bytes, above the limit of {max_bytes}")
        with open(path, "rb") as fh:
            return fh.read()
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{path}: is a directory") from exc
    except PermissionError as exc:
        raise ImageError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
