"""The SDP benchmark still runs end to end on the tiny config (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_sdp_tiny_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--arch", "inspect-tiny", "--iters", "1", "--warmup", "0", "--no-winclip", "--json"]
    cmd = [sys.executable, "-m", "bench.bench_sdp", *args, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["sdp"]["results"]
    for name in ("bare", "sdp", "sdp_encoder"):
        assert results[name]["images_per_s"] > 0
    assert report["ratios"]["sdp_over_bare"] > 0
    assert report["winclip"] == {"skipped": "--no-winclip"}
    assert "SDP/bare time ratio" in proc.stdout
