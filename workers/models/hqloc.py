"""FiLo HQ-Loc: Grounding DINO boxes -> kept boxes, position word, box mask, damped anomaly map.

FiLo (Gu et al., 2024, arXiv 2404.13671), sec. 3.3.1-3.3.2. Where the paper is silent, the official
evaluation script (CASIA-IVA-Lab/FiLo ``test.py``) decides; each such line says so.

Parity recipe with the official script: detect with ``box_threshold=0.0`` (so the "single best box"
fallback can see every query) and ``text_threshold=FILO_TEXT_THRESHOLD``, then ``filter_boxes`` ->
``best_box`` -> ``prompt_positions`` for the text side and ``box_mask`` -> ``damp_outside`` for the map.
Pure torch/numpy/OpenCV: no model, no I/O.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
from torch import Tensor

GENERIC_WORDS = ("anomaly", "damage", "broken", "defect", "contamination")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
FILO_BOX_THRESHOLD = 0.25
FILO_TEXT_THRESHOLD = 0.25  # test.py sets text_threshold = args.box_threshold
FILO_MAX_AREA = 0.7
FILO_DAMP = 0.7
# FiLo's test.py sets centre = (259, 259) on its 518 px grid when no box survives: the "center" prompts.
FILO_NO_BOX_POSITION = "center"
# Grounding DINO reads at most 256 text tokens, [CLS] and [SEP] included. After our normalisation every
# token of BERT's WordPiece covers at least one non-space character, so 254 characters can never overflow.
MAX_CAPTION_CHARS = 254


@dataclass(frozen=True)
class Box:
    """A detection in normalised image coordinates (0..1, x right, y down)."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    phrase: str

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2


def _clean_phrase(text: str) -> str:
    # NFKD + dropping combining marks leaves (almost) ASCII, so len() bounds the token count; a "." inside
    # a phrase would split it into two caption entries, a "," would blur the phrase boundaries of the labels.
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", re.sub(r"[.,]", " ", text.lower())).strip()


def build_caption(phrases: Sequence[str], max_chars: int = MAX_CAPTION_CHARS) -> str:
    """``"anomaly . damage . broken . defect . contamination . "`` plus each category phrase and ``" . "``.

    Lower-cased like the official script; duplicates (e.g. leather's "damage") are dropped, which the
    official script does not do. Category phrases that would push the caption past ``max_chars`` are
    left out whole (never cut mid-phrase); the generic words always stay.
    """
    caption = "".join(f"{w} . " for w in GENERIC_WORDS)
    seen = set(GENERIC_WORDS)
    for phrase in phrases:
        p = _clean_phrase(phrase)
        if not p or p in seen or len(caption) + len(p) + 3 > max_chars:
            continue
        caption += f"{p} . "
        seen.add(p)
    return caption


def _phrase_ok(phrase: str, vocab: Sequence[str], match: Literal["phrase", "word"]) -> bool:
    text = phrase.lower()
    if match == "phrase":  # official check_elements_in_array: a whole detail/generic string is a substring
        return any(v in text for v in vocab)
    words = set(re.findall(r"[a-z0-9]+", text))
    # words under 3 letters ("of", "in") would match almost any multi-word label
    return any(w in words for v in vocab for w in re.findall(r"[a-z0-9]{3,}", v))


def filter_boxes(
    boxes: Sequence[Box],
    phrases: Sequence[str],
    score_threshold: float = FILO_BOX_THRESHOLD,
    max_area: float = FILO_MAX_AREA,
    *,
    match: Literal["phrase", "word"] = "phrase",
) -> list[Box]:
    """The boxes HQ-Loc keeps, in the order of FiLo's ``get_grounding_output`` + its phrase check.

    1. score > ``score_threshold`` and normalised area < ``max_area``, both at once;
    2. if nothing passes, the single highest-scoring box among *all* boxes (area ignored);
    3. of those, only boxes whose phrase contains a category phrase or a generic word (FiLo marks the
       others "#$%" and they then play no part in positions or damping). This also applies to the fallback
       box, so an unconvincing best box still ends with nothing kept.
    ``match="phrase"`` (official) needs a whole category phrase, e.g. "cracked large", inside the label;
    ``match="word"`` accepts any single word of it. Both compare lower-cased (the official script compares
    mixed-case details with a lower-cased caption, so e.g. pill's "Uneven coating" never matched: not kept).
    Areas are measured on the box clipped to the image (the official uses the raw w*h of cxcywh).
    """
    boxes = list(boxes)
    if not boxes:
        return []
    stage = [b for b in boxes if b.score > score_threshold and b.area < max_area]
    if not stage:
        stage = [max(boxes, key=lambda b: b.score)]
    vocab = [p for p in (_clean_phrase(x) for x in (*phrases, *GENERIC_WORDS)) if p]
    return [b for b in stage if _phrase_ok(b.phrase, vocab, match)]


