"""Few-shot patch memory: chunked nearest-neighbour search and bank construction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.models.patch_memory import PatchMemory, nearest_distance
from workers.weights import load_clip


def test_chunked_nearest_distance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(50, 16, generator=g), dim=-1)
    bank = F.normalize(torch.randn(333, 16, generator=g), dim=-1)
    want = torch.cdist(q, bank).min(dim=1).values
    for chunk in (1, 7, 100, 4096):
        torch.testing.assert_close(nearest_distance(q, bank, chunk), want, atol=1e-5, rtol=1e-5)


def test_bank_patches_score_zero_and_shapes():
    clip = load_clip("inspect-tiny", "random")
    pm = PatchMemory(clip.model.visual, levels=(0, 1)).eval()
    imgs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    bank = pm.build_bank(imgs, batch_size=2)
    assert bank.n_patches == 3 * 64 and len(bank.features) == 2
    assert bank.nbytes() == 2 * 3 * 64 * 64 * 4
    out = pm.score(imgs, bank)
    assert out.anomaly_map.shape == (3, 64, 64) and out.patch_dist.shape == (3, 8, 8)
    assert float(out.image_score.max()) < 1e-2  # every query patch is in the memory
    other = pm.score(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)), bank)
    assert bool((other.image_score > 0.05).all())
