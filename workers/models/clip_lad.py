"""CLIP-LAD: training-free few-shot logical anomaly detection by coarse-to-fine CLIP segmentation.

Specification: "CLIP-LAD: Unleash the Potential of CLIP for Few-shot Logical Anomaly Detection"
(seed 001; no public code exists). The fine stage follows NACLIP, Hajimiri et al., "Pay Attention
to Your Neighbours: Training-Free Open-Vocabulary Semantic Segmentation" (arXiv 2404.08181).

Pipeline (one shared pass of ``StagedDualPathViT``; the ViT is split into 4 stages):

1. Foreground extraction (sec. 3.1). Spherical k-means on the shallow-stage patch tokens of the
   k normal images gives N centroids mu_i; every patch of an image goes to its nearest centroid,
   giving class-agnostic region proposals m_i. Eq. 1 averages the last-stage (projected) patch
   tokens inside each region, ``F_mi = sum(F * m_i) / sum(m_i)``; the region embedding is
   classified with coarse prompts ("background", "connector", ...) and the regions whose best
   class is an object class form the foreground. The centroids are stored and reused unchanged
   for queries (sec. 3.2).
2. Fine alignment. NACLIP's last block (key-key attention plus a Gaussian neighbourhood bias,
   no residual, no FFN) runs on the penultimate tokens upsampled x2; every fine token is labelled
   with the closest fine prompt ("red cable", ...), inside the foreground only.
3. Memory (sec. 3.2). A class histogram per normal image (bins = fine classes, background
   excluded) -> M_hist; multi-level original-path patch tokens of the normals -> M_patch.
4. Scores. Logical, eq. 2 ``s_log = min_{h in M_hist} ||h_test / h||_1`` made precise as the
   symmetric relative difference (``histogram_distances``); structural, eq. 3, the largest
   nearest-memory-patch distance over query patches; fusion, eq. 4, the Mahalanobis distance of
   (s_log, s_str) from the mean and covariance of validation normals.

Multi-class mode (several sub-types in one bank, sec. 4 "Extension from one-class to
multi-class") needs no code of its own: fit on the mixed normals, one or more per sub-type, with
enough clusters; the nearest-histogram minimum of eq. 2 then picks the matching sub-type.

Pure torch: the CLIP model and text features come in already built; no I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.models.clip_surgery import DualPathFeatures, StagedDualPathViT, gaussian_smooth
from workers.models.patch_memory import nearest_distance

COARSE_LOGIT_SCALE = 100.0  # CLIP's logit scale for the region softmax over coarse prompts


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LADConfig:
    n_clusters: int = 6  # k-means regions, per category (too many fragment, too few blur; Fig. 4/5)
    shallow_stages: tuple[int, ...] = (0, 1)  # stages feeding k-means (paper: the first two)
    patch_stages: tuple[int, ...] = (1, 2)  # multi-level patch memory for the structural score
    naclip_sigma: float = 5.0  # NACLIP's Gaussian std, in units of the (upscaled) fine grid
    upscale: int = 2  # fine prediction on an x2 finer grid (paper: "up-scale feature maps by x2")
    hist_size: int = 64  # class histograms on 64 x 64 masks
    kmeans_iters: int = 50
    seed: int = 0
    map_sigma: float = 4.0  # smoothing of the structural map at the input size
    nn_chunk: int = 4096  # bank rows per nearest-neighbour chunk

    def __post_init__(self) -> None:
        if self.n_clusters < 1 or self.upscale < 1 or self.hist_size < 1 or self.kmeans_iters < 0:
            raise ValueError("n_clusters, upscale and hist_size must be >= 1, kmeans_iters >= 0")
        if self.naclip_sigma <= 0:
            raise ValueError("naclip_sigma must be positive")
        if not self.shallow_stages or not self.patch_stages:
            raise ValueError("shallow_stages and patch_stages must not be empty")


@dataclass(frozen=True)
class TextClasses:
    """A vocabulary: one L2-normalised text embedding per class name."""

    features: Tensor  # (E, K) L2-normalised columns
    names: tuple[str, ...]
    foreground: tuple[bool, ...] | None = None  # coarse vocabularies: which classes are object

    def __post_init__(self) -> None:
        if self.features.dim() != 2 or self.features.shape[1] != len(self.names):
            raise ValueError(f"features {tuple(self.features.shape)} need one column per name")
        if self.foreground is not None and len(self.foreground) != len(self.names):
            raise ValueError("foreground needs one flag per name")

    @property
    def n_classes(self) -> int:
        return len(self.names)


def _coarse_flags(coarse: TextClasses) -> tuple[bool, ...]:
    # Without flags class 0 is the background and every other class an object (the VOC-style
    # convention NACLIP's vocabularies use); at least one object class is required.
    flags = coarse.foreground or (False,) + (True,) * (coarse.n_classes - 1)
    if not any(flags):
        raise ValueError("the coarse vocabulary needs at least one foreground class")
    return flags


def _fine_flags(fine: TextClasses) -> tuple[bool, ...]:
    # Fine classes flagged False (e.g. a "background" word that absorbs stray patches) are
    # labelled background (-1): their bins stay in the histogram but are always empty.
    return fine.foreground or (True,) * fine.n_classes


@torch.no_grad()
def encode_vocabulary(
    encode_text: Callable[[Tensor], Tensor],
    tokenize: Callable[[list[str]], Tensor],
    names: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    chunk: int = 256,
) -> Tensor:
    """Prompt-ensembled class embeddings (E, K), float32 on the CPU.

    Per class: every template ("a photo of a {}.") filled with the name, encoded, each sentence
    L2-normalised, averaged, and the mean L2-normalised again (CLIP's ensembling, as NACLIP does).
    """
    if not names or not templates:
        raise ValueError("need at least one class name and one template")
    sentences = [t.format(n) for n in names for t in templates]  # name-major
    parts = [
        encode_text(tokenize(sentences[i : i + chunk]).to(device)).float()
        for i in range(0, len(sentences), chunk)
    ]
    emb = F.normalize(torch.cat(parts), dim=-1)  # (K * T, E)
    emb = emb.view(len(names), len(templates), -1)  # (K, T, E)
    return F.normalize(emb.mean(dim=1), dim=-1).T.contiguous().cpu()  # (E, K)


# --------------------------------------------------------------------------- data containers


@dataclass(frozen=True)
class LADFeatures:
    """Everything CLIP-LAD needs from one backbone pass, for a batch of B images."""

    shallow: Tensor  # (B, P, S * W) per-stage unit tokens concatenated / sqrt(S): unit norm
    last: Tensor  # (B, P, E) last-stage patch tokens, ln_post + proj, L2-normalised
    fine: Tensor  # (B, P2, E) NACLIP tokens on the upscaled grid, ln_post + proj, L2-normalised
    patches: list[Tensor]  # per patch stage (B, P, W) L2-normalised original-path patch tokens
    grid: tuple[int, int]  # (gh, gw), P = gh * gw
    fine_grid: tuple[int, int]  # (upscale * gh, upscale * gw), P2 = product

    @property
    def batch(self) -> int:
        return int(self.shallow.shape[0])

    @classmethod
    def cat(cls, parts: Sequence[LADFeatures]) -> LADFeatures:
        """Concatenate batches (e.g. k normal images encoded in chunks) along the batch axis."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        if any(p.grid != first.grid or p.fine_grid != first.fine_grid for p in parts):
            raise ValueError("features come from different grids")
        return cls(
            shallow=torch.cat([p.shallow for p in parts]),
            last=torch.cat([p.last for p in parts]),
            fine=torch.cat([p.fine for p in parts]),
            patches=[torch.cat(level) for level in zip(*(p.patches for p in parts), strict=True)],
            grid=first.grid,
            fine_grid=first.fine_grid,
        )


@dataclass
class LADMemory:
    """What a fitted CLIP-LAD persists: k-means centroids, histogram bank, patch bank."""

    centroids: Tensor  # (N, Ds) unit rows, reused unchanged to partition queries
    histograms: Tensor  # (M, Kf) M_hist, one class histogram per normal image
    patch_bank: list[Tensor]  # per patch level (Mp, W) M_patch, L2-normalised
    n_fine: int  # Kf, the fine vocabulary size the histograms were built with

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor dict (detached, contiguous, CPU) for safetensors."""
        out = {
            "centroids": self.centroids,
            "histograms": self.histograms,
            "n_fine": torch.tensor([self.n_fine], dtype=torch.int64),
        }
        for i, level in enumerate(self.patch_bank):
            out[f"patch_bank.{i}"] = level
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor]) -> LADMemory:
        levels = sorted(int(k.split(".", 1)[1]) for k in d if k.startswith("patch_bank."))
        if levels != list(range(len(levels))):
            raise ValueError(f"patch bank levels {levels} are not 0..n-1")
        return cls(
            centroids=d["centroids"],
            histograms=d["histograms"],
            patch_bank=[d[f"patch_bank.{i}"] for i in levels],
            n_fine=int(d["n_fine"].reshape(-1)[0]),
        )


@dataclass(frozen=True)
class LADScores:
    logical: Tensor  # (B,) eq. 2
    structural: Tensor  # (B,) eq. 3, max of patch_dist
    structural_map: Tensor  # (B, H, W) patch_dist upsampled to the input size, smoothed (sigma 4)
    foreground: Tensor  # (B, gh, gw) bool
    fine_mask: Tensor  # (B, hist, hist) long, fine class index, -1 background
    histograms: Tensor  # (B, Kf)
    regions: Tensor  # (B, gh, gw) long, k-means region of each patch
    patch_dist: Tensor  # (B, gh, gw) mean over levels of the nearest-memory-patch distance
    nearest: Tensor  # (B,) long, index of the bank histogram attaining the eq. 2 minimum


@dataclass(frozen=True)
class MahalanobisStats:
    mean: Tensor  # (2,) float64: mean (s_log, s_str) of validation normals
    cov_inv: Tensor  # (2, 2) float64: inverse of the ridge-regularised covariance

    def tensors(self) -> dict[str, Tensor]:
        return {"mean": self.mean.detach().cpu().contiguous(), "cov_inv": self.cov_inv.detach().cpu().contiguous()}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor]) -> MahalanobisStats:
        return cls(mean=d["mean"], cov_inv=d["cov_inv"])


@dataclass(frozen=True)
class KMeansResult:
    centroids: Tensor  # (N, D) unit rows
    labels: Tensor  # (X,) long: nearest centroid of every point under the final centroids
    n_iter: int  # Lloyd iterations run


# --------------------------------------------------------------------------- k-means


def assign_clusters(x: Tensor, centroids: Tensor) -> Tensor:
    """x (X, D) and centroids (N, D), unit rows -> (X,) index of the nearest centroid.

    For unit vectors ||x - c||^2 = 2 - 2 x.c, so the Euclidean nearest centroid is the one of
    largest cosine; ties go to the lowest index.
    """
    return (x @ centroids.T).argmax(dim=1)


def _kmeans_pp(x: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D^2."""
    first = int(torch.randint(x.shape[0], (1,), generator=gen))
    chosen = [first]
    d2 = (2.0 - 2.0 * (x @ x[first])).clamp_min(0.0)  # (X,)
    for _ in range(1, n):
        total = float(d2.sum())
        # all points coincide with a centre: nothing to prefer, draw uniformly
        probs = d2 / total if total > 0 else torch.ones_like(d2)
        nxt = int(torch.multinomial(probs.double().cpu(), 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, (2.0 - 2.0 * (x @ x[nxt])).clamp_min(0.0))
    return x[chosen].clone()  # (N, D)


def kmeans(x: Tensor, n_clusters: int, iters: int = 50, seed: int = 0) -> KMeansResult:
    """Spherical k-means (cosine): rows are L2-normalised, centroids renormalised after each mean.

    Cosine rather than raw Euclidean so a stored centroid partitions query patches by the same
    metric it was fitted with (queries are unit vectors too). Seeded k-means++ init, Lloyd
    iterations until the assignment stops changing. An emptied cluster is re-seeded with the
    point farthest from its own centroid, so all N regions stay usable. Deterministic per seed.
    """
    x = F.normalize(x.float(), dim=-1)  # (X, D)
    if x.shape[0] < n_clusters:
        raise ValueError(f"{x.shape[0]} points cannot form {n_clusters} clusters")
    gen = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp(x, n_clusters, gen)
    labels = assign_clusters(x, centroids)
    n_iter = 0
    for it in range(iters):
        n_iter = it + 1
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # (N, D)
        counts = torch.bincount(labels, minlength=n_clusters)  # (N,)
        empty = (counts == 0).nonzero().flatten()
        centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), centroids)
        if empty.numel():
            own = (x * centroids[labels]).sum(dim=1)  # (X,) cosine to own centroid
            far = own.argsort()[: empty.numel()]  # least similar points first
            centroids[empty] = x[far]
        new_labels = assign_clusters(x, centroids)
        converged = torch.equal(new_labels, labels)
        labels = new_labels
        if converged:
            break
    return KMeansResult(centroids, labels, n_iter)


