"""The FiLo benchmark runs end to end on the tiny config (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("bare", "sdp", "filo", "filo_head", "filo_head_unfused", "sdp_plus_filo")


@pytest.mark.slow
def test_bench_filo_tiny_smoke(tmp_path: Path) -> None:
    out = tmp_path / "filo.json"
    args = ["--arch", "inspect-tiny", "--iters", "1", "--warmup", "0", "--no-swin-t", "--json", str(out)]
    cmd = [sys.executable, "-m", "bench.bench_filo", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["arch"] == "inspect-tiny" and report["batch"] == 1 and report["weights"] == "random"
    filo = report["filo"]
    assert filo["n_heads"] == 7 and filo["image_size"] == [64, 64]
    for name in VARIANTS:
        assert filo["results"][name]["images_per_s"] > 0
    for name in ("filo_over_sdp", "filo_head_over_sdp", "sdp_plus_filo_over_sdp", "filo_head_unfused_over_fused"):
        assert report["ratios"][name] > 0
        assert filo["ratios_min"][name] > 0
    localize = filo["localize"]
    if importlib.util.find_spec("workers.grounding") is None:
        assert "skipped" in localize and "localize_tiny" not in filo["results"]
    else:
        assert filo["results"]["localize_tiny"]["images_per_s"] > 0
        assert localize["swin_t_skipped"] == "--no-swin-t" and "localize_swin_t" not in filo["results"]
        assert report["ratios"]["filo_with_localize_tiny_over_sdp"] > 0
    assert "FiLo scoring" in proc.stdout
