"""Anomaly-detection metrics, computed the way the seed papers' evaluation code computes them.

Image level: AUROC and AP from scikit-learn, F1-max = the largest finite 2PR/(P+R) over
``precision_recall_curve``. Pixel level: the same three numbers over all pixels of all images
flattened, plus AUPRO as in CLIP-AD's ``cal_pro_score`` (itself from cflow-ad).

The pixel metrics share one pass (:func:`pixel_curves`): the anomalous and the normal pixels'
scores are sorted separately (``np.sort`` is ~3x faster than the ``argsort`` scikit-learn does
on all pixels); AUROC, AP and F1-max then take O(P log N) binary searches (P anomalous, N
normal pixels) and agree with scikit-learn to rounding (~1e-16). :func:`aupro` reuses the
sorted normal scores for its false positives and counts region coverage for all thresholds at
once from one (region, threshold bin) histogram: no per-threshold pass over the pixels.

Degenerate inputs return ``nan`` rather than raising, so one bad category does not stop a run:
a single class present (no anomalous or no normal image / pixel), no ground-truth region or a
constant map for AUPRO. Malformed inputs (shapes, non-binary masks, NaN or infinite scores)
raise ``ValueError``. Results are fractions in [0, 1]; reports multiply by 100.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

METRIC_ORDER: tuple[str, ...] = (
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_ap",
    "aupro",
    "image_auroc",
    "image_f1_max",
    "image_ap",
)
IMAGE_METRICS: tuple[str, ...] = METRIC_ORDER[4:]

# 8-connectivity inside each image and none across images, so one ndimage.label call on the
# (N, H, W) stack numbers every image's regions separately (skimage.measure.label's default
# connectivity for 2-D masks, which CLIP-AD uses).
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True
# Cap on the (regions x bins) count matrix; noisy masks with very many regions go in blocks.
_MAX_CELLS = 1 << 22


def _binary(values: ArrayLike, what: str) -> np.ndarray:
    """Bool array from bool or 0/1 input; anything else is rejected like scikit-learn would."""
    arr = np.asarray(values)
    if arr.dtype != np.bool_:
        if not ((arr == 0) | (arr == 1)).all():
            raise ValueError(f"{what} must be boolean or contain only 0 and 1")
        arr = arr != 0
    return arr


def _scores(values: ArrayLike) -> np.ndarray:
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr


def _check_finite(arr: np.ndarray, what: str) -> None:
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or infinite values")


def _image_inputs(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = _binary(labels, "labels").ravel()
    s = _scores(scores).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    _check_finite(s, "scores")
    return y, s


def _pixel_inputs(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    m = _binary(masks, "masks")
    s = _scores(maps)
    if m.shape != s.shape or m.ndim != 3:
        raise ValueError(f"masks and maps must both be (N, H, W), got {m.shape} and {s.shape}")
    return m, s


def _one_class(y: np.ndarray) -> bool:
    n_pos = int(np.count_nonzero(y))
    return n_pos == 0 or n_pos == y.size


# --------------------------------------------------------------------------- image level


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """``roc_auc_score(labels, scores)``; nan when only one class is present."""
    y, s = _image_inputs(labels, scores)
    return float("nan") if _one_class(y) else float(roc_auc_score(y, s))


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """``average_precision_score(labels, scores)``; nan when only one class is present."""
    y, s = _image_inputs(labels, scores)
    return float("nan") if _one_class(y) else float(average_precision_score(y, s))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Max of the finite 2PR/(P+R) over ``precision_recall_curve``; nan for a single class."""
    y, s = _image_inputs(labels, scores)
    if _one_class(y):
        return float("nan")
    precision, recall, _ = precision_recall_curve(y, s)
    return _f1_max(precision, recall)


def _f1_max(precision: np.ndarray, recall: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)], initial=0.0))


# --------------------------------------------------------------------------- pixel level


