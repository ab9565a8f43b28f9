"""Representative Vector Selection (CLIP-AD sec. 3.1, supplementary A, eq. 16-22).

Each function takes the L2-normalised sentence embeddings of one group (N, E) and returns one
representative vector (E,), not yet re-normalised. DBSCAN and mean shift use scikit-learn's
implementations, as the official code does, so cluster membership matches exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.cluster import DBSCAN, MeanShift
from torch import Tensor

log = logging.getLogger(__name__)

METHODS = ("mean", "pca", "kde", "mean_shift", "dbscan")

# Paper defaults: KDE bandwidth 0.3, mean shift bandwidth 2, DBSCAN eps 0.5 / min_samples 15
# (MVTec-like data; the paper uses 1.5 / 25 for VisA).
DEFAULT_PARAMS: dict[str, dict[str, float]] = {
    "mean": {},
    "pca": {},
    "kde": {"bandwidth": 0.3},
    "mean_shift": {"bandwidth": 2.0},
    "dbscan": {"eps": 0.5, "min_samples": 15},
}


@dataclass(frozen=True)
class RVSResult:
    vector: Tensor  # (E,)
    notes: list[str] = field(default_factory=list)  # e.g. fallbacks taken


def representative_vector(emb: Tensor, method: str, params: dict[str, Any] | None = None) -> RVSResult:
    """emb (N, E) L2-normalised sentence embeddings -> representative vector (E,)."""
    if method not in METHODS:
        raise ValueError(f"unknown RVS method {method!r}; choose one of {', '.join(METHODS)}")
    p = {**DEFAULT_PARAMS[method], **(params or {})}
    emb = emb.float()
    if method == "mean":
        return RVSResult(emb.mean(dim=0))
    if method == "pca":
        return RVSResult(_pca(emb))
    if method == "kde":
        return RVSResult(_kde(emb, float(p["bandwidth"])))
    data = emb.cpu().double().numpy()
    if method == "mean_shift":
        labels = MeanShift(bandwidth=float(p["bandwidth"])).fit(data).labels_
    else:
        labels = DBSCAN(eps=float(p["eps"]), min_samples=int(p["min_samples"])).fit(data).labels_
    return _largest_cluster_mean(emb, labels, method)


def _pca(emb: Tensor) -> Tensor:
    """First principal component, its sign fixed by the mean (eq. 18-19)."""
    mean = emb.mean(dim=0)
    centred = emb - mean  # (N, E)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    pc = vh[0].to(emb.dtype)  # (E,) unit norm
    return pc if torch.dot(mean, pc) >= 0 else -pc


def _kde(emb: Tensor, bandwidth: float) -> Tensor:
    """Density-weighted mean with a Gaussian kernel (eq. 20).

    The official code exponentiates sklearn log-densities, which underflow to zero in high
    dimensions; softmax of the log-densities gives the same weights without underflow.
    """
    d2 = torch.cdist(emb.double(), emb.double()).pow(2)  # (N, N)
    log_density = torch.logsumexp(-d2 / (2 * bandwidth**2), dim=1)  # constants cancel below
    weights = torch.softmax(log_density, dim=0).to(emb.dtype)  # (N,)
    return weights @ emb


def _largest_cluster_mean(emb: Tensor, labels: np.ndarray, method: str) -> RVSResult:
    valid = labels[labels >= 0]
    if valid.size == 0:
        note = f"{method}: every sentence was noise; fell back to the mean of all sentences"
        log.warning(note)
        return RVSResult(emb.mean(dim=0), [note])
    largest = int(np.argmax(np.bincount(valid)))  # ties -> lowest label, like the official code
    mask = torch.from_numpy(labels == largest)
    return RVSResult(emb[mask].mean(dim=0))
