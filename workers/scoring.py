"""Image score and verdict from the segment stage's raw terms and the category's data.

The official CLIP-AD evaluation adds softmax(100 cls.T)[abnormal] and the map maximum after
min-max normalising each over the test batch of a class. On a line there is no test batch,
so the ranges come from stored per-category statistics (``score_norm``, fitted on normal
images): each term is scaled by its range and the two are averaged. Without statistics the
raw sum is used. Threshold and statistics are read at finalize time, so changing them takes
effect on the next frame without a redeploy.
"""

from __future__ import annotations

from typing import Any


def image_score(cls_prob: float, map_max: float, norm: dict[str, Any] | None) -> float:
    if not norm:
        return float(cls_prob + map_max)
    lo_c, hi_c = norm["cls"]
    lo_m, hi_m = norm["map"]
    c = (cls_prob - lo_c) / max(hi_c - lo_c, 1e-12)
    m = (map_max - lo_m) / max(hi_m - lo_m, 1e-12)
    return float((c + m) / 2)


def verdict(score: float, threshold: float) -> str:
    """NG at or above the threshold."""
    return "NG" if score >= threshold else "OK"

