"""SDP on tiny random open_clip models: shapes, parity with a plain reference, surgery identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from workers.models.clip_surgery import SDP, StagedDualPathViT, feature_surgery, gaussian_smooth
from workers.weights import load_clip


@pytest.fixture(scope="module")
def clip():
    return load_clip("inspect-tiny", "random")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 64, 64, generator=g)


def _vv_residual(block, x):
    """v-v attention written out per head with an explicit softmax (no SDPA)."""
    attn = block.attn
    b, n, w = x.shape
    heads = attn.num_heads
    d = w // heads
    h = block.ln_1(x)
    wv = attn.in_proj_weight[2 * w :]
    bv = attn.in_proj_bias[2 * w :]
    v = (h @ wv.T + bv).view(b, n, heads, d).transpose(1, 2)  # (B, heads, N, d)
    a = (v @ v.transpose(-1, -2) * d**-0.5).softmax(-1)
    out = (a @ v).transpose(1, 2).reshape(b, n, w)
    return block.ls_1(attn.out_proj(out))


def _reference(visual, images, stage_len):
    """The official code's loop: stored taps are modified in place by the next attention add."""
    enc = StagedDualPathViT(visual)
    x = enc._embed(images)
    stored, surg = [], []
    acc = None
    blocks = visual.transformer.resblocks
    for i, blk in enumerate(blocks):
        vv = _vv_residual(blk, x)
        ori_attn = blk.ls_1(blk.attention(blk.ln_1(x)))
        acc = vv if i % stage_len == 0 else acc + vv
        x += ori_attn  # in place, like `x_ori += x_ori_res`
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        if (i + 1) % stage_len == 0:
            stored.append(x)
            surg.append(acc)
    out = []
    for a, o in zip(surg, stored, strict=True):
        t = a.clone()
        t[:, 0] = o[:, 0]
        out.append(visual.ln_post(t) @ visual.proj)
    return out, stored


@torch.no_grad()
def test_shapes(clip, images):
    sdp = SDP(clip.model.visual)
    text = F.normalize(torch.randn(64, 2), dim=0)
    out = sdp(images, text)
    assert out.anomaly_map.shape == (3, 64, 64)
    assert out.stage_maps.shape == (4, 3, 8, 8)
    assert out.cls_prob.shape == (3,) and out.map_max.shape == (3,)
    assert torch.all((out.cls_prob >= 0) & (out.cls_prob <= 1))
    assert torch.allclose(out.map_max, out.anomaly_map.flatten(1).amax(1))


@torch.no_grad()
def test_matches_reference_loop_with_official_quirk(clip, images):
    visual = clip.model.visual
    feats = StagedDualPathViT(visual)(images)
    ref_surg, ref_stored = _reference(visual, images.clone(), stage_len=1)
    assert len(feats.surgery) == 4
    for got, want in zip(feats.surgery, ref_surg, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for got, want in zip(feats.original, ref_stored, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_last_stage_cls_is_clip_image_embedding(clip, images):
    feats = StagedDualPathViT(clip.model.visual)(images)
    torch.testing.assert_close(feats.surgery[-1][:, 0], clip.model.encode_image(images), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_stage_accumulator_resets_and_cls_is_replaced(clip, images):
    visual = clip.model.visual
    enc = StagedDualPathViT(visual, n_stages=2)  # 4 blocks -> 2 stages of 2
    feats = enc(images)
    x = enc._embed(images)
    vvs = []
    for blk in visual.transformer.resblocks:
        vvs.append(_vv_residual(blk, x))
        x = blk(x)
    for s, (got, orig) in enumerate(zip(feats.surgery, feats.original, strict=True)):
        acc = vvs[2 * s] + vvs[2 * s + 1]  # only this stage's blocks
        want_patches = visual.ln_post(acc) @ visual.proj
        torch.testing.assert_close(got[:, 1:], want_patches[:, 1:], atol=1e-5, rtol=1e-4)
        want_cls = visual.ln_post(orig[:, 0]) @ visual.proj
        torch.testing.assert_close(got[:, 0], want_cls, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_quirk_off_stores_clean_block_outputs(clip, images):
    visual = clip.model.visual
    feats = StagedDualPathViT(visual, official_inplace_quirk=False)(images)
    x = StagedDualPathViT(visual)._embed(images)
    for i, blk in enumerate(visual.transformer.resblocks):
        x = blk(x)
        torch.testing.assert_close(feats.original[i], x, atol=1e-5, rtol=1e-4)


def test_feature_surgery_two_classes_is_antisymmetric_and_matches_elementwise():
    g = torch.Generator().manual_seed(0)
    tokens = F.normalize(torch.randn(2, 10, 16, generator=g), dim=-1)
    text = F.normalize(torch.randn(2, 16, 2, generator=g), dim=1)
    sim = feature_surgery(tokens, text)
    torch.testing.assert_close(sim[..., 1], -sim[..., 0])
    # eq. 5-7 written element-wise, as in CLIP Surgery
    prob = (tokens[:, :1] @ text).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)  # (B, 1, K)
    feats = tokens.unsqueeze(2) * text.transpose(1, 2).unsqueeze(1)  # (B, N, K, E)
    feats = feats * w.unsqueeze(-1)
    explicit = (feats - feats.mean(2, keepdim=True)).sum(-1)
    torch.testing.assert_close(sim, explicit, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("size", "sigma"), [(240, 8.0), (16, 8.0), (31, 2.0)])
def test_gaussian_smooth_matches_scipy(size, sigma):
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((2, size, size + 3)).astype(np.float64)
    got = gaussian_smooth(torch.from_numpy(maps), sigma).numpy()
    for i in range(2):
        want = gaussian_filter(maps[i], sigma=sigma, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(got[i], want, atol=1e-10)


@torch.no_grad()
def test_deterministic_and_random_weights_are_seeded(images):
    a = load_clip("inspect-tiny", "random")
    b = load_clip("inspect-tiny", "random")
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    text = F.normalize(torch.randn(64, 2, generator=torch.Generator().manual_seed(3)), dim=0)
    o1 = SDP(a.model.visual)(images, text)
    o2 = SDP(b.model.visual)(images, text)
    assert torch.equal(o1.anomaly_map, o2.anomaly_map)
    assert a.random_weights and a.fingerprint == b.fingerprint


@torch.no_grad()
def test_per_image_text_features_in_one_batch(clip, images):
    sdp = SDP(clip.model.visual)
    g = torch.Generator().manual_seed(5)
    texts = F.normalize(torch.randn(3, 64, 2, generator=g), dim=1)
    batched = sdp(images, texts)
    for i in range(3):
        single = sdp(images[i : i + 1], texts[i])
        torch.testing.assert_close(batched.anomaly_map[i], single.anomaly_map[0], atol=1e-5, rtol=1e-4)
