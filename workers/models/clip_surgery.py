"""CLIP-AD's Staged Dual-Path model (SDP), zero-shot anomaly segmentation.

Chen et al., "CLIP-AD: A Language-Guided Staged Dual-Path Model for Zero-shot Anomaly
Detection" (seed 002). Architecture surgery (v-v attention, no FFN, eq. 4), feature surgery
(eq. 5-7), the staged dual-path blocks (eq. 8-10) and the image score of the official code.

Pure torch: the CLIP model comes in already built; no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ABNORMAL = 1  # text features are stacked (normal, abnormal) along the last axis


@dataclass(frozen=True)
class DualPathFeatures:
    """Per-stage outputs of the staged dual-path encoder."""

    surgery: list[Tensor]  # n_stages x (B, 1 + P, E): CLS replaced, ln_post, projected
    original: list[Tensor]  # n_stages x (B, 1 + P, W): original-path tokens at each tap
    grid: tuple[int, int]  # patch grid (gh, gw), P = gh * gw
    # Input tokens of the last block (B, 1 + P, W): CLIP-LAD's NACLIP block re-runs it.
    penultimate: Tensor | None = None
    # n_stages x (B, 1 + P, W): the true block outputs at each tap (no in-place quirk), so
    # consumers such as CLIP-LAD see the same features whatever official_inplace_quirk is.
    clean: list[Tensor] = field(default_factory=list)
    # n_stages x (B, 1 + P, W): each stage's raw v-v accumulator (sum of the stage's v-v attention
    # residuals) before CLS replacement, ln_post and projection. FiLo's cumulative surgery path
    # and its MMCI inputs are rebuilt from these (workers.models.filo).
    surgery_raw: list[Tensor] = field(default_factory=list)
    # (n_stages - 1) x (B, 1 + P, W): the original-path attention residual of the block right
    # after each tap but the last (what the in-place quirk adds to ``original``), kept whatever
    # official_inplace_quirk is, so FiLo can rebuild its own official taps.
    next_attn: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class SDPOutput:
    """Batched SDP prediction."""

    anomaly_map: Tensor  # (B, H, W) smoothed abnormal map at the model's input size
    cls_prob: Tensor  # (B,) softmax(100 * cls . T)[abnormal] on the last stage
    map_max: Tensor  # (B,) max of anomaly_map
    stage_maps: Tensor  # (S, B, gh, gw) per-stage abnormal surgery similarity on the patch grid
    features: DualPathFeatures | None = None  # the backbone pass, when asked for (shared with CLIP-LAD)


class StagedDualPathViT(nn.Module):
    """Wraps an open_clip ``VisionTransformer`` with the SDP surgery path.

    Every block keeps its original path. A second path computes v-v attention from the same
    block input and the block's shared qkv and output projections, without FFN or token
    residual; its outputs accumulate within a stage and reset at each stage start.
    """

    def __init__(self, visual: nn.Module, n_stages: int = 4, official_inplace_quirk: bool = True):
        super().__init__()
        blocks = visual.transformer.resblocks
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "proj", None) is None:
            raise ValueError("SDP needs a CLS-pooled open_clip ViT with a projection")
        if len(blocks) % n_stages:
            raise ValueError(f"{len(blocks)} blocks do not split into {n_stages} equal stages")
        if not isinstance(blocks[0].attn, nn.MultiheadAttention):
            raise ValueError("SDP needs open_clip's default attention blocks")
        self.visual = visual
        self.n_stages = n_stages
        self.stage_len = len(blocks) // n_stages
        # The official code stores the original-path tensor at taps 3, 6, 9 and then adds the
        # next block's attention residual to it in place; the stored tensor therefore is
        # "block output + next attention residual". It supplies the CLS of stages 1-3 and the
        # SDP+ inputs, so the published numbers depend on it (kept on by default).
        self.official_inplace_quirk = official_inplace_quirk
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.visual.grid_size
        return (int(g[0]), int(g[1]))

    def _embed(self, images: Tensor) -> Tensor:
        v = self.visual
        x = v.conv1(images)  # (B, W, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, P, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1+P, W)
        return v.ln_pre(x)

    def _attention(self, block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """Original and v-v attention residuals of one block, sharing one qkv projection."""
        attn: nn.MultiheadAttention = block.attn
        b, n, w = x.shape
        heads = attn.num_heads
        h = block.ln_1(x)
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3W)
        qkv = qkv.view(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
        q, k, v = qkv.unbind(0)
        ori = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        vv = F.scaled_dot_product_attention(v, v, v)  # queries = keys = values (eq. 4)
        both = torch.cat([ori, vv], dim=0).transpose(1, 2).reshape(2 * b, n, w)  # (2B, N, W)
        both = block.ls_1(attn.out_proj(both))  # output projection, bias included
        return both[:b], both[b:]

    def _project(self, tokens: Tensor) -> Tensor:
        return self.visual.ln_post(tokens) @ self.visual.proj  # (B, N, W) -> (B, N, E)

    def forward(self, images: Tensor) -> DualPathFeatures:
        """images (B, 3, H, W), already normalised -> per-stage dual-path features."""
        if not self.batch_first:
            raise ValueError("SDP expects a batch-first open_clip transformer")
        x = self._embed(images)
        blocks = self.visual.transformer.resblocks
        surgery: list[Tensor] = []
        original: list[Tensor] = []
        clean: list[Tensor] = []
        next_attn: list[Tensor] = []
        penultimate: Tensor | None = None
        acc: Tensor | None = None
        pending: Tensor | None = None  # tap output waiting for the next block's attention
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x  # x is rebound below, never modified in place
            ori_res, vv_res = self._attention(block, x)
            h = x + ori_res
            if pending is not None:
                original.append(h if self.official_inplace_quirk else pending)
                next_attn.append(ori_res)
                pending = None
            acc = vv_res if i % self.stage_len == 0 else acc + vv_res  # reset at stage start
            x = h + block.ls_2(block.mlp(block.ln_2(h)))
            if (i + 1) % self.stage_len == 0:
                surgery.append(acc)
                clean.append(x)
                if i + 1 == len(blocks):
                    original.append(x)
                else:
                    pending = x
        out_surgery = []
        for acc_s, ori_s in zip(surgery, original, strict=True):
            tokens = torch.cat([ori_s[:, :1], acc_s[:, 1:]], dim=1)  # CLS from the original path
            out_surgery.append(self._project(tokens))
        return DualPathFeatures(surgery=out_surgery, original=original, grid=self.grid,
                                penultimate=penultimate, clean=clean, surgery_raw=surgery,
                                next_attn=next_attn)


def feature_surgery(tokens: Tensor, text: Tensor, temperature: float = 1.0) -> Tensor:
    """Eq. 5-7: class-weighted similarities minus their mean over classes.

    tokens (B, N, E) L2-normalised with the CLS first; text (B, E, K) L2-normalised.
    Returns (B, N, K). The element-wise product summed over channels equals the dot product,
    so sum_c(w_k f_c t_kc - mean_k w_k f_c t_kc) = w_k <f, t_k> - mean_k(w_k <f, t_k>).
    """
    sim = tokens @ text  # (B, N, K)
    prob = (temperature * sim[:, :1]).softmax(dim=-1)  # (B, 1, K) from the CLS
    weighted = sim * (prob / prob.mean(dim=-1, keepdim=True))
    return weighted - weighted.mean(dim=-1, keepdim=True)


def gaussian_smooth(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Gaussian filter of (B, H, W) maps matching scipy.ndimage.gaussian_filter(mode='reflect')."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    out = maps.unsqueeze(1)  # (B, 1, H, W)
    for dim in (2, 3):
        out = _reflect_pad(out, radius, dim)
        weight = kernel.view(1, 1, -1, 1) if dim == 2 else kernel.view(1, 1, 1, -1)
        out = F.conv2d(out, weight)
    return out.squeeze(1)


def _reflect_pad(x: Tensor, radius: int, dim: int) -> Tensor:
    """scipy 'reflect' (half-sample symmetric) padding along dim, valid for any radius."""
    n = x.shape[dim]
    idx = torch.arange(-radius, n + radius, device=x.device)
    period = idx.remainder(2 * n)
    idx = torch.where(period < n, period, 2 * n - 1 - period)
    return x.index_select(dim, idx)


class SDP(nn.Module):
    """Zero-shot SDP: stage maps summed, upsampled, smoothed; image score terms."""

    def __init__(
        self,
        visual: nn.Module,
        n_stages: int = 4,
        sigma: float = 8.0,
        surgery_temperature: float = 1.0,
        official_inplace_quirk: bool = True,
    ):
        super().__init__()
        self.encoder = StagedDualPathViT(visual, n_stages, official_inplace_quirk)
        self.sigma = sigma
        self.surgery_temperature = surgery_temperature

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.encoder.visual.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, tuple | list) else (size, size)

    def forward(self, images: Tensor, text: Tensor, *, return_features: bool = False) -> SDPOutput:
        """images (B, 3, H, W) normalised; text (E, 2) or (B, E, 2) L2-normalised per column.

        return_features=True also returns the backbone pass (``SDPOutput.features``) so a
        worker can feed it to CLIP-LAD's ``encode_from`` instead of running the ViT twice.
        """
        feats = self.encoder(images)
        b = images.shape[0]
        text_b = text.unsqueeze(0).expand(b, -1, -1) if text.dim() == 2 else text  # (B, E, 2)
        text_b = text_b.to(images.dtype)
        gh, gw = feats.grid
        stage_sims = []
        for tokens in feats.surgery:
            tokens = F.normalize(tokens, dim=-1)
            sim = feature_surgery(tokens, text_b, self.surgery_temperature)  # (B, 1+P, 2)
            stage_sims.append(sim[:, 1:, ABNORMAL].reshape(b, gh, gw))  # (B, gh, gw)
        stage_maps = torch.stack(stage_sims)  # (S, B, gh, gw)
        summed = stage_maps.sum(dim=0, keepdim=False).unsqueeze(1)  # (B, 1, gh, gw)
        up = F.interpolate(summed, size=images.shape[-2:], mode="bilinear", align_corners=False)
        anomaly_map = gaussian_smooth(up.squeeze(1), self.sigma)  # (B, H, W)
        cls = F.normalize(feats.surgery[-1][:, 0], dim=-1)  # (B, E)
        logits = 100.0 * torch.einsum("be,bek->bk", cls, text_b)  # (B, 2)
        cls_prob = logits.softmax(dim=-1)[:, ABNORMAL]
        map_max = anomaly_map.flatten(1).amax(dim=1)
        return SDPOutput(anomaly_map, cls_prob, map_max, stage_maps,
                         features=feats if return_features else None)

