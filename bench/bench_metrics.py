"""Evaluation metrics: ``evaluation.metrics`` against a straightforward baseline, same data, same run.

Synthetic category-sized input (seeded): ``--n`` maps of ``--size`` pixels square, elliptical
blob masks on half the images, smooth noise maps that score the blobs higher (float32).

Baseline: scikit-learn once per pixel metric (``roc_auc_score``, ``average_precision_score``,
``precision_recall_curve`` each sorting all pixels again) and AUPRO as CLIP-AD's
``cal_pro_score`` loops: one full binarisation and false-positive count per threshold, then
each region's covered fraction. To keep the baseline honest, regions are labelled once rather
than once per threshold as the reference does. Ours: each metric called on its own, and
``category_metrics`` for all seven (one shared sort). Ours takes the best of ``--repeat`` runs,
the baseline runs once. Both value sets must agree within ``--tol``.

    .venv/bin/python -m bench.bench_metrics [--n 100] [--size 240] [--seed 0] [--repeat 3]
        [--tol 1e-9] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import sklearn
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from evaluation import metrics as ours
from evaluation.metrics import METRIC_ORDER


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="images (half get anomaly masks)")
    p.add_argument("--size", type=int, default=240, help="map height and width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="timed runs of ours (best kept)")
    p.add_argument("--tol", type=float, default=1e-9, help="max allowed |ours - baseline|")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    args = p.parse_args(argv)
    if args.n < 2 or args.size < 8 or args.repeat < 1:
        p.error("--n must be >= 2, --size >= 8, --repeat >= 1")
    return args


def synthetic_category(n: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """Labels, image scores, blob masks on the first half of the images, and float32 maps."""
    rng = np.random.default_rng(seed)
    scale = size / 240
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            ry, rx = rng.uniform(4, 28, 2) * scale + 1
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    noise = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 3 * scale, 3 * scale))
    signal = ndimage.gaussian_filter(masks.astype(float), (0, 4 * scale, 4 * scale))
    maps = ((noise - noise.mean()) / noise.std() + 2.0 * signal).astype(np.float32)
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2)) + rng.normal(0, 0.3, n).astype(np.float32)
    return {"labels": labels, "scores": scores, "masks": masks, "maps": maps}


# --------------------------------------------------------------------------- baseline


def _sklearn_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def baseline_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, steps: int = 200) -> float:
    """Per-threshold loop in the reference's shape (regions labelled once, see module doc)."""
    structure = np.ones((3, 3), dtype=int)
    regions = []  # flat pixel indices of each region, all images
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=structure)
        flat = np.flatnonzero(labelled)
        ids = labelled.ravel()[flat]
        regions.extend(flat[ids == r] + i * mask.size for r in range(1, count + 1))
    negatives = ~masks
    n_neg = negatives.sum()
    lo, hi = maps.min(), maps.max()
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / steps):
        binary = maps > th
        flat = binary.ravel()
        pros.append(np.mean([flat[idx].sum() / idx.size for idx in regions]))
        fprs.append(np.logical_and(negatives, binary).sum() / n_neg)
    pros_a, fprs_a = np.array(pros), np.array(fprs)
    keep = fprs_a < fpr_limit
    kept = fprs_a[keep]
    return float(auc((kept - kept.min()) / (kept.max() - kept.min()), pros_a[keep]))


def baseline_fns(data: dict[str, np.ndarray]) -> dict[str, Callable[[], float]]:
    y, s = data["masks"].ravel(), data["maps"].ravel()
    labels, scores = data["labels"], data["scores"]
    return {
        "pixel_auroc": lambda: float(roc_auc_score(y, s)),
        "pixel_f1_max": lambda: _sklearn_f1_max(y, s),
        "pixel_ap": lambda: float(average_precision_score(y, s)),
        "aupro": lambda: baseline_aupro(data["masks"], data["maps"]),
        "image_auroc": lambda: float(roc_auc_score(labels, scores)),
        "image_f1_max": lambda: _sklearn_f1_max(labels, scores),
        "image_ap": lambda: float(average_precision_score(labels, scores)),
    }