# --------------------------------------------------------------------------- NACLIP block


def neighbourhood_bias(
    grid: tuple[int, int], sigma: float, with_cls: bool = True,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """NACLIP's attention addition: exp(-d^2 / (2 sigma^2)) between grid positions.

    d is the Euclidean distance between patch positions (row-major, the token order), in grid
    units of the grid given (the upscaled one for CLIP-LAD). The value is unnormalised (1 on the
    diagonal) and added to the logits, as NACLIP does. With with_cls the CLS row and column get
    0: NACLIP gives the CLS token no spatial prior. Returns (1 + P, 1 + P) or (P, P).
    """
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device),
                            indexing="ij")  # (gh, gw) each
    ys, xs = ys.flatten().float(), xs.flatten().float()  # (P,) row-major, the token order
    # integer squared distances are exact in float32 for any realistic grid
    d2 = (ys[:, None] - ys[None]).square() + (xs[:, None] - xs[None]).square()  # (P, P)
    bias = torch.exp(-d2 / (2.0 * sigma**2))
    if with_cls:
        bias = F.pad(bias, (1, 0, 1, 0))  # (1 + P, 1 + P), zero CLS row and column
    return bias.to(dtype)


def naclip_attention(block: nn.Module, tokens: Tensor, grid: tuple[int, int], sigma: float,
                     bias: Tensor | None = None) -> Tensor:
    """NACLIP's reduced last block: attention branch only, key-key logits plus neighbourhood bias.

    tokens (B, 1 + P, W) with the CLS first; grid the patch grid of those tokens. Uses the
    block's ln_1 and in/out projections; softmax(k k^T / sqrt(d) + bias) v per head. No residual
    and no MLP: NACLIP's "reduced" last block, which it found to give cleaner dense
    predictions than the full block. ls_1 (the attention branch's layer scale, Identity in CLIP) is kept
    so the branch equals the block's own attention branch. ``bias`` may pass a cached
    ``neighbourhood_bias(grid, sigma)``. Returns (B, 1 + P, W).
    """
    attn: nn.MultiheadAttention = block.attn
    b, n, w = tokens.shape
    heads = attn.num_heads
    h = block.ln_1(tokens)
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3W)
    qkv = qkv.view(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
    _, k, v = qkv.unbind(0)
    if bias is None:
        bias = neighbourhood_bias(grid, sigma, device=tokens.device, dtype=tokens.dtype)  # (N, N)
    # SDPA with query = key computes softmax(k k^T * d^-0.5 + bias) v without storing the
    # (B, heads, N, N) logits on backends with float-mask support (N ~ 4097 for ViT-L at 448).
    out = F.scaled_dot_product_attention(k, k, v, attn_mask=bias)  # (B, heads, N, d)
    out = out.transpose(1, 2).reshape(b, n, w)  # (B, N, W)
    return block.ls_1(attn.out_proj(out))


# --------------------------------------------------------------------------- histograms, scores


def class_histogram(mask: Tensor, n_classes: int) -> Tensor:
    """mask (B, H, W) long, class index or -1 -> (B, K) class fractions of the foreground pixels.

    Background (-1) is excluded, so bins sum to 1 over the foreground; an image without
    foreground gets an all-zero histogram (handled by ``histogram_distances``).
    """
    flat = mask.flatten(1)  # (B, H * W)
    if flat.numel() and int(flat.max()) >= n_classes:
        raise ValueError(f"mask holds class {int(flat.max())} but there are {n_classes} bins")
    valid = (flat >= 0).to(torch.float32)
    counts = torch.zeros(flat.shape[0], n_classes, device=mask.device)
    counts.scatter_add_(1, flat.clamp_min(0), valid)  # (B, K)
    total = counts.sum(dim=1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1.0), torch.zeros_like(counts))


