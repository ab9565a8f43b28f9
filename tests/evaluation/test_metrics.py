"""Metrics against scikit-learn, a slow per-threshold AUPRO reference and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from evaluation import metrics
from evaluation.metrics import (
    METRIC_ORDER,
    aupro,
    category_metrics,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_curves,
    pixel_f1_max,
)


def slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, steps: int = 200) -> float:
    """CLIP-AD's ``cal_pro_score`` written out plainly: one full pass per threshold, regions
    relabelled per image and counted from their coordinates (scipy instead of skimage)."""
    masks = masks.astype(bool)
    lo, hi = maps.min(), maps.max()
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / steps):
        binary = maps > th
        pro = []
        for b, m in zip(binary, masks, strict=True):
            labelled, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
            for region in range(1, n + 1):
                rows, cols = np.nonzero(labelled == region)
                pro.append(b[rows, cols].sum() / rows.size)
        negatives = ~masks
        fprs.append(np.logical_and(negatives, binary).sum() / negatives.sum())
        pros.append(np.array(pro).mean())
    pros_a, fprs_a = np.array(pros), np.array(fprs)
    keep = fprs_a < fpr_limit
    kept = fprs_a[keep]
    kept = (kept - kept.min()) / (kept.max() - kept.min())
    return float(auc(kept, pros_a[keep]))


def random_case(seed: int, n: int = 6, size: int = 24, levels: int | None = None, normal: int = 2):
    """Blobby masks (several regions per image, the last ``normal`` images empty) and maps
    that favour them; ``levels`` quantises the maps so many scores tie."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1.5, 1.5)) > 0.56
    masks[n - normal :] = False
    maps = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1, 1)) + 0.08 * masks
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


