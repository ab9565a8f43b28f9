"""FiLo scoring on the tiny random open_clip model: prompts, modules, official-loop parity, guards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.models.clip_surgery import DualPathFeatures, StagedDualPathViT
from workers.models.filo import (
    GENERIC_ABNORMAL,
    MMCI,
    MMCI_KERNELS,
    NORMAL_STATES,
    POSITIONS,
    Adapter,
    FiLoHead,
    LinearDecoders,
    UntrainedFiLoError,
    convert_official_state_dict,
    encode_filo_text,
    encode_filo_text_bank,
    filo_head_inputs,
    filo_sentences,
    gaussian_blur,
)
from workers.weights import load_clip

PHRASES = ["solder bridge", "scratch on the surface", "  missing part "]


@pytest.fixture(scope="module")
def clip():
    return load_clip("inspect-tiny", "random")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def features(clip, images):
    with torch.no_grad():
        return StagedDualPathViT(clip.model.visual)(images)


def _text(seed: int = 3, batch: int | None = None) -> torch.Tensor:
    shape = (64, 2) if batch is None else (batch, 64, 2)
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-2)


def _head(clip, **kwargs) -> FiLoHead:
    torch.manual_seed(0)
    return FiLoHead.for_visual(clip.model.visual, **kwargs).eval()


# ---- prompts ---------------------------------------------------------------------------------


def test_sentences_counts_suffix_and_format():
    normal, abnormal = filo_sentences("pcb", PHRASES, None, None, "top left")
    assert normal == [s.format("pcb") for s in NORMAL_STATES] and len(normal) == 7
    assert len(abnormal) == len(PHRASES) + len(GENERIC_ABNORMAL) == 8
    assert abnormal[0] == "abnormal pcb with solder bridge at top left"
    assert abnormal[2] == "abnormal pcb with missing part at top left"  # stripped
    assert abnormal[3:] == [g.format("pcb") + " at top left" for g in GENERIC_ABNORMAL]
    assert abnormal[3] == "damaged pcb at top left" and abnormal[-1] == "pcb with damage at top left"
    assert all(s.endswith(" at top left") for s in abnormal)
    assert not any(" at " in s for s in normal)  # normal sentences are never positioned

    _, plain = filo_sentences("pcb", PHRASES, None, None, None)
    assert plain[0] == "abnormal pcb with solder bridge" and not any(" at " in s for s in plain)
    _, custom = filo_sentences("nut", ["", "dent"], ["cracked {}"], ["good {}"], "center")
    assert custom == ["abnormal nut with dent at center", "cracked nut at center"]
    with pytest.raises(ValueError, match="unknown position"):
        filo_sentences("pcb", PHRASES, position="middle")
    assert len(POSITIONS) == 9 and POSITIONS[4] == "center"


def _encode_group(clip, sentences: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(clip.model.encode_text(clip.tokenizer(sentences)).float(), dim=-1)  # (N, E)


def test_position_none_is_mean_over_nine_positions(clip):
    templates = ("{}.", "a photo of {}.")
    got = encode_filo_text(clip.model.encode_text, clip.tokenizer, "pcb", PHRASES, None, templates)
    assert got.shape == (64, 2)
    torch.testing.assert_close(got.norm(dim=0), torch.ones(2))
    per_pos = []
    for p in POSITIONS:
        _, ab = filo_sentences("pcb", PHRASES, None, None, p)
        per_pos.append(_encode_group(clip, [t.format(s) for s in ab for t in templates]).mean(0))
    want_ab = F.normalize(torch.stack(per_pos).mean(0), dim=0)  # mean of normalised embeddings, normalised
    normal, _ = filo_sentences("pcb", PHRASES, None, None, None)
    want_n = F.normalize(_encode_group(clip, [t.format(s) for s in normal for t in templates]).mean(0), dim=0)
    torch.testing.assert_close(got[:, 1], want_ab, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[:, 0], want_n, atol=1e-5, rtol=1e-4)

    bank = encode_filo_text_bank(clip.model.encode_text, clip.tokenizer, "pcb", PHRASES, templates)
    assert set(bank) == {*POSITIONS, None}
    torch.testing.assert_close(bank[None], got)
    for i, p in enumerate(POSITIONS):
        single = encode_filo_text(clip.model.encode_text, clip.tokenizer, "pcb", PHRASES, p, templates)
        torch.testing.assert_close(bank[p], single, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(single[:, 1], F.normalize(per_pos[i], dim=0), atol=1e-5, rtol=1e-4)
    # pure function of its inputs
    again = encode_filo_text(clip.model.encode_text, clip.tokenizer, "pcb", PHRASES, None, templates)
    assert torch.equal(again, got)


# ---- modules ---------------------------------------------------------------------------------


def test_mmci_kernels_same_padding_and_fusion():
    torch.manual_seed(0)
    m = MMCI(16, 8)
    assert [tuple(c.weight.shape[-2:]) for c in m.branches] == list(MMCI_KERNELS)
    assert list(MMCI_KERNELS) == [(1, 1), (3, 3), (5, 5), (7, 7), (1, 5), (5, 1)]
    assert all(c.padding == "same" for c in m.branches)
    tokens = torch.randn(2, 5 * 6, 16)
    out = m(tokens, (5, 6))
    assert out.shape == (2, 30, 8)
    # same padding = symmetric zero padding of (k - 1) / 2, branch outputs summed
    x = tokens.transpose(1, 2).reshape(2, 16, 5, 6)  # (B, C, gh, gw)
    want = sum(
        F.conv2d(x, c.weight, c.bias, padding=((k[0] - 1) // 2, (k[1] - 1) // 2))
        for c, k in zip(m.branches, MMCI_KERNELS, strict=True)
    )
    torch.testing.assert_close(out, want.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-4)
    m.fuse = False
    torch.testing.assert_close(m(tokens, (5, 6)), out, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        m(tokens, (5, 5))


def test_mmci_fused_kernel_cache_follows_the_weights():
    torch.manual_seed(0)
    m = MMCI(16, 8)
    tokens = torch.randn(2, 25, 16)
    with torch.inference_mode():
        m(tokens, (5, 5))  # builds the cache inside inference mode
    with torch.no_grad():
        m.branches[3].weight.add_(0.5)  # in place: version counter moves
        got = m(tokens, (5, 5))
        m.fuse = False
        want = m(tokens, (5, 5))
        m.fuse = True
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    other = MMCI(16, 8)
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(tokens, (5, 5)), other(tokens, (5, 5)), atol=1e-5, rtol=1e-4)
    # with autograd the fused kernel is rebuilt and gradients reach every branch
    m(tokens, (5, 5)).square().sum().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in m.branches)
    with pytest.raises(ValueError, match="odd"):
        MMCI(4, 4, kernels=[(2, 2)])


def test_linear_decoders_and_adapter():
    torch.manual_seed(0)
    dec = LinearDecoders(16, 8, 3)
    outs = dec([torch.randn(2, 10, 16) for _ in range(3)])
    assert [o.shape for o in outs] == [(2, 10, 8)] * 3
    with pytest.raises(ValueError):
        dec([torch.randn(2, 10, 16)])
    ad = Adapter(16)
    assert ad.down.weight.shape == (8, 16) and ad.up.weight.shape == (16, 8)
    assert ad.down.bias is None and ad.up.bias is None
    x = torch.randn(4, 16)
    torch.testing.assert_close(ad(x), x + F.silu(ad.up(F.relu(ad.down(x)))))
    with torch.no_grad():
        ad.up.weight.zero_()
    assert torch.equal(ad(x), x)  # SiLU(0) = 0: residual identity


def test_gaussian_blur_matches_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    maps = torch.rand(3, 20, 17, generator=torch.Generator().manual_seed(0))
    want = tvf.gaussian_blur(maps, kernel_size=[3, 3], sigma=[4.0, 4.0])  # (C, H, W) treated as channels
    torch.testing.assert_close(gaussian_blur(maps, 3, 4.0), want, atol=1e-6, rtol=1e-5)
    want5 = tvf.gaussian_blur(maps, kernel_size=[5, 5], sigma=[1.5, 1.5])
    torch.testing.assert_close(gaussian_blur(maps, 5, 1.5), want5, atol=1e-6, rtol=1e-5)


# ---- head inputs: parity with the official dual-path loop ------------------------------------


def _vv_residual(block, x):
    attn = block.attn
    b, n, w = x.shape
    heads = attn.num_heads
    d = w // heads
    v = block.ln_1(x) @ attn.in_proj_weight[2 * w :].T + attn.in_proj_bias[2 * w :]
    v = v.view(b, n, heads, d).transpose(1, 2)  # (B, heads, N, d)
    out = ((v @ v.transpose(-1, -2)) * d**-0.5).softmax(-1) @ v
    return block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(b, n, w)))


def _ori_residual(block, x):
    return block.ls_1(block.attention(block.ln_1(x)))


def _official_taps(visual, images, stage_len):
    """The official vv_open_clip Transformer loop, in-place adds and list taps included."""
    state = StagedDualPathViT(visual)._embed(images)
    out = []
    for i, blk in enumerate(visual.transformer.resblocks):
        if i < stage_len:  # single path before the dual-path blocks
            state = state + _ori_residual(blk, state)
            state = state + blk.ls_2(blk.mlp(blk.ln_2(state)))
        elif i == stage_len:  # start of the dual path
            x = state
            vv = _vv_residual(blk, x)
            x_ori = x + _ori_residual(blk, x)
            x_ori = x_ori + blk.ls_2(blk.mlp(blk.ln_2(x_ori)))
            x += vv  # in place, on the tensor already stored as the first tap
            state = [x, x_ori]
        else:
            x, x_ori = state
            vv, ori = _vv_residual(blk, x_ori), _ori_residual(blk, x_ori)
            x_ori += ori
            x_ori = x_ori + blk.ls_2(blk.mlp(blk.ln_2(x_ori)))
            x += vv
            state = [x, x_ori]
        if (i + 1) % stage_len == 0:
            out.extend(state if isinstance(state, list) else [state])
    return out


@torch.no_grad()
@pytest.mark.parametrize("n_stages", [4, 2])
def test_head_inputs_match_official_loop(clip, images, n_stages):
    visual = clip.model.visual
    feats = StagedDualPathViT(visual, n_stages=n_stages)(images)
    taps = _official_taps(visual, images.clone(), stage_len=4 // n_stages)
    assert len(taps) == 2 * n_stages - 1
    linear_in, mmci_in = filo_head_inputs(feats, official_quirks=True)
    assert len(linear_in) == n_stages and len(mmci_in) == n_stages - 1
    for got, want in zip(linear_in, taps[::2], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for got, want in zip(mmci_in, taps[1::2], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_head_inputs_without_quirks_are_clean_taps_and_running_vv_path(clip, images, features):
    visual = clip.model.visual
    linear_in, mmci_in = filo_head_inputs(features, official_quirks=False)
    x = StagedDualPathViT(visual)._embed(images)
    blocks = visual.transformer.resblocks
    clean, vv_path = [], []
    path = None
    for i, blk in enumerate(blocks):
        vv = _vv_residual(blk, x)
        x = blk(x)
        if i == 0:
            path = x
        else:
            path = path + vv
            vv_path.append(path)
        clean.append(x)
    for got, want in zip(linear_in, clean, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for got, want in zip(mmci_in, vv_path, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_head_inputs_need_filo_taps():
    with pytest.raises(ValueError, match="lack FiLo"):
        filo_head_inputs(DualPathFeatures(surgery=[], original=[], grid=(8, 8), clean=[torch.zeros(1)] * 4))


# ---- the head --------------------------------------------------------------------------------


@torch.no_grad()
def test_forward_shapes_probabilities_and_score(clip, features):
    head = _head(clip)
    assert head.n_heads == 7 and len(head.mmci) == 3 and len(head.linear.fc) == 4
    out = head(features, _text(), allow_untrained=True, return_heads=True)
    assert out.anomaly_map.shape == (2, 64, 64)
    assert out.head_probs is not None and out.head_probs.shape == (7, 2, 64, 64)
    for t in (out.image_score, out.cls_prob, out.map_max, out.cls_similarity):
        assert t.shape == (2,)
    for t in (out.anomaly_map, out.head_probs, out.cls_prob):
        assert torch.all((t >= 0) & (t <= 1))
    torch.testing.assert_close(out.map_max, out.anomaly_map.flatten(1).amax(1))
    # official score: (adapted-CLS . abnormal text / sqrt(2) + map max) / 2
    cls = F.normalize(head.adapter(features.surgery[-1][:, 0]), dim=-1)
    sim = cls @ _text() / 2**0.5  # (B, 2)
    torch.testing.assert_close(out.cls_similarity, sim[:, 1])
    torch.testing.assert_close(out.cls_prob, (sim / 0.07).softmax(-1)[:, 1])
    torch.testing.assert_close(out.image_score, (sim[:, 1] + out.map_max) / 2)
    prob_head = _head(clip, score_term="probability")
    alt = prob_head(features, _text(), allow_untrained=True)
    torch.testing.assert_close(alt.image_score, (alt.cls_prob + alt.map_max) / 2)
    torch.testing.assert_close(alt.anomaly_map, out.anomaly_map)


@torch.no_grad()
def test_forward_matches_official_formulas(clip, images, features):
    """Maps written the official way: both channels upsampled, softmax, blur per head, mean."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    visual = clip.model.visual
    head = _head(clip)
    text = _text()
    out = head(features, text, allow_untrained=True)
    taps = _official_taps(visual, images.clone(), stage_len=1)
    text_features = text.T.unsqueeze(0)  # (1, 2, E)
    text_features = text_features / text_features.norm()  # the pair normalised as one tensor
    tokens = [fc(t[:, 1:]) for fc, t in zip(head.linear.fc, taps[::2], strict=True)]
    for m, t in zip(head.mmci, taps[1::2], strict=True):
        x = t[:, 1:].reshape(2, 8, 8, -1).permute(0, 3, 1, 2)  # (B, W, 8, 8)
        tokens.append(sum(c(x) for c in m.branches).permute(0, 2, 3, 1).reshape(2, 64, -1))
    maps = []
    for tok in tokens:
        tok = tok / tok.norm(dim=-1, keepdim=True)
        amap = 100.0 * tok @ text_features.transpose(-2, -1)  # (B, P, 2)
        amap = F.interpolate(amap.permute(0, 2, 1).view(2, 2, 8, 8), size=64, mode="bilinear", align_corners=True)
        amap = amap.softmax(dim=1)
        maps.append(tvf.gaussian_blur((amap[:, 1] - amap[:, 0] + 1) / 2, [3, 3], [4.0, 4.0]))
    want = torch.stack(maps).mean(0)
    torch.testing.assert_close(out.anomaly_map, want, atol=1e-5, rtol=1e-4)
    image_features = head.adapter(visual.ln_post(taps[-1]) @ visual.proj)[:, 0]
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_probs = image_features.unsqueeze(1) @ text_features.permute(0, 2, 1)  # (B, 1, 2)
    want_score = (text_probs[:, 0, 1] + want.flatten(1).amax(1)) / 2
    torch.testing.assert_close(out.image_score, want_score, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_per_image_text_in_one_batch(clip, images, features):
    head = _head(clip)
    texts = _text(7, batch=2)
    batched = head(features, texts, allow_untrained=True)
    enc = StagedDualPathViT(clip.model.visual)
    for i in range(2):
        single = head(enc(images[i : i + 1]), texts[i], allow_untrained=True)
        torch.testing.assert_close(batched.anomaly_map[i], single.anomaly_map[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched.image_score[i], single.image_score[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_untrained_guard(clip, features):
    head = _head(clip)
    assert not head.is_trained
    with pytest.raises(UntrainedFiLoError, match="allow_untrained"):
        head(features, _text())
    head.mark_trained()
    assert head.is_trained
    head(features, _text())


@torch.no_grad()
def test_state_dict_round_trip(clip, features):
    head = _head(clip)
    text = _text()
    want = head(features, text, allow_untrained=True)

    untrained = head.state_dict()
    assert "trained" in untrained and not bool(untrained["trained"])
    copy = FiLoHead.from_state_dict(untrained, 64, 64, 64)
    assert not copy.is_trained  # random weights round-trip as untrained

    head.mark_trained()
    loaded = FiLoHead.from_state_dict(head.state_dict(), 64, 64, 64)
    assert loaded.is_trained
    got = loaded(features, text)
    torch.testing.assert_close(got.anomaly_map, want.anomaly_map)
    torch.testing.assert_close(got.image_score, want.image_score)

    no_flag = {k: v for k, v in head.state_dict().items() if k != "trained"}
    fresh = FiLoHead(64, 64, 64)
    fresh.load_state_dict(no_flag)  # trained weights from elsewhere: marked trained
    assert fresh.is_trained
    partial = FiLoHead(64, 64, 64)
    partial.load_state_dict({k: v for k, v in no_flag.items() if k.startswith("linear.")}, strict=False)
    assert not partial.is_trained  # MMCI and adapter still random
    with pytest.raises(RuntimeError):
        FiLoHead(64, 64, 64).load_state_dict({k: v for k, v in no_flag.items() if k.startswith("linear.")})


def test_official_checkpoint_keys_convert():
    head = FiLoHead(64, 64, 64)
    names = {0: "fc_11", 1: "fc_33", 2: "fc_55", 3: "fc_77", 4: "fc_15", 5: "fc_51"}
    official: dict[str, torch.Tensor] = {"normal_prompt_learner.ctx": torch.zeros(12, 64)}
    for key, value in head.state_dict().items():
        parts = key.split(".")
        if parts[0] == "mmci":
            official[f"decoder_cov.{names[int(parts[3])]}.{parts[1]}.{parts[4]}"] = value + 1
        elif parts[0] == "linear":
            official[f"decoder_linear.fc.{parts[2]}.{parts[3]}"] = value + 1
    official["adapter.fc.0.weight"] = head.adapter.down.weight + 1
    official["adapter.fc.2.weight"] = head.adapter.up.weight + 1
    converted = convert_official_state_dict(official)
    assert set(converted) == set(head.state_dict()) - {"trained"}
    loaded = FiLoHead.from_state_dict(official, 64, 64, 64)
    assert loaded.is_trained
    for key, value in head.state_dict().items():
        if key != "trained":
            torch.testing.assert_close(loaded.state_dict()[key], value + 1)
    # (1, 5) is the official fc_15 branch, (5, 1) fc_51
    assert loaded.mmci[0].branches[4].weight.shape[-2:] == (1, 5)


def test_positions_agree_with_hqloc():
    hqloc = pytest.importorskip("workers.models.hqloc")
    assert hqloc.POSITIONS == POSITIONS
