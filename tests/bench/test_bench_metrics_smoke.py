"""The metrics benchmark runs end to end on a tiny input and reports agreement (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from evaluation.metrics import METRIC_ORDER

REPO = Path(__file__).resolve().parents[2]


def test_bench_metrics_tiny_smoke(tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    cmd = [sys.executable, "-m", "bench.bench_metrics", "--n", "6", "--size", "32", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report) >= {"config", "seconds", "speedup", "values", "abs_diff", "max_abs_diff", "versions"}
    assert report["config"]["n"] == 6 and report["config"]["size"] == 32
    keys = {*METRIC_ORDER, "all_seven"}
    for side in ("ours", "baseline"):
        assert set(report["seconds"][side]) == keys
        assert set(report["values"][side]) == set(METRIC_ORDER)
    assert set(report["speedup"]) == keys
    assert report["max_abs_diff"] <= 1e-9
    assert "max abs difference" in proc.stdout
