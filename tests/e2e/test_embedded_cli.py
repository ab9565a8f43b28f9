"""The embedded default end to end: no broker, no PostgreSQL, no S3 (the README's first command)."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "pcb1"


def _run(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECT_")}
    env["INSPECT_DATA_DIR"] = str(tmp_path / "data")
    env.update(env_extra or {})
    inspect = str(Path(sys.executable).parent / "inspect")
    return subprocess.run([inspect, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_submit_wait_status_results_embedded(tmp_path):
    res = _run(tmp_path, "--weights", "random", "--model", "inspect-tiny", "submit", "--line", "3",
               "--category", "pcb1", "--serial", "SN-1", "--wait", str(EXAMPLES))
    assert res.returncode == 0, res.stderr
    assert "category 'pcb1' was new" in res.stderr
    rows = [r.split("\t") for r in res.stdout.strip().splitlines()]
    assert len(rows) == 3
    for _job, verdict, score, _path, heatmap, tag in rows:
        assert verdict in ("OK", "NG") and score.startswith("score=") and tag == "[random weights]"
        overlay = Path(heatmap.removeprefix("heatmap=file://"))
        assert overlay.is_file() and Image.open(overlay).size == (256, 256)

    db = sqlite3.connect(tmp_path / "data" / "inspect.db")
    n_done = db.execute("select count(*) from inspections where status='done'").fetchone()[0]
    n_res = db.execute("select count(*) from results where random_weights").fetchone()[0]
    assert (n_done, n_res) == (3, 3)
    key = db.execute("select anomaly_map_key from results limit 1").fetchone()[0]
    amap = np.load(io.BytesIO((tmp_path / "data" / "objects" / key).read_bytes()), allow_pickle=False)
    assert amap.dtype == np.float16

    job = rows[0][0]
    st = _run(tmp_path, "status", job, "--json")
    doc = json.loads(st.stdout)
    assert doc["status"] == "done" and doc["serial"] == "SN-1" and doc["random_weights"] is True
    assert [s["stage"] for s in doc["stages"]] == ["segment", "finalize"]

    listed = _run(tmp_path, "results", "--line", "3", "--since", "1h", "--json")
    assert len(json.loads(listed.stdout)) == 3
    assert json.loads(_run(tmp_path, "results", "--line", "4", "--json").stdout) == []


def test_bad_inputs_are_reported_and_good_frames_still_run(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    res = _run(tmp_path, "--weights", "random", "--model", "inspect-tiny", "submit", "--line", "3",
               "--category", "pcb1", "--wait", str(tmp_path / "empty.png"), str(tmp_path / "notes.png"),
               str(tmp_path / "missing.png"), str(EXAMPLES / "good_000.png"))
    assert res.returncode == 2
    assert "empty.png: empty file" in res.stderr
    assert "notes.png: not a recognised image file" in res.stderr
    assert "missing.png: no such file or folder" in res.stderr
    assert len(res.stdout.strip().splitlines()) == 1


def test_strict_mode_refuses_unknown_categories_and_category_admin(tmp_path):
    res = _run(tmp_path, "--weights", "random", "--model", "inspect-tiny", "submit", "--strict",
               "--line", "3", "--category", "widget", str(EXAMPLES / "good_000.png"))
    assert res.returncode == 2 and "not registered (strict mode)" in res.stderr
    assert _run(tmp_path, "category", "add", "widget", "--threshold", "0.7").returncode == 0
    out = _run(tmp_path, "category", "set", "widget", "--threshold", "0.9", "--rvs", "mean")
    assert out.returncode == 0 and "prompt set v2" in out.stdout
    doc = json.loads(_run(tmp_path, "category", "show", "widget").stdout)
    assert doc["threshold"] == 0.9 and doc["active_prompt_set"] == 2
    assert [p["rvs_method"] for p in doc["prompt_sets"]] == ["dbscan", "mean"]


def test_missing_weights_fail_clearly_without_random_fallback(tmp_path):
    res = _run(tmp_path, "submit", "--line", "3", "--category", "pcb1", "--wait",
               str(EXAMPLES / "good_000.png"),
               env_extra={"INSPECT_CLIP_MODEL": "inspect-tiny", "INSPECT_WEIGHTS": str(tmp_path / "nope.pt")})
    assert "FAILED" in res.stdout and "WeightsNotFound" in res.stdout
    assert "random" not in res.stdout.split("FAILED")[1].split("WeightsNotFound")[0]