def histogram_distances(hist: Tensor, bank: Tensor, eps: float = 1e-8) -> Tensor:
    """hist (B, K), bank (M, K) -> (B, M) symmetric relative difference sum_k |a-b| / (a+b).

    Eq. 2 writes ||h_test / h||_1, a "difference ratio" chosen over an L2 difference because of
    unbalanced classes. Read literally it is not 0 for a match (it is K) and undefined for empty
    bins, so we use the symmetric ratio deviation: each bin contributes its change relative to
    its size, in [0, 1], 0 iff equal, 1 when a class appears or vanishes. A small part going
    missing (1 % of the mask) therefore counts as much as a large one, which an L1/L2 difference
    would barely register. Bins empty in both contribute 0; the result is finite for any input.
    """
    a = hist[:, None].double()  # (B, 1, K)
    b = bank[None].to(a.device).double()  # (1, M, K)
    den = a + b
    ratio = torch.where(den > eps, (a - b).abs() / den.clamp_min(eps), torch.zeros_like(den))
    return ratio.sum(dim=-1).to(hist.dtype)  # (B, M)


def logical_score(hist: Tensor, bank: Tensor, eps: float = 1e-8) -> Tensor:
    """Eq. 2: distance of each query histogram (B, K) to its nearest bank histogram (M, K) -> (B,)."""
    return histogram_distances(hist, bank, eps).amin(dim=1)


