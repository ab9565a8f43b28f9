"""Few-shot patch memory: nearest-neighbour distance of query patches to k normal images' patches.

The structural branch of CLIP-LAD (seed 001, eq. 3: max over query patches of the distance to
the nearest memory patch, multi-level) and a PatchCore-style few-shot baseline. Features are
the original-path patch tokens of the staged dual-path encoder at chosen stages, L2-normalised
per level; the anomaly map is the mean over levels of each patch's nearest-neighbour distance.

Pure torch; the nearest-neighbour search is chunked so memory stays bounded for large banks
(a 64-shot ViT-L/14 bank at 448 px holds 64 * 1024 patches per level).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.models.clip_surgery import StagedDualPathViT, gaussian_smooth


@dataclass(frozen=True)
class PatchBank:
    levels: tuple[int, ...]  # stage indices the features come from
    features: list[Tensor]  # per level (M, D), L2-normalised
    grid: tuple[int, int]

    @property
    def n_patches(self) -> int:
        return int(self.features[0].shape[0]) if self.features else 0

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)


@dataclass(frozen=True)
class PatchScores:
    patch_dist: Tensor  # (B, gh, gw) mean over levels of nearest-neighbour distance
    anomaly_map: Tensor  # (B, H, W) upsampled and smoothed
    image_score: Tensor  # (B,) max of the map


def nearest_distance(query: Tensor, bank: Tensor, chunk: int = 4096) -> Tensor:
    """query (Q, D), bank (M, D), both L2-normalised -> (Q,) Euclidean distance to the nearest
    bank row, computed over bank chunks so no (Q, M) matrix larger than (Q, chunk) exists."""
    best = torch.full((query.shape[0],), float("inf"), device=query.device, dtype=query.dtype)
    buf = torch.empty((query.shape[0], min(chunk, bank.shape[0])), device=query.device, dtype=query.dtype)
    for start in range(0, bank.shape[0], chunk):
        part = bank[start : start + chunk].to(query.dtype)  # (C, D); an fp16 bank converts chunk by chunk
        d2 = buf[:, : part.shape[0]]
        torch.mm(query, part.T, out=d2)  # one reused (Q, C) block: the search's whole extra memory
        # ||q - b||^2 = 2 - 2 q.b for unit vectors; clamp guards rounding below zero.
        d2.mul_(-2.0).add_(2.0).clamp_min_(0.0)
        torch.minimum(best, d2.min(dim=1).values, out=best)
    return best.sqrt()


class PatchMemory(nn.Module):
    """Patch features of a CLIP ViT, a memory of normal patches, and distance maps."""

    def __init__(self, visual: nn.Module, levels: tuple[int, ...] = (0, 1), n_stages: int = 4,
                 sigma: float = 4.0, chunk: int = 4096):
        super().__init__()
        self.encoder = StagedDualPathViT(visual, n_stages)
        if not levels or max(levels) >= n_stages or min(levels) < 0:
            raise ValueError(f"levels {levels} must index the {n_stages} stages")
        self.levels = tuple(levels)
        self.sigma = sigma
        self.chunk = chunk

    @torch.no_grad()
    def patch_features(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> per level (B, P, D) L2-normalised patch tokens (CLS dropped)."""
        feats = self.encoder(images)
        return [F.normalize(feats.original[lv][:, 1:], dim=-1) for lv in self.levels]

    @torch.no_grad()
    def build_bank(self, images: Tensor, batch_size: int = 8) -> PatchBank:
        """k normal images (K, 3, H, W) -> memory bank of all their patches per level."""
        per_level: list[list[Tensor]] = [[] for _ in self.levels]
        for start in range(0, images.shape[0], batch_size):
            for i, f in enumerate(self.patch_features(images[start : start + batch_size])):
                per_level[i].append(f.flatten(0, 1))  # (b * P, D)
        return PatchBank(self.levels, [torch.cat(parts) for parts in per_level], self.encoder.grid)

    @torch.no_grad()
    def score(self, images: Tensor, bank: PatchBank) -> PatchScores:
        if bank.levels != self.levels:
            raise ValueError(f"bank levels {bank.levels} differ from the model's {self.levels}")
        b = images.shape[0]
        gh, gw = self.encoder.grid
        dists = []
        for q, mem in zip(self.patch_features(images), bank.features, strict=True):
            d = nearest_distance(q.flatten(0, 1), mem.to(q.device, q.dtype), self.chunk)  # (B*P,)
            dists.append(d.view(b, gh, gw))
        patch_dist = torch.stack(dists).mean(dim=0)  # (B, gh, gw)
        up = F.interpolate(patch_dist.unsqueeze(1), size=images.shape[-2:], mode="bilinear",
                           align_corners=False).squeeze(1)  # (B, H, W)
        amap = gaussian_smooth(up, self.sigma)
        # eq. 3: the image score is the largest nearest-neighbour distance over query patches
        return PatchScores(patch_dist, amap, patch_dist.flatten(1).amax(dim=1))