def best_box(boxes: Sequence[Box]) -> Box | None:
    """The kept box whose centre names the position.

    Official quirk kept: scores are compared as printed with two decimals (``str(score)[:4]``) and a later
    box wins a tie (``>=``), so boxes keep the detector's query order.
    """
    best, best_score = None, -1.0
    for b in boxes:
        s = math.floor(b.score * 100 + 1e-9) / 100  # + 1e-9: 0.29 * 100 is 28.999..., str() shows "0.29"
        if s >= best_score:
            best, best_score = b, s
    return best


def position_word(box: Box | None) -> str | None:
    """The box centre on a 3x3 grid of the image; None without a box.

    Equal thirds; the official 518 px integer ranges (0-172, 173-344, 345-517) leave 1 px gaps where no word
    matches and all 9 get averaged: a resolution artefact not reproduced.
    """
    if box is None:
        return None
    cx, cy = box.center
    col = min(max(int(cx * 3), 0), 2)
    row = min(max(int(cy * 3), 0), 2)
    return POSITIONS[row * 3 + col]


def prompt_positions(kept: Sequence[Box], *, no_box: str | None = FILO_NO_BOX_POSITION) -> tuple[str, ...]:
    """Position words for the abnormal prompts; empty = average all 9 (FiLo.forward's convention).

    With no kept box the official script uses "center" (``no_box`` default); ``no_box=None`` gives the
    paper's reading, all 9 positions averaged.
    """
    word = position_word(best_box(kept))
    if word is None:
        word = no_box
    return (word,) if word else ()


def box_mask(boxes: Sequence[Box], size: tuple[int, int]) -> Tensor:
    """(H, W) bool: union of the boxes, pixel edges truncated like the official ``int(x * size)``."""
    h, w = size
    mask = torch.zeros(h, w, dtype=torch.bool)
    for b in boxes:
        x0, x1 = (int(min(max(v, 0.0), 1.0) * w) for v in (b.x0, b.x1))
        y0, y1 = (int(min(max(v, 0.0), 1.0) * h) for v in (b.y0, b.y1))
        mask[y0:y1, x0:x1] = True
    return mask


def damp_outside(anomaly_map: Tensor, mask: Tensor | None, factor: float = FILO_DAMP) -> Tensor:
    """Multiply the map by ``factor`` outside the mask; map (H, W) or (B, H, W), mask (H, W) or (B, H, W).

    An all-False mask (no kept box) damps the whole map, as the official script does: its loop only marks
    pixels inside kept boxes, so with none every pixel is "outside". Pass ``mask=None`` to leave it as is.
    """
    if mask is None:
        return anomaly_map
    if mask.shape[-2:] != anomaly_map.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match map {tuple(anomaly_map.shape)}")
    return torch.where(mask.to(anomaly_map.device), anomaly_map, anomaly_map * factor)


def draw_boxes(rgb: np.ndarray, boxes: Sequence[Box], labels: bool = True) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 RGB frame with the boxes (green) and "phrase score" labels."""
    out = np.ascontiguousarray(rgb, dtype=np.uint8).copy()
    h, w = out.shape[:2]
    thick = max(1, round(max(h, w) / 300))
    for b in boxes:
        p0 = (int(round(b.x0 * (w - 1))), int(round(b.y0 * (h - 1))))
        p1 = (int(round(b.x1 * (w - 1))), int(round(b.y1 * (h - 1))))
        cv2.rectangle(out, p0, p1, (0, 200, 0), thick)
        if labels:
            text = f"{b.phrase or '?'} {b.score:.2f}"
            org = (p0[0] + 2, max(p0[1] - 4, 12))
            cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (0, 0, 0), thick + 2)
            cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (255, 255, 255), thick)
    return out
