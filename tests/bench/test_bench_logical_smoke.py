"""The logical-stage benchmark runs end to end on the tiny config (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("bare", "sdp", "logical", "shared", "separate", "logical_head")


@pytest.mark.slow
def test_bench_logical_tiny_smoke(tmp_path: Path) -> None:
    out = tmp_path / "logical.json"
    args = ["--arch", "inspect-tiny", "--iters", "1", "--warmup", "0", "--shots", "1,4", "--json", str(out)]
    cmd = [sys.executable, "-m", "bench.bench_logical", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["arch"] == "inspect-tiny" and report["shots"] == [1, 4]

    frame = report["frame"]
    assert set(frame["results"]) == set(VARIANTS)
    for name in VARIANTS:
        assert frame["results"][name]["median_ms"] > 0
        assert frame["ratios"][f"{name}_over_bare"] > 0
    assert set(frame["saving"]) >= {"shared_vs_separate_ms", "fraction_of_separate", "bare_forwards"}
    assert frame["memory_shapes_match_formula"] is True

    assert [t["backbone"] for t in report["banks"]] == ["ViT-L-14@448", "ViT-B-16-plus-240@240"]
    for tab, patches, width in zip(report["banks"], (1024, 225), (1024, 896), strict=True):
        assert tab["patches"] == patches and tab["width"] == width and tab["levels"] == 2
        assert [r["shots"] for r in tab["rows"]] == [1, 4]
        for r in tab["rows"]:
            bank = 2 * r["shots"] * patches * width * 4  # two fp32 levels
            assert r["bytes"]["patch_bank"] == bank
            assert r["total_bytes"] == sum(r["bytes"].values())
            assert r["fp16_total_bytes"] == (r["total_bytes"] - 8) // 2 + 8
            assert r["search_block_bytes"] == patches * min(4096, r["shots"] * patches) * 4
            assert r["search_peak_blocks"] == (2 if r["shots"] * patches <= 4096 else 3)
            assert r["search_ms"] > 0 and r["fp16_upcast_ms"] > 0
    assert "sharing saves" in proc.stdout
