"""Evaluation outputs people read: tables (Markdown, CSV), curves and qualitative grids (PNG)."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from evaluation.metrics import METRIC_ORDER  # noqa: E402
from evaluation.predict import CategoryPredictions, _rgb  # noqa: E402

HEADERS = {
    "pixel_auroc": "px AUROC", "pixel_f1_max": "px F1-max", "pixel_ap": "px AP", "aupro": "AUPRO",
    "image_auroc": "img AUROC", "image_f1_max": "img F1-max", "image_ap": "img AP",
}


def _fmt(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def write_tables(rows: dict[str, dict[str, float]], out: Path, title: str) -> tuple[Path, Path]:
    """Per-category rows plus their mean, in the seeds' column order (percent)."""
    md = out / "table.md"
    cs = out / "table.csv"
    lines = [f"# {title}", "", "| category | " + " | ".join(HEADERS[k] for k in METRIC_ORDER) + " |",
             "|---" * (len(METRIC_ORDER) + 1) + "|"]
    for cat, r in rows.items():
        lines.append(f"| {cat} | " + " | ".join(_fmt(r.get(k)) for k in METRIC_ORDER) + " |")
    md.write_text("\n".join(lines) + "\n")
    with cs.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["category", *METRIC_ORDER])
        for cat, r in rows.items():
            w.writerow([cat, *(("" if r.get(k) is None else f"{r[k]:.6f}") for k in METRIC_ORDER)])
    return md, cs


def mean_row(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """Plain average over categories, as the seeds report it (NaN-aware)."""
    out = {}
    for k in METRIC_ORDER:
        vals = [r[k] for r in rows.values() if r.get(k) is not None and r[k] == r[k]]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def plot_curves(pred: CategoryPredictions, path: Path) -> Path:
    """Image-level ROC and PR curves of one category."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.6))
    if len(set(pred.labels.tolist())) == 2:
        fpr, tpr, _ = roc_curve(pred.labels, pred.scores)
        prec, rec, _ = precision_recall_curve(pred.labels, pred.scores)
        a.plot(fpr, tpr)
        b.plot(rec, prec)
    a.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    a.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{pred.category}: ROC")
    b.set(xlabel="recall", ylabel="precision", title=f"{pred.category}: PR")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def qualitative_grid(pred: CategoryPredictions, path: Path, n: int = 6, cell: int = 160) -> Path:
    """Rows of (image, ground truth, heatmap overlay) for the most and least anomalous samples."""
    order = np.argsort(-pred.scores)
    anomalous = [i for i in order if pred.labels[i] == 1][: n - n // 3]
    normal = [i for i in order[::-1] if pred.labels[i] == 0][: n - len(anomalous)]
    lo, hi = float(pred.maps.min()), float(pred.maps.max())
    rows = []
    for i in anomalous + normal:
        img = cv2.resize(_rgb(pred.samples[i].image_path), (cell, cell), interpolation=cv2.INTER_AREA)
        gt = pred.masks[i] if pred.masks is not None else np.zeros(pred.maps[i].shape, bool)
        gt_img = cv2.resize(gt.astype(np.uint8) * 255, (cell, cell), interpolation=cv2.INTER_NEAREST)
        heat = (np.clip((pred.maps[i] - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
        heat = cv2.applyColorMap(cv2.resize(heat, (cell, cell)), cv2.COLORMAP_JET)[..., ::-1]
        over = cv2.addWeighted(img, 0.5, heat, 0.5, 0)
        label = f"{pred.samples[i].defect_type} s={pred.scores[i]:.2f}"
        cv2.putText(over, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        rows.append(np.concatenate([img, np.repeat(gt_img[..., None], 3, 2), over], axis=1))
    grid = np.concatenate(rows, axis=0) if rows else np.zeros((cell, 3 * cell, 3), np.uint8)
    cv2.imwrite(str(path), grid[..., ::-1])
    return path


def published(method: str, dataset: str) -> dict[str, dict[str, float | None]]:
    """The seeds' published per-category numbers (fractions), empty when none exist."""
    data = json.loads(resources.files("evaluation").joinpath("published.json").read_text())
    table = data["tables"].get(f"{method}/{dataset}", {})
    cols = data["_columns"]
    return {cat: {k: (None if v is None else v / 100) for k, v in zip(cols, vals, strict=True)}
            for cat, vals in table.items()}


def compare_lines(ours: dict[str, dict[str, float]], theirs: dict[str, dict[str, float | None]]) -> list[str]:
    """'ours / paper' per metric for categories both sides have."""
    lines = ["category | " + " | ".join(f"{HEADERS[k]} ours/paper" for k in METRIC_ORDER)]
    for cat, r in ours.items():
        p = theirs.get(cat)
        if p is None:
            continue
        cells = [f"{_fmt(r.get(k))}/{_fmt(p.get(k))}" for k in METRIC_ORDER]
        lines.append(f"{cat} | " + " | ".join(cells))
    return lines
