"""FiLo in the frame stages: HQ-Loc localisation and FiLo scoring (seed 000; algorithms.md "FiLo").

``localize``: Grounding DINO on the frame with the generic words plus the category's defect
phrases; boxes filtered as FiLo's code does; the best kept box names the position word.
``segment`` with ``pipeline.segment_method = "filo"``: position-enhanced abnormal prompts, the
trained FiLo head on the shared dual-path pass, the map damped outside the kept boxes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from workers.finalize import StageFailed
from workers.models.hqloc import (
    Box,
    box_mask,
    build_caption,
    damp_outside,
    filter_boxes,
    prompt_positions,
)

_text_cache: dict[str, torch.Tensor] = {}


def localize_frame(grounding, rgb: np.ndarray, phrases: list[str]) -> dict[str, Any]:
    """Boxes (all, with the kept flag), kept phrases and the position word, as JSON."""
    caption = build_caption(phrases)
    boxes = grounding.detect([rgb], caption, box_threshold=0.0, text_threshold=0.25)[0]
    kept = filter_boxes(boxes, phrases)
    positions = prompt_positions(kept)
    kept_ids = {id(b) for b in kept}
    rows = [
        {"rank": i, "phrase": b.phrase[:256], "score": float(b.score), "x0": b.x0, "y0": b.y0, "x1": b.x1,
         "y1": b.y1, "kept": id(b) in kept_ids, "position": None}
        for i, b in enumerate(sorted(boxes, key=lambda b: -b.score)[:50])  # the 50 best are plenty to audit
    ]
    return {"caption": caption, "detections": rows, "position": positions[0] if positions else None,
            "phrases": sorted({b.phrase for b in kept}), "n_boxes": len(boxes), "n_kept": len(kept),
            "grounding": grounding.source}


def kept_boxes(localize: dict[str, Any] | None) -> list[Box]:
    if not localize:
        return []
    return [Box(d["x0"], d["y0"], d["x1"], d["y1"], d["score"], d["phrase"])
            for d in localize["detections"] if d["kept"]]


def filo_text(engine, category: str, phrases: list[str], position: str | None) -> torch.Tensor:
    """(E, 2) FiLo text pair per (weights, category, phrases, position), cached per process."""
    from workers.models.filo import encode_filo_text

    key = hashlib.sha256(f"{engine.clip.fingerprint}|{category}|{'|'.join(phrases)}|{position}".encode()).hexdigest()
    if key not in _text_cache:
        _text_cache[key] = encode_filo_text(engine.clip.model.encode_text, engine.clip.tokenizer, category,
                                            phrases, position, device=engine.device).to(engine.device)
    return _text_cache[key]


@torch.no_grad()
def filo_segment(engine, head, rgb: np.ndarray, category: str, phrases: list[str],
                 localize: dict[str, Any] | None):
    """FiLo map and score for one frame; returns (map (H, W), cls_prob, map_max, image_score, features)."""
    from workers.imaging import preprocess

    if head is None:
        raise StageFailed("segment_method 'filo' needs trained FiLo head weights (INSPECT_FILO_WEIGHTS); "
                          "untrained heads give meaningless maps and SDP stays the zero-shot default")
    position = localize.get("position") if localize else "center"
    text = filo_text(engine, category, phrases, position)
    batch = preprocess(rgb, engine.image_size).unsqueeze(0).to(engine.device)  # (1, 3, H, W)
    feats = engine.sdp.encoder(batch)
    out = head(feats, text)
    amap = out.anomaly_map  # (1, H, W) before damping; the image score uses its max (paper)
    boxes = kept_boxes(localize)
    if boxes:
        amap = damp_outside(amap, box_mask(boxes, tuple(amap.shape[-2:])).to(amap.device))
    return (amap[0].float().cpu().numpy(), float(out.cls_prob[0]), float(out.map_max[0]),
            float(out.image_score[0]), feats)
