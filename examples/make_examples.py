"""Regenerate the demo frames in examples/pcb1 (synthetic boards; one good, two defective)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def board(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((256, 256, 3), (30, 110, 50), np.uint8)  # RGB solder-mask green
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    for y in range(24, 240, 24):
        cv2.line(img, (16, y), (240, y), (200, 170, 60), 3)
    for x, y in [(64, 64), (192, 64), (64, 192), (192, 192)]:
        cv2.rectangle(img, (x - 18, y - 12), (x + 18, y + 12), (25, 25, 25), -1)
    return img


def main() -> None:
    out = Path(__file__).parent / "pcb1"
    out.mkdir(exist_ok=True)
    good = board(0)
    scratch = board(1)
    cv2.line(scratch, (40, 30), (200, 210), (230, 230, 230), 2)
    stain = board(2)
    cv2.circle(stain, (150, 110), 20, (90, 60, 20), -1)
    for name, img in [("good_000", good), ("scratch_001", scratch), ("stain_002", stain)]:
        cv2.imwrite(str(out / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