@dataclass(frozen=True)
class PixelCurves:
    """All pixel scores split by ground truth and sorted ascending: the shared data.

    Built once by :func:`pixel_curves`. The metrics need only O(P log N) work on top (P the
    anomalous pixels, usually few): AUROC from Mann-Whitney rank counts with ties counted
    half (the trapezoid area exactly), AP and F1-max at the distinct anomalous scores, the only
    thresholds where recall moves (between them precision and F1 can only drop, and recall
    steps add nothing to AP). :meth:`confusion`, :meth:`roc` and :meth:`precision_recall` give
    the full curves at every distinct score when a plot needs them.
    """

    positives: np.ndarray
    negatives: np.ndarray

    @property
    def n_pos(self) -> int:
        return int(self.positives.size)

    @property
    def n_neg(self) -> int:
        return int(self.negatives.size)

    @property
    def degenerate(self) -> bool:
        """True when only one class is present: every metric is then nan."""
        return self.n_pos == 0 or self.n_neg == 0

    def auroc(self) -> float:
        """Area under the ROC curve, as ``roc_auc_score``."""
        if self.degenerate:
            return float("nan")
        below = np.searchsorted(self.negatives, self.positives, side="left")
        not_above = np.searchsorted(self.negatives, self.positives, side="right")
        wins = 2 * int(below.sum()) + int((not_above - below).sum())  # ties count half, kept integer
        return wins / (2 * self.n_pos * self.n_neg)

    def _pr_at_positives(self) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) at each distinct anomalous score, highest first."""
        pos = self.positives[::-1]
        last = np.r_[np.flatnonzero(np.diff(pos)), pos.size - 1]
        tps = last + 1
        fps = self.n_neg - np.searchsorted(self.negatives, pos[last], side="left")
        return tps / (tps + fps), tps / self.n_pos

    def ap(self) -> float:
        """Sum of precision times recall increments, as ``average_precision_score``."""
        if self.degenerate:
            return float("nan")
        precision, recall = self._pr_at_positives()
        return float(np.sum(np.diff(recall, prepend=0.0) * precision))

    def f1_max(self) -> float:
        """Max finite 2PR/(P+R) over the PR curve."""
        if self.degenerate:
            return float("nan")
        return _f1_max(*self._pr_at_positives())

    def negatives_above(self, thresholds: np.ndarray) -> np.ndarray:
        """Normal pixels scored strictly above each threshold (AUPRO's false positives)."""
        return self.n_neg - np.searchsorted(self.negatives, thresholds, side="right")

    def confusion(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(thresholds, tps, fps) at every distinct score, highest first, as scikit-learn's
        ``_binary_clf_curve``: pixels scored ``>= thresholds[i]`` that are anomalous / normal."""
        pos, neg = self.positives, self.negatives
        n = pos.size + neg.size
        # Merge the two sorted runs: a positive's slot is its rank plus the negatives below it.
        slot = np.arange(pos.size) + np.searchsorted(neg, pos, side="left")
        is_pos = np.zeros(n, dtype=bool)
        is_pos[slot] = True
        values = np.empty(n, dtype=np.result_type(pos, neg))
        values[slot] = pos
        values[~is_pos] = neg
        values, is_pos = values[::-1], is_pos[::-1]
        last = np.r_[np.flatnonzero(np.diff(values)), n - 1]  # last pixel of each distinct score
        tps = np.cumsum(is_pos, dtype=np.int64)[last]
        return values[last], tps, last + 1 - tps

    def roc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, thresholds) as ``roc_curve(..., drop_intermediate=False)`` returns them."""
        thresholds, tps, fps = self.confusion()
        return np.r_[0.0, fps / self.n_neg], np.r_[0.0, tps / self.n_pos], np.r_[np.inf, thresholds]

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, thresholds) as ``precision_recall_curve`` returns them."""
        thresholds, tps, fps = self.confusion()
        precision, recall = tps / (tps + fps), tps / self.n_pos
        return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def pixel_curves(masks: ArrayLike, maps: ArrayLike) -> PixelCurves:
    """Shared ROC/PR data for ``masks`` (N, H, W) 0/1 and ``maps`` (N, H, W), all pixels pooled."""
    m, s = _pixel_inputs(masks, maps)
    if m.size == 0:
        raise ValueError("no pixels to evaluate")
    pos = np.sort(s[m], axis=None)
    neg = np.sort(s[~m], axis=None)
    # Sorted, so NaN and +-inf can only sit at the ends.
    _check_finite(np.r_[pos[:1], pos[-1:], neg[:1], neg[-1:]], "maps")
    return PixelCurves(positives=pos, negatives=neg)


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """``roc_auc_score`` over all pixels; nan when only one class is present."""
    return pixel_curves(masks, maps).auroc()


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float:
    """``average_precision_score`` over all pixels; nan when only one class is present."""
    return pixel_curves(masks, maps).ap()


def pixel_f1_max(masks: ArrayLike, maps: ArrayLike) -> float:
    """Pixel F1-max over all pixels; nan when only one class is present."""
    return pixel_curves(masks, maps).f1_max()


# --------------------------------------------------------------------------- AUPRO


def aupro(
    masks: ArrayLike,
    maps: ArrayLike,
    fpr_limit: float = 0.3,
    num_thresholds: int = 200,
    curves: PixelCurves | None = None,
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, as CLIP-AD's ``cal_pro_score``.

    Thresholds are ``np.arange(lo, hi, (hi - lo) / num_thresholds)`` over the maps' global min
    and max (so ``lo`` is included, ``hi`` is not, and float rounding can add one more). A pixel
    is predicted anomalous when its score is strictly ``> threshold``. At each threshold PRO is
    the mean, over every 8-connected ground-truth region of every image, of the region's
    fraction predicted anomalous; FPR is false-positive pixels over all normal pixels. Points
    with FPR < ``fpr_limit`` are kept, their FPRs rescaled to [0, 1] by their own min and max,
    and ``sklearn.metrics.auc`` (trapezoids, in threshold order) gives the area.

    Unlike cflow-ad this rescales by min and max (cflow-ad divides by the max only and uses
    1000 thresholds). Returns nan with no ground-truth region, no normal pixel, a constant map,
    fewer than two kept points or all kept FPRs equal (e.g. a map whose every normal pixel sits
    at the global minimum: the reference divides 0 by 0 there).

    ``curves``, from :func:`pixel_curves` on the same inputs, is reused rather than rebuilt.
    """
    m, s = _pixel_inputs(masks, maps)
    lo, hi = s.min(), s.max()
    _check_finite(np.asarray([lo, hi]), "maps")
    if hi == lo:
        return float("nan")
    thresholds = np.arange(lo, hi, (hi - lo) / num_thresholds)
    width = thresholds.size + 1  # bin b: thresholds[:b] < score <= thresholds[b:]

    if curves is None:  # two sorts beat binning every normal pixel against the thresholds
        curves = pixel_curves(m, s)
    n_neg = curves.n_neg
    false_pos = curves.negatives_above(thresholds)

    regions, n_regions = ndimage.label(m, structure=_STRUCTURE)
    if n_regions == 0 or n_neg == 0:
        return float("nan")
    region_ids = regions[m].astype(np.int64) - 1
    pos_bins = np.searchsorted(thresholds, s[m], side="left")
    pro = _coverage_sum(region_ids, pos_bins, n_regions, width) / n_regions
    fpr = false_pos / n_neg

    keep = fpr < fpr_limit
    if np.count_nonzero(keep) < 2:
        return float("nan")
    kept = fpr[keep]
    span = kept.max() - kept.min()
    if span == 0:
        return float("nan")
    return float(auc((kept - kept.min()) / span, pro[keep]))


def _above(hist: np.ndarray) -> np.ndarray:
    """Counts per bin -> counts strictly above each threshold (bins after it), last axis."""
    suffix = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
    return suffix[..., 1:]


def _coverage_sum(region_ids: np.ndarray, bins: np.ndarray, n_regions: int, width: int) -> np.ndarray:
    """Sum over regions of the fraction of each region scored above each threshold."""
    block = max(1, _MAX_CELLS // width)
    if n_regions > block:  # group pixels by region so each block of regions is one slice
        order = np.argsort(region_ids, kind="stable")
        region_ids, bins = region_ids[order], bins[order]
    total = np.zeros(width - 1)
    for first in range(0, n_regions, block):
        count = min(block, n_regions - first)
        if n_regions > block:
            lo, hi = np.searchsorted(region_ids, [first, first + count])
            ids, b = region_ids[lo:hi] - first, bins[lo:hi]
        else:
            ids, b = region_ids, bins
        hist = np.bincount(ids * width + b, minlength=count * width).reshape(count, width)
        area = hist.sum(axis=1, keepdims=True)
        total += (_above(hist) / area).sum(axis=0)
    return total


# --------------------------------------------------------------------------- category


def category_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: ArrayLike | None,
    maps: ArrayLike | None,
) -> dict[str, float]:
    """The seven numbers in :data:`METRIC_ORDER`, or the image three when ``masks`` is None.

    ``labels`` / ``scores``: (N,) image labels (1 = anomalous) and scores; ``masks`` / ``maps``:
    (N, H, W) ground truth and anomaly maps at the same size. Single-class inputs give nan.
    """
    image = {
        "image_auroc": image_auroc(labels, scores),
        "image_f1_max": f1_max(labels, scores),
        "image_ap": image_ap(labels, scores),
    }
    if masks is None:
        return image
    if maps is None:
        raise ValueError("masks given without maps")
    m, s = _pixel_inputs(masks, maps)
    if m.shape[0] != np.asarray(labels).size:
        raise ValueError(f"{np.asarray(labels).size} labels but {m.shape[0]} masks")
    curves = pixel_curves(m, s)
    pixel = {
        "pixel_auroc": curves.auroc(),
        "pixel_f1_max": curves.f1_max(),
        "pixel_ap": curves.ap(),
        "aupro": aupro(m, s, curves=curves),
    }
    merged = pixel | image
    return {k: merged[k] for k in METRIC_ORDER}