def our_fns(data: dict[str, np.ndarray]) -> dict[str, Callable[[], float]]:
    m, s = data["masks"], data["maps"]
    labels, scores = data["labels"], data["scores"]
    return {
        "pixel_auroc": lambda: ours.pixel_auroc(m, s),
        "pixel_f1_max": lambda: ours.pixel_f1_max(m, s),
        "pixel_ap": lambda: ours.pixel_ap(m, s),
        "aupro": lambda: ours.aupro(m, s),
        "image_auroc": lambda: ours.image_auroc(labels, scores),
        "image_f1_max": lambda: ours.f1_max(labels, scores),
        "image_ap": lambda: ours.image_ap(labels, scores),
    }


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = synthetic_category(args.n, args.size, args.seed)
    masks = data["masks"]
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    seconds: dict[str, dict[str, float]] = {"ours": {}, "baseline": {}}
    values: dict[str, dict[str, float]] = {"ours": {}, "baseline": {}}
    for side, fns, repeat in (("ours", our_fns(data), args.repeat), ("baseline", baseline_fns(data), 1)):
        for key in METRIC_ORDER:
            seconds[side][key], values[side][key] = timed(fns[key], repeat)
    all_ours, shared = timed(
        lambda: ours.category_metrics(data["labels"], data["scores"], masks, data["maps"]), args.repeat
    )
    seconds["ours"]["all_seven"] = all_ours
    seconds["baseline"]["all_seven"] = sum(seconds["baseline"][k] for k in METRIC_ORDER)
    diffs = {k: abs(values["ours"][k] - values["baseline"][k]) for k in METRIC_ORDER}
    diffs_shared = {k: abs(shared[k] - values["baseline"][k]) for k in METRIC_ORDER}
    return {
        "config": {
            "n": args.n,
            "size": args.size,
            "seed": args.seed,
            "repeat": args.repeat,
            "pixels": int(masks.size),
            "anomalous_images": int(data["labels"].sum()),
            "regions": int(n_regions),
            "anomalous_pixel_fraction": float(masks.mean()),
        },
        "seconds": seconds,
        "speedup": {k: seconds["baseline"][k] / seconds["ours"][k] for k in seconds["ours"]},
        "values": values,
        "abs_diff": diffs,
        "max_abs_diff": max(max(diffs.values()), max(diffs_shared.values())),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "sklearn": sklearn.__version__,
        },
        "machine": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    cfg = report["config"]
    print(
        f"{cfg['n']} maps {cfg['size']}x{cfg['size']} ({cfg['pixels']:,} pixels), "
        f"{cfg['anomalous_images']} anomalous images, {cfg['regions']} regions, "
        f"{100 * cfg['anomalous_pixel_fraction']:.2f}% anomalous pixels"
    )
    print(f"{'metric':<14}{'ours s':>10}{'baseline s':>12}{'speed-up':>10}{'value':>10}{'|diff|':>10}")
    for key in (*METRIC_ORDER, "all_seven"):
        ours_s, base_s = report["seconds"]["ours"][key], report["seconds"]["baseline"][key]
        value = f"{report['values']['ours'][key]:.6f}" if key in METRIC_ORDER else ""
        diff = f"{report['abs_diff'][key]:.1e}" if key in METRIC_ORDER else ""
        print(f"{key:<14}{ours_s:>10.3f}{base_s:>12.3f}{report['speedup'][key]:>9.1f}x{value:>10}{diff:>10}")
    print(f"max abs difference ours vs baseline (all calls): {report['max_abs_diff']:.2e}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if not report["max_abs_diff"] <= args.tol:
        print(f"FAIL: ours and baseline differ by more than {args.tol}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
