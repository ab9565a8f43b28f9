"""`inspect eval`: a method over a dataset root, per-category metrics and pictures in one folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from evaluation.datasets import open_dataset
from evaluation.metrics import category_metrics
from evaluation.predict import (
    METHODS,
    CategoryPredictions,
    predict_patch_memory,
    predict_sdp,
    predict_via_queue,
)
from evaluation.report import mean_row, plot_curves, qualitative_grid, write_tables


@dataclass
class EvalConfig:
    method: str
    root: Path
    out: Path
    kind: str | None = None
    categories: list[str] | None = None
    batch_size: int = 4
    shots: int = 4
    seed: int = 0
    via_queue: bool = False
    limit: int | None = None  # test images per category, for quick looks
    timeout: float = 3600.0


@dataclass
class EvalResult:
    dataset: str
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _limit(samples: list, limit: int | None) -> list:
    """Keep both classes when limiting: the first `limit` of each label, interleaved by order."""
    if limit is None:
        return samples
    normal = [s for s in samples if s.label == 0][: max(1, limit // 2)]
    anomalous = [s for s in samples if s.label == 1][: max(1, limit - len(normal))]
    return normal + anomalous


def run_eval(cfg: EvalConfig) -> EvalResult:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.via_queue and cfg.method != "sdp":
        raise ValueError("--via-queue measures the deployed stages; only 'sdp' runs there today")
    dataset = open_dataset(cfg.root, cfg.kind)
    categories = cfg.categories or dataset.categories()
    cfg.out.mkdir(parents=True, exist_ok=True)
    engine = None if cfg.via_queue else _engine()
    result = EvalResult(dataset.kind)
    for cat in tqdm(categories, desc=f"eval {cfg.method}", unit="category"):
        samples = _limit(dataset.samples(cat, "test"), cfg.limit)
        pred = _predict(cfg, engine, dataset, cat, samples)
        masks = pred.masks if pred.masks is not None else None
        result.rows[cat] = category_metrics(pred.labels, pred.scores, masks, pred.maps)
        result.files.append(plot_curves(pred, cfg.out / f"curves_{cat}.png"))
        result.files.append(qualitative_grid(pred, cfg.out / f"grid_{cat}.png"))
    result.rows["mean"] = mean_row(result.rows)
    title = f"{cfg.method} on {dataset.kind} ({cfg.root})" + (" via queue" if cfg.via_queue else "")
    result.files.extend(write_tables(result.rows, cfg.out, title))
    meta = {"method": cfg.method, "dataset": dataset.kind, "root": str(cfg.root), "shots": cfg.shots,
            "seed": cfg.seed, "via_queue": cfg.via_queue, "limit": cfg.limit, **_model_meta(engine)}
    (cfg.out / "run.json").write_text(json.dumps(meta, indent=2))
    return result


def _engine():
    from workers.runtime import context, segment_engine

    return segment_engine(context())


def _model_meta(engine) -> dict:
    if engine is None:
        return {}
    c = engine.clip
    return {"model": c.arch, "weights": c.weights_ref, "random_weights": c.random_weights}


def _predict(cfg: EvalConfig, engine, dataset, cat: str, samples: list) -> CategoryPredictions:
    if cfg.via_queue:
        return predict_via_queue(cat, samples, cfg.timeout)
    if cfg.method == "sdp":
        return predict_sdp(engine, cat, samples, cfg.batch_size)
    return predict_patch_memory(engine, dataset, cat, samples, cfg.batch_size, cfg.shots, cfg.seed)
