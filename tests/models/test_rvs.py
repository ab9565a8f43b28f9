"""Representative vector selection on synthetic embeddings with known structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prompts import load_prompt_file
from workers.models.prompt_ensemble import build_sentences, encode_text_features
from workers.models.rvs import METHODS, representative_vector
from workers.weights import load_clip


def _cluster_with_outliers(n_main=40, n_out=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centre = F.normalize(torch.randn(dim, generator=g), dim=0)
    main = F.normalize(centre + 0.05 * torch.randn(n_main, dim, generator=g), dim=-1)
    outliers = F.normalize(torch.randn(n_out, dim, generator=g), dim=-1)
    return torch.cat([main, outliers]), centre, main


def test_mean_is_plain_mean():
    emb, _, _ = _cluster_with_outliers()
    torch.testing.assert_close(representative_vector(emb, "mean").vector, emb.mean(0))


def test_pca_sign_follows_the_mean():
    emb, centre, _ = _cluster_with_outliers()
    for sign in (1.0, -1.0):
        vec = representative_vector(sign * emb, "pca").vector
        assert torch.dot(vec, (sign * emb).mean(0)) >= 0
        assert abs(vec.norm().item() - 1.0) < 1e-5


def test_dbscan_takes_the_largest_cluster_and_drops_outliers():
    emb, _, main = _cluster_with_outliers()
    res = representative_vector(emb, "dbscan", {"eps": 0.5, "min_samples": 15})
    torch.testing.assert_close(res.vector, main.mean(0), atol=1e-6, rtol=1e-5)
    assert res.notes == []


def test_dbscan_all_noise_falls_back_to_mean_and_says_so():
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(10, 64, generator=g), dim=-1)  # far apart, fewer than min_samples
    res = representative_vector(emb, "dbscan", {"eps": 0.1, "min_samples": 15})
    torch.testing.assert_close(res.vector, emb.mean(0))
    assert res.notes and "noise" in res.notes[0]


def test_kde_weights_dense_points_more_than_outliers():
    emb, centre, main = _cluster_with_outliers()
    kde = representative_vector(emb, "kde", {"bandwidth": 0.3}).vector
    mean = emb.mean(0)
    # the KDE vector sits closer to the dense cluster's mean than the plain mean does
    assert (kde - main.mean(0)).norm() < (mean - main.mean(0)).norm()


def test_mean_shift_and_unknown_method():
    emb, _, _ = _cluster_with_outliers()
    vec = representative_vector(emb, "mean_shift", {"bandwidth": 2.0}).vector
    assert vec.shape == (16,)
    with pytest.raises(ValueError, match="unknown RVS method"):
        representative_vector(emb, "median")


def test_sentences_are_states_times_templates_with_class_verbatim():
    content = load_prompt_file()["content"]
    normal, abnormal = build_sentences(content, "metal_nut")
    assert len(normal) == 9 * 22 and len(abnormal) == 10 * 22
    assert "a cropped photo of the flawless metal_nut." in normal
    assert "a photo of a metal_nut with crack for anomaly detection." in abnormal


@pytest.mark.parametrize("method", METHODS)
def test_text_features_are_unit_columns(method):
    clip = load_clip("inspect-tiny", "random")
    content = load_prompt_file()["content"]
    tf = encode_text_features(clip.model.encode_text, clip.tokenizer, content, "pcb1", method)
    assert tf.features.shape == (64, 2)
    torch.testing.assert_close(tf.features.norm(dim=0), torch.ones(2), atol=1e-3, rtol=0)
    assert tf.n_sentences == (198, 220)
