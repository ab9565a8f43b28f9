"""CLIP-LAD's protocol (seed 001, sec. 4): k-shot banks over several seeds, image AUROC.

Per category (or sub-type): features of every train, validation and test image are computed
once; for each (shots, seed) a bank is fitted on k seeded training shots, the Mahalanobis
statistics on the validation normals (leave-one-out on the shots when there are none), and
the fused score ranks the test set. Reported: AUROC over all test images, over good + logical
anomalies, and over good + structural anomalies, as mean and std over seeds.

Sub-types (juice bottle, splicing connectors in the paper) are not in MVTec LOCO's folders;
``subtypes`` maps an image path relative to the dataset root to its sub-type. Without it a
category is one multi-class bank (the paper's multi-class scenario).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from evaluation.datasets import Dataset, Sample
from evaluation.predict import _rgb

SPLITS = ("all", "logical", "structural")


@dataclass
class Group:
    name: str
    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]


def groups(dataset: Dataset, category: str, subtypes: dict[str, str] | None) -> list[Group]:
    def split(name: str) -> list[Sample]:
        try:
            return dataset.samples(category, name)
        except ValueError:
            return []  # e.g. MVTec AD has no validation split

    parts = {"train": split("train"), "validation": split("validation"), "test": split("test")}
    if not subtypes:
        return [Group(category, **parts)]
    out: dict[str, Group] = {}
    for key, samples in parts.items():
        for s in samples:
            rel = str(s.image_path.relative_to(dataset.root))
            sub = subtypes.get(rel)
            if sub is None:
                raise ValueError(f"{rel} has no sub-type in the sub-type file")
            g = out.setdefault(sub, Group(f"{category}({sub})", [], [], []))
            getattr(g, key).append(s)
    return [out[k] for k in sorted(out)]


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else float("nan")


def split_aurocs(test: list[Sample], scores: np.ndarray) -> dict[str, float]:
    labels = np.array([s.label for s in test])
    kinds = np.array([s.defect_type for s in test])
    out = {"all": _auroc(labels, scores)}
    for name, folder in (("logical", "logical_anomalies"), ("structural", "structural_anomalies")):
        keep = (labels == 0) | (kinds == folder)
        out[name] = _auroc(labels[keep], scores[keep]) if (kinds == folder).any() else float("nan")
    return out


def evaluate_group(lad, group: Group, content: dict, shots: list[int], seeds: int,
                   batch_size: int) -> dict[int, dict[str, list[float]]]:
    from workers.lad_engine import _select, lad_config
    from workers.models.clip_lad import fit_mahalanobis, mahalanobis

    if not group.train:
        raise ValueError(f"{group.name}: no training images")
    if max(shots) > len(group.train):
        raise ValueError(f"{group.name}: {max(shots)} shots asked, {len(group.train)} training images")
    cfg = lad_config(content)
    model = lad.model(cfg)
    coarse, fine = lad.vocabulary(content)

    def enc(samples):
        return lad.encode(model, [_rgb(s.image_path) for s in samples], batch_size) if samples else None

    f_train, f_val, f_test = enc(group.train), enc(group.validation), enc(group.test)
    results: dict[int, dict[str, list[float]]] = {k: {s: [] for s in SPLITS} for k in shots}
    for k in shots:
        for seed in range(seeds):
            idx = sorted(np.random.default_rng(seed).choice(len(group.train), size=k, replace=False).tolist())
            memory = model.fit(_select(f_train, idx), coarse, fine)
            if f_val is not None:
                v = model.score(f_val, memory, coarse, fine)
                stats = fit_mahalanobis(v.logical, v.structural)
            else:
                lo, st = lad._leave_one_out(model, _select(f_train, idx), coarse, fine)
                stats = fit_mahalanobis(lo, st)
            t = model.score(f_test, memory, coarse, fine)
            fused = mahalanobis(stats, t.logical, t.structural).double().cpu().numpy()
            for name, value in split_aurocs(group.test, fused).items():
                results[k][name].append(value)
    return results


def run_clip_lad(dataset: Dataset, categories: list[str], shots: list[int], seeds: int, out: Path,
                 subtypes: dict[str, str] | None, batch_size: int) -> dict[str, dict[str, float]]:
    from prompts import load_lad_vocabulary
    from workers.runtime import context, lad_engine

    lad = lad_engine(context())
    rows: dict[str, dict[str, float]] = {}
    for cat in tqdm(categories, desc="clip-lad", unit="category"):
        content = load_lad_vocabulary(cat)["content"]
        for g in groups(dataset, cat, subtypes):
            with torch.no_grad():
                res = evaluate_group(lad, g, content, shots, seeds, batch_size)
            for k, per in res.items():
                row = rows.setdefault(f"{g.name}|{k}-shot", {})
                for split, vals in per.items():
                    row[f"{split}_mean"] = float(np.nanmean(vals)) if not np.all(np.isnan(vals)) else float("nan")
                    row[f"{split}_std"] = float(np.nanstd(vals)) if not np.all(np.isnan(vals)) else float("nan")
    for k in shots:
        mine = [r for name, r in rows.items() if name.endswith(f"|{k}-shot")]
        rows[f"mean|{k}-shot"] = {key: float(np.nanmean([r[key] for r in mine])) for key in mine[0]}
    write_lad_tables(rows, out, seeds)
    return rows


def write_lad_tables(rows: dict[str, dict[str, float]], out: Path, seeds: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# CLIP-LAD image AUROC (mean ± std over {seeds} seeds)", "",
             "| category | shots | all | logical | structural |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        cat, shots = name.split("|")
        cells = [f"{100 * r[f'{s}_mean']:.1f} ± {100 * r[f'{s}_std']:.1f}" if r[f"{s}_mean"] == r[f"{s}_mean"]
                 else "-" for s in SPLITS]
        lines.append(f"| {cat} | {shots} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    with (out / "table.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["category", "shots", *[f"{s}_{m}" for s in SPLITS for m in ("mean", "std")]])
        for name, r in rows.items():
            cat, shots = name.split("|")
            w.writerow([cat, shots, *[f"{r[f'{s}_{m}']:.6f}" for s in SPLITS for m in ("mean", "std")]])
