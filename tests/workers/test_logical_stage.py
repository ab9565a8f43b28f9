"""The logical stage (CLIP-LAD) in the embedded default: bank build, activation, scoring, verdicts."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.synth import generate

ROOT = Path(__file__).resolve().parents[2]


def _run(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECT_")}
    env.update(INSPECT_DATA_DIR=str(home), INSPECT_CLIP_MODEL="inspect-tiny", INSPECT_WEIGHTS="random")
    return subprocess.run([str(Path(sys.executable).parent / "inspect"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def logical_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("loco"), "logical", n=2, seed=0, size=64, n_train=6)


def test_bank_build_activate_and_logical_verdicts(tmp_path, logical_root):
    home = tmp_path / "home"
    built = _run(home, "bank", "build", "--category", "synth_logical", "--images",
                 str(logical_root / "train" / "good"), "--validation", str(logical_root / "validation" / "good"))
    assert built.returncode == 0, built.stderr
    assert "ready" in built.stdout
    listed = _run(home, "bank", "list").stdout
    assert "synth_logical" in listed and "ACTIVE" in listed and "[random weights]" in listed
    shown = json.loads(_run(home, "bank", "show", "1").stdout)
    assert shown["status"] == "ready" and shown["stats"]["shots"] == 6 and shown["prompt_set_version"] == 2
    assert shown["stats"]["validation_source"] == "validation"

    frames = [str(p) for p in sorted((logical_root / "test" / "good").glob("*.png"))[:1]]
    frames += [str(p) for p in sorted((logical_root / "test" / "logical_anomalies").glob("*.png"))[:2]]
    res = _run(home, "submit", "--line", "3", "--category", "synth_logical", "--wait", *frames)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 3

    db = sqlite3.connect(home / "inspect.db")
    rows = db.execute("select r.bank_id, r.bank_version, r.scores from results r").fetchall()
    assert len(rows) == 3 and all(r[0] == 1 and r[1] == 1 for r in rows)
    scores = [json.loads(r[2]) for r in rows]
    assert all({"logical", "structural", "fused", "decisions"} <= set(s) for s in scores)
    assert all(set(s["decisions"]) == {"segment", "logical"} for s in scores)
    stages = db.execute("select stage, output from stage_runs where stage='logical'").fetchall()
    assert len(stages) == 3 and all(json.loads(o)["shared_backbone"] for _, o in stages)


def test_activation_rules_and_missing_bank(tmp_path, logical_root):
    home = tmp_path / "home"
    assert _run(home, "bank", "activate", "7").returncode != 0
    res = _run(home, "category", "add", "trays")
    assert res.returncode == 0
    db_path = home / "inspect.db"
    with sqlite3.connect(db_path) as db:  # a pipeline that insists on the logical stage
        db.execute("""update categories set pipeline='{"stages": ["segment", "logical"]}' where name='trays'""")
    frame = str(sorted((logical_root / "test" / "good").glob("*.png"))[0])
    res = _run(home, "submit", "--line", "1", "--category", "trays", "--wait", frame)
    assert "FAILED" in res.stdout and "no active memory bank" in res.stdout
