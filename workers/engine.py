"""The segment engine: one loaded CLIP + SDP per process, text features cached per prompt set.

Text features depend on (weights, prompt set, class name) only, so they are computed once,
kept in memory and persisted in the object store for every other worker and restart.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from storage.keys import text_features_key
from storage.objects import ObjectNotFound, ObjectStore
from workers.imaging import preprocess
from workers.models.clip_surgery import SDP
from workers.models.prompt_ensemble import encode_text_features
from workers.weights import LoadedClip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSpec:
    """What text features are made of; ``sha256`` is the stored prompt set's content hash."""

    class_name: str
    sha256: str
    content: dict[str, Any]
    rvs_method: str
    rvs_params: dict[str, Any]

    @property
    def cache_id(self) -> str:
        return hashlib.sha256(f"{self.sha256}:{self.class_name}".encode()).hexdigest()


@dataclass(frozen=True)
class FramePrediction:
    anomaly_map: np.ndarray  # (H, W) float32 at the model's input size
    cls_prob: float
    map_max: float


class SegmentEngine:
    def __init__(self, clip: LoadedClip, device: str, sigma: float = 8.0, cache_size: int = 256):
        self.clip = clip
        self.device = torch.device(device)
        self.sdp = SDP(clip.model.visual, sigma=sigma).to(self.device).eval()
        self._text: OrderedDict[str, Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def image_size(self) -> tuple[int, int]:
        return self.sdp.image_size

    def text_features(self, spec: PromptSpec, store: ObjectStore | None) -> Tensor:
        """(E, 2) features: memory, then object store, then computed and persisted."""
        with self._lock:
            hit = self._text.get(spec.cache_id)
            if hit is not None:
                self._text.move_to_end(spec.cache_id)
                return hit
        key = text_features_key(self.clip.fingerprint, spec.cache_id)
        feats = self._load(store, key)
        if feats is None:
            result = encode_text_features(
                self.clip.model.encode_text,
                self.clip.tokenizer,
                spec.content,
                spec.class_name,
                spec.rvs_method,
                spec.rvs_params,
                device=self.device,
            )
            for note in result.notes:
                log.warning("prompt set %s for %s: %s", spec.sha256[:12], spec.class_name, note)
            feats = result.features
            if store is not None:
                store.put_bytes(key, st_save({"text": feats.contiguous()}))
        feats = feats.to(self.device)
        with self._lock:
            self._text[spec.cache_id] = feats
            while len(self._text) > self._cache_size:
                self._text.popitem(last=False)
        return feats

    @staticmethod
    def _load(store: ObjectStore | None, key: str) -> Tensor | None:
        if store is None:
            return None
        try:
            return st_load(store.get_bytes(key))["text"]
        except ObjectNotFound:
            return None

    @torch.no_grad()
    def predict(self, rgbs: list[np.ndarray], texts: list[Tensor]) -> list[FramePrediction]:
        """A batch of RGB frames, each with its category's text features."""
        if not rgbs:
            return []
        batch = torch.stack([preprocess(rgb, self.image_size) for rgb in rgbs]).to(self.device)
        text = torch.stack(texts).to(self.device)  # (B, E, 2)
        out = self.sdp(batch, text)
        maps = out.anomaly_map.float().cpu().numpy()
        return [
            FramePrediction(maps[i], float(out.cls_prob[i]), float(out.map_max[i]))
            for i in range(len(rgbs))
        ]

    @torch.no_grad()
    def predict_with_features(self, rgb: np.ndarray, text: Tensor, keep: bool):
        """One frame; with ``keep`` also the dual-path features other stages reuse (one pass)."""
        batch = preprocess(rgb, self.image_size).unsqueeze(0).to(self.device)  # (1, 3, H, W)
        out = self.sdp(batch, text.unsqueeze(0).to(self.device), return_features=keep)
        pred = FramePrediction(out.anomaly_map[0].float().cpu().numpy(), float(out.cls_prob[0]),
                               float(out.map_max[0]))
        return pred, out.features
