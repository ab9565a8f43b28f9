"""Model input tensors and the pictures people look at (heatmap overlays).

Preprocessing follows the official CLIP-AD evaluation: the image is squashed to the model's
square input (bicubic on both sides, no aspect-preserving crop), then OpenAI mean/std.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(rgb: np.ndarray, size: tuple[int, int], mean=OPENAI_MEAN, std=OPENAI_STD) -> Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float32 normalised."""
    img = Image.fromarray(rgb).resize((size[1], size[0]), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, h, w)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x - m) / s


def map_to_npy(anomaly_map: np.ndarray) -> bytes:
    """Anomaly map as a float16 .npy (numpy's own format, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, anomaly_map.astype(np.float16), allow_pickle=False)
    return buf.getvalue()


def npy_to_map(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def render_overlay(
    rgb: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    value_range: tuple[float, float] | None = None,
    max_side: int = 1024,
    alpha: float = 0.5,
    caption: str | None = None,
    decorate=None,
) -> bytes:
    """Colour-mapped anomaly map blended over the frame, as PNG bytes.

    With ``value_range`` (from the category's calibration) colours mean the same on every
    frame; without it the map is stretched to its own min..max.
    """
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    base = cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA)
    m = cv2.resize(anomaly_map.astype(np.float32), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    lo, hi = value_range if value_range else (float(m.min()), float(m.max()))
    norm = np.clip((m - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)  # BGR
    blended = cv2.addWeighted(cv2.cvtColor(base, cv2.COLOR_RGB2BGR), 1 - alpha, heat, alpha, 0)
    if decorate is not None:  # e.g. detection boxes, drawn on RGB
        blended = cv2.cvtColor(decorate(cv2.cvtColor(blended, cv2.COLOR_BGR2RGB)), cv2.COLOR_RGB2BGR)
    if caption:  # one line per "\n", scaled to the picture so it stays inside small frames
        scale = min(0.5, max(0.3, out_w / 640))
        for i, text in enumerate(caption.split("\n")):
            y = int(18 + i * 40 * scale)
            cv2.putText(blended, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3)
            cv2.putText(blended, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1)
    ok, png = cv2.imencode(".png", blended)
    if not ok:
        raise RuntimeError("OpenCV could not encode the overlay PNG")
    return png.tobytes()
