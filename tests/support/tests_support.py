"""Small data makers shared by tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()
