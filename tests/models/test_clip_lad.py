"""CLIP-LAD on the tiny random open_clip model: k-means reuse, NACLIP block, shared pass, scores."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from workers.models.clip_lad import (
    CLIPLAD,
    LADConfig,
    LADFeatures,
    LADMemory,
    MahalanobisStats,
    TextClasses,
    assign_clusters,
    class_histogram,
    encode_vocabulary,
    fit_mahalanobis,
    histogram_distances,
    kmeans,
    logical_score,
    mahalanobis,
    naclip_attention,
    neighbourhood_bias,
)
from workers.models.clip_surgery import SDP, DualPathFeatures, StagedDualPathViT
from workers.weights import load_clip

TEMPLATES = ["a photo of a {}.", "a close-up photo of the {}."]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


@pytest.fixture(scope="module")
def clip():
    return load_clip("inspect-tiny", "random")


@pytest.fixture(scope="module")
def lad(clip):
    return CLIPLAD(clip.model.visual, LADConfig(n_clusters=4))


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def vocab(clip):
    def enc(names):
        return encode_vocabulary(clip.model.encode_text, clip.tokenizer, names, TEMPLATES)

    coarse = TextClasses(enc(["background", "object"]), ("background", "object"), (False, True))
    fine_names = ("red disc", "blue square", "grey plate")
    return coarse, TextClasses(enc(list(fine_names)), fine_names)


# --------------------------------------------------------------------------- clip_surgery extension


@torch.no_grad()
def test_dual_path_features_extension(clip, images):
    visual = clip.model.visual
    old = DualPathFeatures(surgery=[], original=[], grid=(8, 8))  # old constructor still works
    assert old.penultimate is None and old.clean == []

    quirky = StagedDualPathViT(visual)(images)
    plain = StagedDualPathViT(visual, official_inplace_quirk=False)(images)
    enc = StagedDualPathViT(visual)
    x = enc._embed(images)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    torch.testing.assert_close(quirky.penultimate, x, atol=1e-5, rtol=1e-5)
    assert len(quirky.clean) == 4
    for c_q, c_p, o_p in zip(quirky.clean, plain.clean, plain.original, strict=True):
        torch.testing.assert_close(c_q, c_p)  # clean taps do not depend on the quirk
        torch.testing.assert_close(c_p, o_p)  # and equal the quirk-free original path
    assert not torch.allclose(quirky.clean[0], quirky.original[0])  # the quirk changes stored taps
    assert quirky.clean[-1] is quirky.original[-1]


@torch.no_grad()
def test_sdp_return_features(clip, images):
    sdp = SDP(clip.model.visual)
    text = F.normalize(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), dim=0)
    plain = sdp(images, text)
    shared = sdp(images, text, return_features=True)
    assert plain.features is None and isinstance(shared.features, DualPathFeatures)
    torch.testing.assert_close(plain.anomaly_map, shared.anomaly_map)


# --------------------------------------------------------------------------- shared pass, features


@torch.no_grad()
def test_encode_from_sdp_pass_equals_encode(clip, lad, images):
    sdp = SDP(clip.model.visual)  # the official quirk is on: CLIP-LAD reads clean taps only
    text = F.normalize(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), dim=0)
    shared = lad.encode_from(sdp(images, text, return_features=True).features)
    own = lad.encode(images)
    for name in ("shallow", "last", "fine"):
        torch.testing.assert_close(getattr(shared, name), getattr(own, name))
    for a, b in zip(shared.patches, own.patches, strict=True):
        torch.testing.assert_close(a, b)
    assert own.grid == (8, 8) and own.fine_grid == (16, 16)
    assert own.shallow.shape == (4, 64, 128) and own.last.shape == (4, 64, 64)
    assert own.fine.shape == (4, 256, 64) and [p.shape for p in own.patches] == [(4, 64, 64)] * 2
    for t in (own.shallow, own.last, own.fine, *own.patches):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:2]))
    with pytest.raises(ValueError, match="penultimate"):
        lad.encode_from(DualPathFeatures(surgery=[], original=[], grid=(8, 8)))


@torch.no_grad()
def test_features_cat_equals_one_batch(lad, images):
    whole = lad.encode(images)
    parts = LADFeatures.cat([lad.encode(images[:1]), lad.encode(images[1:])])
    torch.testing.assert_close(parts.shallow, whole.shallow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts.fine, whole.fine, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- k-means


def test_kmeans_deterministic_and_consistent():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    x = centres.repeat_interleave(40, dim=0) + 0.05 * torch.randn(120, 16, generator=g)  # (120, 16)
    a = kmeans(x, 3, iters=50, seed=7)
    b = kmeans(x, 3, iters=50, seed=7)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    # labels are the nearest stored centroid of every point
    assert torch.equal(assign_clusters(F.normalize(x, dim=-1), a.centroids), a.labels)
    torch.testing.assert_close(a.centroids.norm(dim=-1), torch.ones(3))
    # three tight blobs come out as three pure clusters
    for blob in a.labels.view(3, 40):
        assert blob.unique().numel() == 1
    assert a.labels.unique().numel() == 3


def test_kmeans_degenerate_inputs():
    same = torch.ones(10, 4)
    res = kmeans(same, 3, iters=5, seed=0)  # all points coincide: no NaN, no crash
    assert torch.isfinite(res.centroids).all() and res.labels.shape == (10,)
    with pytest.raises(ValueError):
        kmeans(torch.randn(2, 4), 3)


@torch.no_grad()
def test_fit_centroids_are_reused_unchanged(lad, images, vocab):
    coarse, fine = vocab
    feats = lad.encode(images)
    mem = lad.fit(feats, coarse, fine)
    km = kmeans(feats.shallow.flatten(0, 1), lad.cfg.n_clusters, lad.cfg.kmeans_iters, lad.cfg.seed)
    assert torch.equal(mem.centroids, km.centroids)
    # assigning the training features with the stored centroids reproduces the fit's partition
    assert torch.equal(lad.regions(feats, mem).flatten(), km.labels)
    before = mem.centroids.clone()
    out = lad.score(feats, mem, coarse, fine)
    assert torch.equal(mem.centroids, before)  # scoring never refits
    assert torch.equal(out.regions.flatten(), km.labels)
    # the query partition follows the stored centroids: permuting them permutes the regions
    perm = torch.tensor([2, 0, 3, 1])
    moved = LADMemory(mem.centroids[perm], mem.histograms, mem.patch_bank, mem.n_fine)
    assert torch.equal(perm[lad.regions(feats, moved)], lad.regions(feats, mem))
    # and the segmentation does not depend on the region numbering
    torch.testing.assert_close(lad.score(feats, moved, coarse, fine).histograms, out.histograms)


# --------------------------------------------------------------------------- NACLIP


def test_neighbourhood_bias_values():
    sigma = 2.0
    bias = neighbourhood_bias((3, 4), sigma)
    assert bias.shape == (13, 13)
    torch.testing.assert_close(bias, bias.T)
    assert bias[0].abs().sum() == 0 and bias[:, 0].abs().sum() == 0  # no prior on the CLS
    patch = bias[1:, 1:]
    torch.testing.assert_close(patch.diagonal(), torch.ones(12))
    assert bool((patch.amax(dim=1) == patch.diagonal()).all())
    # token i sits at (i // 4, i % 4): known distances d^2 = 1, 2, 4 + 9
    torch.testing.assert_close(patch[0, 1], torch.tensor(math.exp(-1 / (2 * sigma**2))))
    torch.testing.assert_close(patch[0, 5], torch.tensor(math.exp(-2 / (2 * sigma**2))))
    torch.testing.assert_close(patch[0, 11], torch.tensor(math.exp(-13 / (2 * sigma**2))))
    assert neighbourhood_bias((3, 4), sigma, with_cls=False).shape == (12, 12)
    wide = neighbourhood_bias((3, 4), 5.0)[1:, 1:]
    off = ~torch.eye(12, dtype=torch.bool)
    assert bool((wide[off] > patch[off]).all())  # a larger sigma spreads attention further


def _reference_naclip(block, tokens, grid, sigma):
    """Per-head key-key attention with an explicit softmax and a loop-built Gaussian bias."""
    attn = block.attn
    b, n, w = tokens.shape
    heads = attn.num_heads
    d = w // heads
    h = block.ln_1(tokens)
    k = (h @ attn.in_proj_weight[w : 2 * w].T + attn.in_proj_bias[w : 2 * w]).view(b, n, heads, d)
    v = (h @ attn.in_proj_weight[2 * w :].T + attn.in_proj_bias[2 * w :]).view(b, n, heads, d)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, d)
    gh, gw = grid
    bias = torch.zeros(n, n)
    for i in range(gh * gw):
        for j in range(gh * gw):
            dy, dx = i // gw - j // gw, i % gw - j % gw
            bias[1 + i, 1 + j] = math.exp(-(dy * dy + dx * dx) / (2 * sigma**2))
    a = (k @ k.transpose(-1, -2) * d**-0.5 + bias).softmax(dim=-1)
    return attn.out_proj((a @ v).transpose(1, 2).reshape(b, n, w))  # no residual, no MLP


@torch.no_grad()
def test_naclip_block_is_attention_only(clip):
    block = clip.model.visual.transformer.resblocks[-1]
    tokens = torch.randn(2, 1 + 12, 64, generator=torch.Generator().manual_seed(5))
    out = naclip_attention(block, tokens, (3, 4), 5.0)
    torch.testing.assert_close(out, _reference_naclip(block, tokens, (3, 4), 5.0), atol=1e-5, rtol=1e-5)
    # the MLP plays no part: perturbing it leaves the output unchanged
    other = copy.deepcopy(block)
    for p in other.mlp.parameters():
        p.add_(1.0)
    torch.testing.assert_close(naclip_attention(other, tokens, (3, 4), 5.0), out)
    assert not torch.allclose(out, block(tokens), atol=1e-3)  # not the full residual block


@torch.no_grad()
def test_fine_tokens_match_reference(clip, lad, images):
    visual = clip.model.visual
    dual = lad.encoder(images[:2])
    pen = dual.penultimate  # (2, 65, 64)
    fmap = pen[:, 1:].transpose(1, 2).reshape(2, 64, 8, 8)
    up = F.interpolate(fmap, scale_factor=2, mode="bilinear", align_corners=False)  # (2, 64, 16, 16)
    tokens = torch.cat([pen[:, :1], up.flatten(2).transpose(1, 2)], dim=1)  # (2, 257, 64)
    ref = _reference_naclip(visual.transformer.resblocks[-1], tokens, (16, 16), 5.0)
    ref = F.normalize(visual.ln_post(ref[:, 1:]) @ visual.proj, dim=-1)
    torch.testing.assert_close(lad.encode_from(dual).fine, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- histograms, logical score


def test_class_histogram_properties():
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(-1, 3, (3, 8, 8), generator=g)
    mask[2] = -1  # no foreground at all
    hist = class_histogram(mask, 3)
    assert hist.shape == (3, 3)
    torch.testing.assert_close(hist[:2].sum(dim=1), torch.ones(2))
    assert torch.equal(hist[2], torch.zeros(3))
    counts = torch.stack([(mask[0] == k).sum() for k in range(3)]).float()
    torch.testing.assert_close(hist[0], counts / counts.sum())
    perm = torch.tensor([2, 0, 1])  # class k becomes perm[k]
    relabelled = torch.where(mask >= 0, perm[mask.clamp_min(0)], mask)
    torch.testing.assert_close(class_histogram(relabelled, 3)[:, perm], hist)
    with pytest.raises(ValueError):
        class_histogram(torch.full((1, 2, 2), 3), 3)


def test_logical_score_properties():
    bank = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.8, 0.0]])
    assert torch.equal(logical_score(bank, bank), torch.zeros(2))  # in the bank: 0
    # move mass from class 0 to class 1: the score grows monotonically
    steps = torch.linspace(0, 0.4, 5)
    moved = torch.stack([torch.tensor([0.5 - s, 0.3 + s, 0.2, 0.0]) for s in steps])
    scores = logical_score(moved, bank[:1])
    assert scores[0] == 0 and bool((scores.diff() > 0).all())
    # a vanished class costs a full unit however small it was (unbalanced classes)
    small = torch.tensor([[0.98, 0.0, 0.02, 0.0]])
    gone = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert float(logical_score(gone, small)) == pytest.approx(1.0 + 0.02 / 1.98, rel=1e-5)
    # empty bins and an empty query histogram stay finite; symmetric in its arguments
    empty = torch.zeros(1, 4)
    assert float(logical_score(empty, bank[:1])) == pytest.approx(3.0)
    assert torch.isfinite(histogram_distances(torch.cat([bank, empty]), torch.cat([bank, empty]))).all()
    torch.testing.assert_close(histogram_distances(moved, bank), histogram_distances(bank, moved).T)


# --------------------------------------------------------------------------- Mahalanobis fusion


def test_mahalanobis_fit_and_distances():
    g = torch.Generator().manual_seed(0)
    log = 0.3 + 0.1 * torch.randn(50, generator=g)
    stru = 1.0 + 0.2 * torch.randn(50, generator=g) + 0.5 * log
    stats = fit_mahalanobis(log, stru)
    x = torch.stack([log, stru], dim=1).double()
    torch.testing.assert_close(stats.mean, x.mean(dim=0))
    torch.testing.assert_close(torch.linalg.inv(stats.cov_inv), torch.cov(x.T), atol=1e-8, rtol=1e-4)
    at_mean = mahalanobis(stats, stats.mean[:1].float(), stats.mean[1:].float())
    assert float(at_mean) == pytest.approx(0.0, abs=1e-3)
    # known value for a diagonal covariance: offsets of 2 std and 1 std -> sqrt(4 + 1)
    diag = MahalanobisStats(mean=torch.tensor([1.0, 2.0], dtype=torch.float64),
                            cov_inv=torch.diag(torch.tensor([1 / 4.0, 1 / 9.0], dtype=torch.float64)))
    d = mahalanobis(diag, torch.tensor([1.0 + 2 * 2.0]), torch.tensor([2.0 + 3.0]))
    assert float(d) == pytest.approx(math.sqrt(5.0))
    # fitted diagonal case: +-a / +-b patterns are uncorrelated with unbiased variance 4/3 a^2
    a, b = 0.5, 2.0
    fitted = fit_mahalanobis(torch.tensor([a, -a, a, -a]), torch.tensor([b, b, -b, -b]))
    probe = mahalanobis(fitted, torch.tensor([3 * a * math.sqrt(4 / 3)]), torch.tensor([0.0]))
    assert float(probe) == pytest.approx(3.0, rel=1e-4)
    # round trip for safetensors
    again = MahalanobisStats.from_tensors(st_load(st_save(stats.tensors())))
    torch.testing.assert_close(again.cov_inv, stats.cov_inv)


def test_mahalanobis_singular_covariance():
    stats = fit_mahalanobis(torch.zeros(6), torch.linspace(0.1, 0.6, 6))  # s_log never varies
    assert torch.isfinite(stats.cov_inv).all()
    d = mahalanobis(stats, torch.tensor([0.0, 0.0, 0.1]), torch.tensor([0.35, 0.6, 0.35]))
    assert torch.isfinite(d).all() and float(d[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(d[2]) > 100 * float(d[1])  # a deviation the normals never showed dominates
    for one in (fit_mahalanobis(torch.tensor([0.2]), torch.tensor([0.4])),
                fit_mahalanobis(torch.zeros(3), torch.zeros(3))):
        assert torch.isfinite(one.cov_inv).all()


# --------------------------------------------------------------------------- full pipeline


def test_encode_vocabulary_is_template_ensemble(clip):
    names = ["cable", "plate", "screw"]
    feats = encode_vocabulary(clip.model.encode_text, clip.tokenizer, names, TEMPLATES)
    assert feats.shape == (64, 3)
    torch.testing.assert_close(feats.norm(dim=0), torch.ones(3))
    with torch.no_grad():
        tokens = clip.tokenizer([t.format("plate") for t in TEMPLATES])
        emb = F.normalize(clip.model.encode_text(tokens), dim=-1)  # (T, E)
    torch.testing.assert_close(feats[:, 1], F.normalize(emb.mean(dim=0), dim=0), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_fit_and_score_shapes(lad, images, vocab):
    coarse, fine = vocab
    train = lad.encode(images[:2])
    mem = lad.fit(train, coarse, fine)
    assert mem.centroids.shape == (4, 128) and mem.histograms.shape == (2, 3) and mem.n_fine == 3
    assert [b.shape for b in mem.patch_bank] == [(128, 64), (128, 64)]
    out = lad.score(lad.encode(images), mem, coarse, fine)
    assert out.logical.shape == (4,) and out.structural.shape == (4,)
    assert out.structural_map.shape == (4, 64, 64)
    assert out.foreground.shape == (4, 8, 8) and out.foreground.dtype == torch.bool
    assert out.fine_mask.shape == (4, 64, 64) and out.fine_mask.dtype == torch.long
    assert int(out.fine_mask.min()) >= -1 and int(out.fine_mask.max()) <= 2
    assert out.histograms.shape == (4, 3) and out.regions.shape == (4, 8, 8)
    # fine labels only inside the foreground (8 x 8 patch grid -> 64 x 64 mask: x8 replication)
    fg_pixels = out.foreground.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (4, 64, 64)
    assert bool((out.fine_mask[~fg_pixels] == -1).all())
    sums = out.histograms.sum(dim=1)
    assert bool(((sums - 1).abs() < 1e-5).logical_or(sums == 0).all())
    torch.testing.assert_close(out.structural, out.patch_dist.flatten(1).amax(1))
    assert bool((out.logical >= 0).all()) and torch.isfinite(out.logical).all()
    # the memory survives a safetensors round trip with identical scores
    again = LADMemory.from_tensors(st_load(st_save(mem.tensors())))
    same = lad.score(lad.encode(images), again, coarse, fine)
    torch.testing.assert_close(same.logical, out.logical)
    torch.testing.assert_close(same.structural, out.structural)
    with pytest.raises(ValueError, match="fine classes"):
        lad.score(train, mem, coarse, TextClasses(fine.features[:, :2], fine.names[:2]))


@torch.no_grad()
def test_structural_score_zero_for_bank_images(lad, images, vocab):
    coarse, fine = vocab
    feats = lad.encode(images[:3])
    mem = lad.fit(feats, coarse, fine)
    out = lad.score(feats, mem, coarse, fine)
    assert float(out.structural.max()) < 1e-2
    assert torch.equal(out.logical, torch.zeros(3))  # their own histograms are in the bank
    assert torch.equal(out.nearest, torch.arange(3))


def test_config_and_stage_validation(clip):
    with pytest.raises(ValueError):
        LADConfig(n_clusters=0)
    with pytest.raises(ValueError):
        CLIPLAD(clip.model.visual, LADConfig(patch_stages=(4,)))


# --------------------------------------------------------------------------- synthetic logical check


def _scene(seed: int, missing: int | None = None) -> torch.Tensor:
    """Grey plate with two red discs and one blue square at fixed slots; `missing` drops one."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((3, 64, 64), 0.5) + 0.02 * torch.randn(3, 64, 64, generator=g)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for slot, (cy, cx) in enumerate([(18, 16), (18, 48)]):
        if slot != missing:
            img[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    if missing != 2:
        img[:, 40:56, 24:40] = torch.tensor([0.1, 0.2, 0.9])[:, None, None]
    return (img.clamp(0, 1) - CLIP_MEAN) / CLIP_STD


def _layout_labels(size: int) -> torch.Tensor:
    """(size, size) long: 0 red disc, 1 blue square, -1 plate, for the complete layout."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    lab = torch.full((64, 64), -1.0)
    for cy, cx in [(18, 16), (18, 48)]:
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = 0
    lab[40:56, 24:40] = 1
    return F.interpolate(lab[None, None], size=(size, size), mode="nearest-exact")[0, 0].long()


def _prototype(tokens: torch.Tensor, grid: tuple[int, int], cls: int) -> torch.Tensor:
    sel = tokens[:, _layout_labels(grid[0]).flatten() == cls]  # (k, n, E)
    return F.normalize(sel.mean(dim=(0, 1)), dim=0)


@torch.no_grad()
def test_synthetic_missing_component(clip, vocab):
    lad = CLIPLAD(clip.model.visual, LADConfig(n_clusters=6))
    train = lad.encode(torch.stack([_scene(s) for s in range(4)]))
    val = lad.encode(torch.stack([_scene(s) for s in range(10, 14)]))
    test = lad.encode(torch.stack([_scene(s) for s in range(20, 26)]
                                  + [_scene(30 + i, missing=i % 3) for i in range(6)]))
    is_anomaly = torch.arange(12) >= 6

    # (a) Logical branch with an oracle vocabulary. A random text tower names nothing, so the
    # "prompts" here are visual prototypes of the parts (mean fine / last-stage tokens of the
    # known part pixels of the normals): this tests the coarse-to-fine segmentation, the
    # histograms and eq. 2 independently of text quality. A missing disc or square changes the
    # part histogram, so every anomaly must score above every normal.
    coarse = TextClasses(torch.stack([
        _prototype(train.last, train.grid, -1),
        F.normalize(_prototype(train.last, train.grid, 0) + _prototype(train.last, train.grid, 1), dim=0),
    ], dim=1), ("plate", "object"), (False, True))
    fine = TextClasses(torch.stack([_prototype(train.fine, train.fine_grid, c) for c in (0, 1)], dim=1),
                       ("red disc", "blue square"))
    mem = lad.fit(train, coarse, fine)
    out = lad.score(test, mem, coarse, fine)
    assert float(out.logical[is_anomaly].min()) > float(out.logical[~is_anomaly].max())

    # (b) Real (random-weight) text vocabularies: region/part names from a random text tower
    # are arbitrary, so the logical score alone is not asserted here; the structural branch
    # (a missing part leaves plate patches where the normals never had any) and the fused
    # Mahalanobis score (eq. 4, fitted on the validation normals) must rank anomalies higher.
    coarse_t, fine_t = vocab
    mem_t = lad.fit(train, coarse_t, fine_t)
    val_out = lad.score(val, mem_t, coarse_t, fine_t)
    out_t = lad.score(test, mem_t, coarse_t, fine_t)
    stats = fit_mahalanobis(val_out.logical, val_out.structural)
    fused = mahalanobis(stats, out_t.logical, out_t.structural)
    for s in (out_t.structural, fused):
        assert float(s[is_anomaly].min()) > float(s[~is_anomaly].max())
    assert float(out_t.logical[is_anomaly].mean()) >= float(out_t.logical[~is_anomaly].mean())