def fit_mahalanobis(logical: Tensor, structural: Tensor, ridge: float = 1e-6) -> MahalanobisStats:
    """Eq. 4 statistics from validation normals: mean and inverse covariance of (s_log, s_str).

    Unbiased covariance (N - 1). The ridge is relative, ridge * mean variance * I (absolute
    ridge when both variances are 0 or N = 1), so a singular covariance, e.g. s_log = 0 on
    every normal, stays invertible; any deviation along a direction the normals never varied
    in then scores very high, which is the intended limit. Computed in float64.
    """
    x = torch.stack([logical.flatten(), structural.flatten()], dim=1).double()  # (N, 2)
    if x.shape[0] == 0:
        raise ValueError("need at least one validation score pair")
    mean = x.mean(dim=0)
    cov = torch.cov(x.T) if x.shape[0] > 1 else torch.zeros(2, 2, dtype=x.dtype, device=x.device)
    scale = float(cov.diagonal().mean())
    scale = scale if scale > 0 else 1.0
    cov_inv = torch.linalg.inv(cov + ridge * scale * torch.eye(2, dtype=x.dtype, device=x.device))
    return MahalanobisStats(mean=mean, cov_inv=cov_inv)


def mahalanobis(stats: MahalanobisStats, logical: Tensor, structural: Tensor) -> Tensor:
    """Eq. 4: sqrt((x - mu) Sigma^-1 (x - mu)^T) per image -> (B,).

    The paper prints Sigma where the Mahalanobis distance has its inverse; we use the inverse.
    """
    x = torch.stack([logical.flatten(), structural.flatten()], dim=1).double()  # (B, 2)
    d = x - stats.mean.to(x)
    d2 = torch.einsum("bi,ij,bj->b", d, stats.cov_inv.to(x), d).clamp_min(0.0)
    return d2.sqrt().to(logical.dtype)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class _Segmentation:
    regions: Tensor  # (B, gh, gw) long
    foreground: Tensor  # (B, gh, gw) bool
    fine_mask: Tensor  # (B, hist, hist) long, -1 background