def sklearn_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def scattered_normals(shape: tuple[int, ...], lo: float, hi: float, seed: int = 0) -> np.ndarray:
    """Distinct normal-pixel scores spread over [lo, hi], so FPR takes many values."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.linspace(lo, hi, math.prod(shape))).reshape(shape)


# --------------------------------------------------------------------------- vs scikit-learn


@pytest.mark.parametrize("levels", [None, 7, 40])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_metrics_match_sklearn(levels: int | None, dtype: type) -> None:
    masks, maps = random_case(3, n=8, size=32, levels=levels)
    maps = maps.astype(dtype)
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert pixel_f1_max(masks, maps) == pytest.approx(sklearn_f1_max(y, s), abs=1e-9)


@pytest.mark.parametrize("levels", [None, 5])
def test_full_curves_match_sklearn(levels: int | None) -> None:
    masks, maps = random_case(4, levels=levels)
    y, s = masks.ravel(), maps.ravel()
    curves = pixel_curves(masks.astype(np.uint8), maps)
    fpr, tpr, th = curves.roc()
    ref_fpr, ref_tpr, ref_th = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(th, ref_th)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    precision, recall, th = curves.precision_recall()
    ref_p, ref_r, ref_th = precision_recall_curve(y, s)
    np.testing.assert_array_equal(th, ref_th)
    np.testing.assert_allclose(precision, ref_p, atol=1e-12)
    np.testing.assert_allclose(recall, ref_r, atol=1e-12)


def test_image_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(5)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60) + 0.3 * labels, 1)  # ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1_max(labels, scores) == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)


def test_f1_max_tiny_hand_example() -> None:
    # Thresholds high to low: 0.8 -> P=1, R=1/2, F1=2/3; 0.4 -> P=1/2, R=1/2, F1=1/2;
    # 0.35 -> P=2/3, R=1, F1=4/5; 0.1 -> P=1/2, R=1, F1=2/3. Max: 0.8.
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert f1_max(labels, scores) == pytest.approx(0.8, abs=1e-12)
    assert pixel_f1_max(labels.reshape(1, 2, 2), scores.reshape(1, 2, 2)) == pytest.approx(0.8, abs=1e-12)


# --------------------------------------------------------------------------- AUPRO vs reference


@pytest.mark.parametrize(("seed", "levels", "normal"), [(0, None, 2), (1, 6, 0), (2, 25, 3), (7, None, 1)])
def test_aupro_matches_slow_reference(seed: int, levels: int | None, normal: int) -> None:
    masks, maps = random_case(seed, levels=levels, normal=normal)
    expected = slow_aupro(masks, maps)
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-9)
    assert aupro(masks, maps, curves=pixel_curves(masks, maps)) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_scores_on_thresholds_are_not_positive(seed: int) -> None:
    # Scores in k/256 with min 0 and max 200/256: the 200 thresholds are exactly i/256, so
    # every pixel ties with a threshold and ">" vs ">=" changes every kept point.
    masks, maps = random_case(seed, levels=None)
    rng = np.random.default_rng(seed)
    ticks = np.clip(np.round(maps * 200).astype(int) + rng.integers(-3, 4, maps.shape), 0, 200)
    ticks.flat[:2] = 0, 200
    dyadic = ticks / 256.0
    assert aupro(masks, dyadic) == pytest.approx(slow_aupro(masks, dyadic), abs=1e-9)


def test_aupro_matches_reference_with_other_limits() -> None:
    masks, maps = random_case(11, levels=None)
    assert aupro(masks, maps, fpr_limit=0.5, num_thresholds=37) == pytest.approx(
        slow_aupro(masks, maps, fpr_limit=0.5, steps=37), abs=1e-9
    )


def test_aupro_region_blocks_give_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    masks, maps = random_case(8, n=6, size=32)
    whole = aupro(masks, maps)
    monkeypatch.setattr(metrics, "_MAX_CELLS", 600)  # a few regions per block
    assert aupro(masks, maps) == pytest.approx(whole, abs=1e-12)


# --------------------------------------------------------------------------- hand-computed cases


def _gap_case() -> tuple[np.ndarray, np.ndarray]:
    """Two images, one region each; normals in [0, 0.4], anomalies at 1.0: perfectly separated,
    and normals spread out so FPR < 0.3 is reached at several thresholds before it hits 0."""
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:6] = True
    masks[1, 5:8, 0:2] = True
    maps = scattered_normals(masks.shape, 0.0, 0.4)
    maps[masks] = 1.0
    return masks, maps


def test_perfect_map_scores_one() -> None:
    masks, maps = _gap_case()
    labels = masks.any(axis=(1, 2))
    labels[1] = False  # make the image metrics two-class too
    masks[1] = False
    maps[1][maps[1] == 1.0] = 0.2
    result = category_metrics(labels, maps.max(axis=(1, 2)), masks, maps)
    for key in METRIC_ORDER:
        assert result[key] == pytest.approx(1.0, abs=1e-12), key


def test_inverted_map() -> None:
    # Anomalies at the global minimum are never above a threshold: PRO is 0 everywhere.
    masks, maps = _gap_case()
    inverted = 1.0 - maps
    assert pixel_auroc(masks, inverted) == 0.0
    assert aupro(masks, inverted) == 0.0


def test_aupro_half_of_each_region() -> None:
    # Every region has half its pixels at the global max (above every threshold, since the
    # thresholds stop below the max) and half at the global min (never above a threshold), so
    # PRO = 0.5 at every threshold. The kept FPRs are rescaled to span [0, 1], so the area
    # under a constant 0.5 is exactly 0.5.
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 2:4, 2:6] = True
    masks[1, 6:9, 1:3] = True
    maps = scattered_normals(masks.shape, 0.01, 0.99)
    maps[0, 2:4, 2:4], maps[0, 2:4, 4:6] = 1.0, 0.0
    maps[1, 6:9, 1], maps[1, 6:9, 2] = 1.0, 0.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)
    # Normal images add negatives only: no region of theirs enters the PRO mean.
    extra = np.zeros((2, 10, 10), dtype=bool)
    all_masks = np.concatenate([masks, extra])
    all_maps = np.concatenate([maps, scattered_normals(extra.shape, 0.01, 0.99, seed=1)])
    assert aupro(all_masks, all_maps) == pytest.approx(0.5, abs=1e-12)
    assert aupro(all_masks, all_maps) == pytest.approx(slow_aupro(all_masks, all_maps), abs=1e-12)


def test_aupro_regions_are_8_connected() -> None:
    # A: two diagonal pixels, one covered -> one region, 1/2. B: a covered 2x2 block -> 1.
    # 8-connectivity: (1/2 + 1) / 2 = 0.75; 4-connectivity would give (1 + 0 + 1) / 3.
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True
    masks[0, 6:8, 6:8] = True
    maps = scattered_normals(masks.shape, 0.01, 0.99)
    maps[0, 1, 1], maps[0, 2, 2] = 1.0, 0.0
    maps[0, 6:8, 6:8] = 1.0
    assert aupro(masks, maps) == pytest.approx(0.75, abs=1e-12)


def test_aupro_labels_each_image_separately() -> None:
    # B (2x2, covered) in image 0 and D (3x3, uncovered) in image 1 overlap in position.
    # Per image: (1 + 0) / 2 = 0.5; labelled as one 3-D volume they would merge into 4/13.
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 5:7, 5:7] = True
    masks[1, 5:8, 5:8] = True
    maps = scattered_normals(masks.shape, 0.01, 0.99)
    maps[0, 5:7, 5:7] = 1.0
    maps[1, 5:8, 5:8] = 0.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


# --------------------------------------------------------------------------- degenerate / API


def test_single_class_gives_nan() -> None:
    masks, maps = random_case(0)
    no_anomaly = np.zeros_like(masks)
    for fn in (pixel_auroc, pixel_ap, pixel_f1_max, aupro):
        assert math.isnan(fn(no_anomaly, maps)), fn.__name__
        assert math.isnan(fn(np.ones_like(masks), maps)), fn.__name__
    for fn in (image_auroc, image_ap, f1_max):
        assert math.isnan(fn(np.ones(4), np.arange(4.0))), fn.__name__


def test_aupro_nan_cases() -> None:
    masks, maps = _gap_case()
    assert math.isnan(aupro(masks, np.full(maps.shape, 0.3)))  # constant map: no thresholds
    # Binary perfect map: every normal pixel sits at the minimum, so every FPR is 0 and the
    # reference's min-max rescale divides 0 by 0.
    assert math.isnan(aupro(masks, masks.astype(float)))


def test_category_metrics_order_and_values() -> None:
    masks, maps = random_case(2, levels=30)
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    result = category_metrics(labels, scores, masks, maps)
    assert tuple(result) == METRIC_ORDER
    assert result["pixel_auroc"] == pixel_auroc(masks, maps)
    assert result["pixel_f1_max"] == pixel_f1_max(masks, maps)
    assert result["pixel_ap"] == pixel_ap(masks, maps)
    assert result["aupro"] == aupro(masks, maps)
    assert result["image_auroc"] == image_auroc(labels, scores)
    assert result["image_f1_max"] == f1_max(labels, scores)
    assert result["image_ap"] == image_ap(labels, scores)
    image_only = category_metrics(labels, scores, None, None)
    assert tuple(image_only) == METRIC_ORDER[4:]
    assert all(image_only[k] == result[k] for k in image_only)


@pytest.mark.parametrize(
    ("masks", "maps", "message"),
    [
        (np.full((1, 2, 2), 0.5), np.zeros((1, 2, 2)), "only 0 and 1"),
        (np.zeros((1, 2, 2)), np.zeros((1, 2, 3)), r"\(N, H, W\)"),
        (np.zeros((2, 2)), np.zeros((2, 2)), r"\(N, H, W\)"),
        (np.eye(2)[None], np.array([[[0.0, np.nan], [1.0, 0.0]]]), "NaN"),
    ],
)
def test_malformed_inputs_raise(masks: np.ndarray, maps: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pixel_auroc(masks, maps)


def test_category_metrics_checks_counts() -> None:
    masks, maps = random_case(0)
    with pytest.raises(ValueError, match="labels but"):
        category_metrics(np.array([0, 1]), np.array([0.1, 0.9]), masks, maps)
