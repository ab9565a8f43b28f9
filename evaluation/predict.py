"""Predictions of one method over one category's test split, in-process or through the queue.

Every method returns the same arrays: per-image labels and scores, and per-pixel maps at the
model's input size, which the metrics compare with masks resized to that size (the seeds'
protocol: bilinear resize, threshold 0.5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from evaluation.datasets import Dataset, Sample, load_mask
from prompts import load_prompt_file

METHODS = ("sdp", "patch-memory")


@dataclass
class CategoryPredictions:
    category: str
    samples: list[Sample]
    labels: np.ndarray  # (N,) 0/1
    scores: np.ndarray  # (N,)
    maps: np.ndarray  # (N, H, W) float32
    masks: np.ndarray | None  # (N, H, W) bool, None when the dataset has no masks


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def official_image_scores(cls_prob: np.ndarray, map_max: np.ndarray) -> np.ndarray:
    """CLIP-AD's evaluation: each term min-max normalised over the class's test set, summed."""

    def mm(x: np.ndarray) -> np.ndarray:
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 0 else np.zeros_like(x)

    return mm(cls_prob) + mm(map_max)


def _masks(samples: list[Sample], size: tuple[int, int]) -> np.ndarray | None:
    if not any(s.mask_paths for s in samples) and not any(s.label for s in samples):
        return None
    return np.stack([load_mask(s, size) for s in samples])


def _batches(items: list, size: int, desc: str):
    for start in tqdm(range(0, len(items), size), desc=desc, unit="batch", leave=False):
        yield items[start : start + size]


def predict_sdp(engine, category: str, samples: list[Sample], batch_size: int) -> CategoryPredictions:
    """Zero-shot SDP in-process with the default prompt set for the category name."""
    from storage.repo import prompt_set_sha256
    from workers.engine import PromptSpec

    prompt = load_prompt_file()
    spec = PromptSpec(
        class_name=category,
        sha256=prompt_set_sha256(prompt["content"], prompt["rvs_method"], prompt["rvs_params"]),
        content=prompt["content"],
        rvs_method=prompt["rvs_method"],
        rvs_params=prompt["rvs_params"],
    )
    text = engine.text_features(spec, None)
    maps, cls, mx = [], [], []
    for batch in _batches(samples, batch_size, category):
        for p in engine.predict([_rgb(s.image_path) for s in batch], [text] * len(batch)):
            maps.append(p.anomaly_map)
            cls.append(p.cls_prob)
            mx.append(p.map_max)
    maps_a = np.stack(maps).astype(np.float32)
    scores = official_image_scores(np.asarray(cls), np.asarray(mx))
    return CategoryPredictions(category, samples, np.array([s.label for s in samples]), scores, maps_a,
                               _masks(samples, maps_a.shape[1:]))


def predict_patch_memory(
    engine, dataset: Dataset, category: str, samples: list[Sample], batch_size: int, shots: int, seed: int
) -> CategoryPredictions:
    """Few-shot baseline: k normal training images form the patch memory."""
    from workers.imaging import preprocess
    from workers.models.patch_memory import PatchMemory

    train = dataset.samples(category, "train")
    if len(train) < shots:
        raise ValueError(f"{category}: {shots} shots asked, {len(train)} training images")
    rng = np.random.default_rng(seed)
    chosen = [train[i] for i in sorted(rng.choice(len(train), size=shots, replace=False))]
    size = engine.image_size
    model = PatchMemory(engine.clip.model.visual).to(engine.device)

    def tensor(batch: list[Sample]) -> torch.Tensor:
        return torch.stack([preprocess(_rgb(s.image_path), size) for s in batch]).to(engine.device)

    bank = model.build_bank(tensor(chosen), batch_size)
    maps, scores = [], []
    for batch in _batches(samples, batch_size, category):
        out = model.score(tensor(batch), bank)
        maps.append(out.anomaly_map.float().cpu().numpy())
        scores.append(out.image_score.float().cpu().numpy())
    maps_a = np.concatenate(maps)
    return CategoryPredictions(category, samples, np.array([s.label for s in samples]),
                               np.concatenate(scores), maps_a, _masks(samples, maps_a.shape[1:]))


def predict_via_queue(
    category: str, samples: list[Sample], timeout: float, progress: Callable[[int], None] | None = None
) -> CategoryPredictions:
    """The deployed path: every test image submitted as a frame, maps read from the object store."""
    from orchestrator.context import open_orchestrator
    from workers.imaging import npy_to_map

    orch = open_orchestrator()
    ids = []
    for s in tqdm(samples, desc=f"{category} submit", unit="frame", leave=False):
        ids.append(orch.intake.submit(s.image_path.read_bytes(), line="eval", category=category,
                                      source="eval").inspection_id)
    done = orch.intake.wait(ids, timeout=timeout)
    maps, cls, mx = [], [], []
    for iid, s in zip(ids, samples, strict=True):
        insp = done.get(iid)
        if insp is None or insp.result is None:
            reason = "timed out" if insp is None else insp.reason
            raise RuntimeError(f"{s.image_path}: inspection {iid} did not finish: {reason}")
        maps.append(npy_to_map(orch.store.get_bytes(insp.result.anomaly_map_key)).astype(np.float32))
        cls.append(insp.result.scores["cls_prob"])
        mx.append(insp.result.scores["map_max"])
    maps_a = np.stack(maps)
    scores = official_image_scores(np.asarray(cls), np.asarray(mx))
    return CategoryPredictions(category, samples, np.array([s.label for s in samples]), scores, maps_a,
                               _masks(samples, maps_a.shape[1:]))
