"""CLIP-LAD in a worker process: vocabularies, memory banks and scoring on the shared CLIP model.

The logical stage uses the same CLIP model as the segment stage, so a worker running both
computes one backbone pass per frame (``SDP(return_features=True)`` feeds ``encode_from``).
Banks are cached per process by id; their tensors come from one safetensors object.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from workers.engine import SegmentEngine
from workers.imaging import preprocess
from workers.models.clip_lad import (
    CLIPLAD,
    LADConfig,
    LADFeatures,
    LADMemory,
    MahalanobisStats,
    TextClasses,
    encode_vocabulary,
    fit_mahalanobis,
    mahalanobis,
)


@dataclass(frozen=True)
class LoadedBank:
    memory: LADMemory
    stats: MahalanobisStats
    cfg: LADConfig
    coarse: TextClasses
    fine: TextClasses


def lad_config(content: dict[str, Any], overrides: dict[str, Any] | None = None) -> LADConfig:
    """Per-category settings as data: the vocabulary file's cluster count plus overrides."""
    fields = {"n_clusters": int(content.get("n_clusters", 6)), **(overrides or {})}
    for key in ("shallow_stages", "patch_stages"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return LADConfig(**fields)


def bank_bytes(memory: LADMemory, stats: MahalanobisStats, meta: dict[str, Any]) -> bytes:
    tensors = {f"memory.{k}": v.cpu() for k, v in memory.tensors().items()}
    tensors.update({f"stats.{k}": v.cpu() for k, v in stats.tensors().items()})
    return st_save(tensors, metadata={"meta": json.dumps(meta)})


def bank_from_bytes(data: bytes) -> tuple[LADMemory, MahalanobisStats]:
    t = st_load(data)
    mem = {k.removeprefix("memory."): v for k, v in t.items() if k.startswith("memory.")}
    sts = {k.removeprefix("stats."): v for k, v in t.items() if k.startswith("stats.")}
    return LADMemory.from_tensors(mem), MahalanobisStats.from_tensors(sts)


class LADEngine:
    def __init__(self, seg: SegmentEngine, cache_size: int = 16):
        self.seg = seg
        self.clip = seg.clip
        self.device = seg.device
        self._models: dict[LADConfig, CLIPLAD] = {}
        self._vocab: dict[str, tuple[TextClasses, TextClasses]] = {}
        self._banks: OrderedDict[int, LoadedBank] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def model(self, cfg: LADConfig) -> CLIPLAD:
        if cfg not in self._models:
            self._models[cfg] = CLIPLAD(self.clip.model.visual, cfg).to(self.device).eval()
        return self._models[cfg]

    def vocabulary(self, content: dict[str, Any]) -> tuple[TextClasses, TextClasses]:
        key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        if key not in self._vocab:
            enc = self.clip.model.encode_text
            tok = self.clip.tokenizer
            tpl = content["templates"]
            coarse = TextClasses(encode_vocabulary(enc, tok, content["coarse"], tpl, self.device),
                                 tuple(content["coarse"]), tuple(bool(f) for f in content["foreground"]))
            fine = TextClasses(encode_vocabulary(enc, tok, content["fine"], tpl, self.device),
                               tuple(content["fine"]))
            self._vocab[key] = (coarse, fine)
        return self._vocab[key]

    def _batch(self, rgbs: list[np.ndarray]) -> torch.Tensor:
        return torch.stack([preprocess(r, self.seg.image_size) for r in rgbs]).to(self.device)

    @torch.no_grad()
    def encode(self, model: CLIPLAD, rgbs: list[np.ndarray], batch_size: int = 8,
               progress: Callable[[int], None] | None = None) -> LADFeatures:
        parts = []
        for start in range(0, len(rgbs), batch_size):
            chunk = rgbs[start : start + batch_size]
            parts.append(model.encode(self._batch(chunk)))
            if progress:
                progress(len(chunk))
        return LADFeatures.cat(parts)

    @torch.no_grad()
    def build(
        self, train: list[np.ndarray], validation: list[np.ndarray], content: dict[str, Any],
        cfg: LADConfig, progress: Callable[[int], None] | None = None,
    ) -> tuple[LADMemory, MahalanobisStats, dict[str, Any]]:
        """Fit on k normal images; Mahalanobis statistics from validation normals (eq. 4).

        Without validation images the training images are scored against the memory with each
        one left out, so the statistics still describe normal variation, not zero distances.
        """
        model = self.model(cfg)
        coarse, fine = self.vocabulary(content)
        feats = self.encode(model, train, progress=progress)
        memory = model.fit(feats, coarse, fine)
        if validation:
            s = model.score(self.encode(model, validation, progress=progress), memory, coarse, fine)
            logical, structural = s.logical, s.structural
        else:
            logical, structural = self._leave_one_out(model, feats, coarse, fine)
        stats = fit_mahalanobis(logical, structural)
        summary = {
            "shots": len(train), "validation": len(validation),
            "validation_source": "validation" if validation else "leave-one-out",
            "logical": _describe(logical), "structural": _describe(structural),
            "mahalanobis_mean": stats.mean.tolist(), "patches": [int(b.shape[0]) for b in memory.patch_bank],
            "config": {"n_clusters": cfg.n_clusters, "shallow_stages": list(cfg.shallow_stages),
                       "patch_stages": list(cfg.patch_stages), "naclip_sigma": cfg.naclip_sigma,
                       "upscale": cfg.upscale, "hist_size": cfg.hist_size, "seed": cfg.seed},
        }
        return memory, stats, summary

    def _leave_one_out(self, model: CLIPLAD, feats: LADFeatures, coarse, fine):
        if feats.batch < 2:
            raise ValueError("one shot without validation images cannot estimate normal variation; "
                             "pass --validation with a few normal images")
        logical, structural = [], []
        for i in range(feats.batch):
            keep = [j for j in range(feats.batch) if j != i]
            mem = model.fit(_select(feats, keep), coarse, fine)
            s = model.score(_select(feats, [i]), mem, coarse, fine)
            logical.append(s.logical)
            structural.append(s.structural)
        return torch.cat(logical), torch.cat(structural)

    def bank(self, bank_id: int, load: Callable[[], bytes], cfg: LADConfig,
             content: dict[str, Any]) -> LoadedBank:
        with self._lock:
            hit = self._banks.get(bank_id)
            if hit is not None:
                self._banks.move_to_end(bank_id)
                return hit
        memory, stats = bank_from_bytes(load())
        coarse, fine = self.vocabulary(content)
        loaded = LoadedBank(memory, stats, cfg, coarse, fine)
        with self._lock:
            self._banks[bank_id] = loaded
            while len(self._banks) > self._cache_size:
                self._banks.popitem(last=False)
        return loaded

    @torch.no_grad()
    def score(self, bank: LoadedBank, feats: LADFeatures) -> list[dict[str, Any]]:
        model = self.model(bank.cfg)
        s = model.score(feats, bank.memory, bank.coarse, bank.fine)
        fused = mahalanobis(bank.stats, s.logical, s.structural)
        return [
            {"logical": float(s.logical[i]), "structural": float(s.structural[i]), "fused": float(fused[i]),
             "histogram": [round(float(v), 4) for v in s.histograms[i]],
             "foreground_fraction": float(s.foreground[i].float().mean())}
            for i in range(feats.batch)
        ]


def _describe(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {"mean": float(x.mean()), "std": float(x.std()) if x.numel() > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max())}


def _select(f: LADFeatures, idx: list[int]) -> LADFeatures:
    ix = torch.tensor(idx, dtype=torch.long, device=f.shallow.device)
    return LADFeatures(shallow=f.shallow[ix], last=f.last[ix], fine=f.fine[ix],
                       patches=[p[ix] for p in f.patches], grid=f.grid, fine_grid=f.fine_grid)
