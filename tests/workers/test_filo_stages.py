"""localize (Grounding DINO, tiny random config) -> segment (SDP or FiLo) in the embedded default."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "pcb1"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    from workers.grounding import tiny_random_grounding
    from workers.models.filo import FiLoHead
    from workers.weights import load_clip

    base = tmp_path_factory.mktemp("assets")
    gdino = tiny_random_grounding(base / "gdino")
    clip = load_clip("inspect-tiny", "random")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = FiLoHead.for_visual(clip.model.visual)
    head.mark_trained()  # stands in for trained weights: this test exercises the code path
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(base / "filo.safetensors"))
    return {"grounding": str(gdino), "filo": str(base / "filo.safetensors")}


def _run(home: Path, assets: dict[str, str], *args: str, filo: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECT_")}
    env.update(INSPECT_DATA_DIR=str(home), INSPECT_CLIP_MODEL="inspect-tiny", INSPECT_WEIGHTS="random",
               INSPECT_GROUNDING=assets["grounding"])
    if filo:
        env["INSPECT_FILO_WEIGHTS"] = assets["filo"]
    return subprocess.run([str(Path(sys.executable).parent / "inspect"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_localize_then_filo_segment(tmp_path, assets):
    home = tmp_path / "home"
    assert _run(home, assets, "category", "add", "pcb1").returncode == 0
    res = _run(home, assets, "category", "set", "pcb1", "--pipeline",
               '{"stages": ["localize", "segment"], "segment_method": "filo"}')
    assert res.returncode == 0, res.stderr
    res = _run(home, assets, "submit", "--line", "2", "--category", "pcb1", "--wait", str(EXAMPLES))
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 3 and "FAILED" not in res.stdout
    db = sqlite3.connect(home / "inspect.db")
    runs = db.execute("select stage, output from stage_runs order by id").fetchall()
    assert [r[0] for r in runs[:3]] == ["localize", "segment", "finalize"]
    loc = json.loads(runs[0][1])
    assert loc["caption"].startswith("anomaly . damage . broken . defect . contamination . ")
    assert "missing component" in loc["caption"]  # pcb1's default library phrases
    assert loc["position"] in {"top left", "top", "top right", "left", "center", "right", "bottom left",
                               "bottom", "bottom right"}
    seg = json.loads(runs[1][1])
    assert seg["method"] == "filo" and 0.0 <= seg["map_max"] <= 1.0
    locs = [json.loads(o) for st, o in runs if st == "localize"]
    n_det = db.execute("select count(*) from detections").fetchone()[0]
    n_kept = db.execute("select count(*) from detections where kept").fetchone()[0]
    assert n_det == sum(min(x["n_boxes"], 50) for x in locs) and n_det > 0  # boxes persisted for SQL
    assert n_kept == sum(x["n_kept"] for x in locs)
    scores = [json.loads(r[0]) for r in db.execute("select scores from results")]
    assert all("phrases" in s and "position" in s for s in scores)


def test_filo_without_trained_weights_fails_clearly(tmp_path, assets):
    home = tmp_path / "home"
    _run(home, assets, "category", "add", "pcb1", filo=False)
    _run(home, assets, "category", "set", "pcb1", "--pipeline", '{"segment_method": "filo"}', filo=False)
    res = _run(home, assets, "submit", "--line", "2", "--category", "pcb1", "--wait", str(EXAMPLES / "good_000.png"),
               filo=False)
    assert "FAILED" in res.stdout and "needs trained FiLo head weights" in res.stdout


def test_localize_with_sdp_draws_boxes_and_bad_pipeline_is_refused(tmp_path, assets):
    home = tmp_path / "home"
    _run(home, assets, "category", "add", "pcb1")
    bad = _run(home, assets, "category", "set", "pcb1", "--pipeline", '{"stages": ["telepathy"]}')
    assert bad.returncode != 0 and "unknown stages" in bad.stderr
    _run(home, assets, "category", "set", "pcb1", "--pipeline", '{"stages": ["segment", "localize"]}')
    res = _run(home, assets, "submit", "--line", "2", "--category", "pcb1", "--wait", str(EXAMPLES / "good_000.png"))
    assert res.returncode == 0, res.stderr
    db = sqlite3.connect(home / "inspect.db")
    stages = [r[0] for r in db.execute("select stage from stage_runs order by id")]
    assert stages == ["localize", "segment", "finalize"]  # localize always runs first