class CLIPLAD(nn.Module):
    """Coarse-to-fine CLIP segmentation, histogram and patch memories, CLIP-LAD scores."""

    def __init__(self, visual: nn.Module, cfg: LADConfig = LADConfig(), n_stages: int = 4):
        super().__init__()
        # The quirk flag does not matter here: CLIP-LAD reads the clean taps only.
        self.encoder = StagedDualPathViT(visual, n_stages)
        for s in (*cfg.shallow_stages, *cfg.patch_stages):
            if not 0 <= s < n_stages:
                raise ValueError(f"stage {s} outside the {n_stages} stages")
        self.cfg = cfg
        # (1 + P2)^2 bias per (grid, device, dtype): 67 MB for ViT-L/14 at 448 px, built once
        self._bias_cache: dict[tuple[tuple[int, int], str, torch.dtype], Tensor] = {}

    def _bias(self, grid: tuple[int, int], like: Tensor) -> Tensor:
        key = (grid, str(like.device), like.dtype)
        if key not in self._bias_cache:
            self._bias_cache[key] = neighbourhood_bias(grid, self.cfg.naclip_sigma, device=like.device,
                                                       dtype=like.dtype)
        return self._bias_cache[key]

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.encoder.visual.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, tuple | list) else (size, size)

    @torch.no_grad()
    def encode(self, images: Tensor) -> LADFeatures:
        """images (B, 3, H, W), normalised -> features, from one StagedDualPathViT pass."""
        return self.encode_from(self.encoder(images))

    @torch.no_grad()
    def encode_from(self, feats: DualPathFeatures) -> LADFeatures:
        """Reuse a pass of the same visual tower (e.g. SDP's); only the NACLIP block runs here."""
        if feats.penultimate is None or len(feats.clean) != self.encoder.n_stages:
            raise ValueError("DualPathFeatures lack penultimate/clean tokens; use StagedDualPathViT")
        cfg = self.cfg
        visual = self.encoder.visual
        gh, gw = feats.grid
        b = feats.penultimate.shape[0]
        # Clean taps: the true stage outputs, independent of SDP's in-place quirk.
        shallow = torch.cat([F.normalize(feats.clean[s][:, 1:], dim=-1) for s in cfg.shallow_stages],
                            dim=-1)  # (B, P, S * W)
        # Concatenating unit vectors and dividing by sqrt(S) keeps unit norm and makes the dot
        # product the mean of the per-stage cosines: each shallow stage weighs equally.
        shallow = shallow / math.sqrt(len(cfg.shallow_stages))
        last = F.normalize(self._project(feats.clean[-1][:, 1:]), dim=-1)  # (B, P, E)
        patches = [F.normalize(feats.clean[s][:, 1:], dim=-1) for s in cfg.patch_stages]

        # NACLIP on the x`upscale` grid: the penultimate patch tokens (residual stream, before
        # ln_1) are upsampled bilinearly as a feature map; CLS is kept as it is.
        pen = feats.penultimate
        w = pen.shape[-1]
        fgh, fgw = gh * cfg.upscale, gw * cfg.upscale
        fmap = pen[:, 1:].transpose(1, 2).reshape(b, w, gh, gw)  # (B, W, gh, gw)
        if cfg.upscale > 1:
            fmap = F.interpolate(fmap, size=(fgh, fgw), mode="bilinear", align_corners=False)
        up = torch.cat([pen[:, :1], fmap.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + P2, W)
        block = visual.transformer.resblocks[-1]
        out = naclip_attention(block, up, (fgh, fgw), cfg.naclip_sigma,
                               self._bias((fgh, fgw), up))  # (B, 1 + P2, W)
        fine = F.normalize(self._project(out[:, 1:]), dim=-1)  # (B, P2, E)
        return LADFeatures(shallow=shallow, last=last, fine=fine, patches=patches,
                           grid=(gh, gw), fine_grid=(fgh, fgw))

    def _project(self, tokens: Tensor) -> Tensor:
        return self.encoder.visual.ln_post(tokens) @ self.encoder.visual.proj  # (B, N, W) -> (B, N, E)

    # ----------------------------------------------------------------- segmentation

    def regions(self, feats: LADFeatures, memory: LADMemory) -> Tensor:
        """(B, gh, gw) long: each patch's nearest stored centroid (mask proposals m_i)."""
        b = feats.batch
        gh, gw = feats.grid
        cent = memory.centroids.to(feats.shallow)
        if cent.shape[1] != feats.shallow.shape[-1]:
            raise ValueError("centroids were fitted on other shallow stages")
        return assign_clusters(feats.shallow.flatten(0, 1), cent).view(b, gh, gw)  # (B*P,) -> (B, gh, gw)

    def _segment(self, feats: LADFeatures, memory: LADMemory, coarse: TextClasses,
                 fine: TextClasses) -> _Segmentation:
        cfg = self.cfg
        b = feats.batch
        gh, gw = feats.grid
        fgh, fgw = feats.fine_grid
        regions = self.regions(feats, memory)  # (B, gh, gw)
        n = memory.centroids.shape[0]

        # Eq. 1: average the last-stage tokens of each image inside each of its regions.
        onehot = F.one_hot(regions.flatten(1), n).to(feats.last.dtype)  # (B, P, N)
        counts = onehot.sum(dim=1)  # (B, N)
        region_emb = onehot.transpose(1, 2) @ feats.last  # (B, N, E)
        region_emb = F.normalize(region_emb / counts.clamp_min(1.0)[..., None], dim=-1)
        text_c = coarse.features.to(region_emb)  # (E, Kc)
        probs = (COARSE_LOGIT_SCALE * region_emb @ text_c).softmax(dim=-1)  # (B, N, Kc)
        flags = torch.tensor(_coarse_flags(coarse), device=regions.device)  # (Kc,)
        fg_region = flags[probs.argmax(dim=-1)] & (counts > 0)  # (B, N)
        foreground = fg_region.gather(1, regions.flatten(1)).view(b, gh, gw)  # (B, P) -> (B, gh, gw)

        # Fine alignment: per-token argmax over the fine prompts, kept inside the foreground.
        text_f = fine.features.to(feats.fine)  # (E, Kf)
        fine_cls = (feats.fine @ text_f).argmax(dim=-1).view(b, fgh, fgw)  # (B, P2) -> (B, fgh, fgw)
        part = torch.tensor(_fine_flags(fine), device=fine_cls.device)[fine_cls]  # (B, fgh, fgw)
        # nearest-exact: pixel-centre nearest, identical to replication for integer factors
        fg_fine = F.interpolate(foreground[:, None].float(), size=(fgh, fgw),
                                mode="nearest-exact")[:, 0] > 0.5  # (B, fgh, fgw)
        mask = torch.where(fg_fine & part, fine_cls, torch.full_like(fine_cls, -1))
        # Fused coarse + fine mask resized to the histogram resolution (64 x 64 in the paper).
        hs = cfg.hist_size
        mask = F.interpolate(mask[:, None].float(), size=(hs, hs), mode="nearest-exact")[:, 0]
        return _Segmentation(regions, foreground, mask.round().long())  # (B, hs, hs)

    @torch.no_grad()
    def segment(self, feats: LADFeatures, memory: LADMemory, coarse: TextClasses,
                fine: TextClasses) -> tuple[Tensor, Tensor]:
        """-> foreground (B, gh, gw) bool, fine_mask (B, hist, hist) long (-1 background)."""
        seg = self._segment(feats, memory, coarse, fine)
        return seg.foreground, seg.fine_mask

    # ----------------------------------------------------------------- fit and score

    @torch.no_grad()
    def fit(self, feats: LADFeatures, coarse: TextClasses, fine: TextClasses) -> LADMemory:
        """Build the memory from the k normal images' features (batch = k; mixed sub-types ok)."""
        cfg = self.cfg
        km = kmeans(feats.shallow.flatten(0, 1), cfg.n_clusters, cfg.kmeans_iters, cfg.seed)  # (k*P, Ds)
        bank = [level.flatten(0, 1).clone() for level in feats.patches]  # (k*P, W) per level
        memory = LADMemory(centroids=km.centroids.to(feats.shallow), histograms=torch.empty(0),
                           patch_bank=bank, n_fine=fine.n_classes)
        seg = self._segment(feats, memory, coarse, fine)
        memory.histograms = class_histogram(seg.fine_mask, fine.n_classes)  # (k, Kf)
        return memory

    @torch.no_grad()
    def score(self, feats: LADFeatures, memory: LADMemory, coarse: TextClasses,
              fine: TextClasses) -> LADScores:
        cfg = self.cfg
        if memory.n_fine != fine.n_classes:
            raise ValueError(f"memory has {memory.n_fine} fine classes, vocabulary {fine.n_classes}")
        if len(memory.patch_bank) != len(feats.patches):
            raise ValueError("memory and features have different patch levels")
        b = feats.batch
        gh, gw = feats.grid
        seg = self._segment(feats, memory, coarse, fine)
        hist = class_histogram(seg.fine_mask, fine.n_classes)  # (B, Kf)
        dist = histogram_distances(hist, memory.histograms.to(hist))  # (B, M)
        logical, nearest = dist.min(dim=1)

        per_level = []
        for q, mem in zip(feats.patches, memory.patch_bank, strict=True):
            d = nearest_distance(q.flatten(0, 1), mem.to(q), cfg.nn_chunk)  # (B*P,)
            per_level.append(d.view(b, gh, gw))  # (B, gh, gw)
        # Mean over levels per patch, then the max over patches (eq. 3), as PatchMemory does, so
        # the image score is the maximum of the (unsmoothed) structural map.
        patch_dist = torch.stack(per_level).mean(dim=0)  # (B, gh, gw)
        structural = patch_dist.flatten(1).amax(dim=1)
        up = F.interpolate(patch_dist[:, None], size=self.image_size, mode="bilinear",
                           align_corners=False)[:, 0]  # (B, H, W)
        return LADScores(
            logical=logical,
            structural=structural,
            structural_map=gaussian_smooth(up, cfg.map_sigma),
            foreground=seg.foreground,
            fine_mask=seg.fine_mask,
            histograms=hist,
            regions=seg.regions,
            patch_dist=patch_dist,
            nearest=nearest,
        )
