"""`inspect eval` end to end on generated data with the tiny random model."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner

from common.settings import reset_settings
from evaluation.report import compare_lines, published
from evaluation.runner import EvalConfig, run_eval
from evaluation.synth import generate
from orchestrator.cli import cli
from workers import runtime


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setenv("INSPECT_CLIP_MODEL", "inspect-tiny")
    monkeypatch.setenv("INSPECT_WEIGHTS", "random")
    reset_settings()
    runtime.reset_engine()
    yield
    runtime.reset_engine()


@pytest.fixture(scope="module")
def texture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, "texture", n=5, seed=0, size=128, n_train=8)
    return root


def _table(out):
    with (out / "table.csv").open() as fh:
        return {r["category"]: r for r in csv.DictReader(fh)}


def test_patch_memory_detects_synthetic_defects_with_random_weights(tiny, texture_root, tmp_path):
    out = tmp_path / "pm"
    res = CliRunner().invoke(cli, ["eval", "--method", "patch-memory", "--root", str(texture_root),
                                   "--shots", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = _table(out)
    cat = next(k for k in rows if k != "mean")
    assert float(rows[cat]["image_auroc"]) >= 0.9
    assert float(rows[cat]["pixel_auroc"]) >= 0.8
    for name in ("table.md", "table.csv", f"curves_{cat}.png", f"grid_{cat}.png", "run.json"):
        assert (out / name).is_file()
    assert "px AUROC" in (out / "table.md").read_text()


def test_sdp_eval_and_queue_path_agree(tiny, texture_root, tmp_path):
    direct = run_eval(EvalConfig(method="sdp", root=texture_root, out=tmp_path / "a", limit=6))
    queued = run_eval(EvalConfig(method="sdp", root=texture_root, out=tmp_path / "b", limit=6,
                                 via_queue=True))
    (cat,) = [k for k in direct.rows if k != "mean"]
    for key, value in direct.rows[cat].items():
        assert 0.0 <= value <= 1.0 or np.isnan(value)
        # the deployed path stores float16 maps: metrics agree to rounding
        assert value == pytest.approx(queued.rows[cat][key], abs=0.02), key


def test_compare_prints_published_numbers():
    theirs = published("sdp", "mvtec")
    assert theirs["mean"]["pixel_auroc"] == pytest.approx(0.875)
    assert theirs["bottle"]["image_auroc"] == pytest.approx(0.968)
    lines = compare_lines({"bottle": {"pixel_auroc": 0.9}}, theirs)
    assert lines[1].startswith("bottle | 90.0/92.3")
    assert published("sdp", "nonexistent") == {}


def test_unknown_root_layout_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(cli, ["eval", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "Error" in res.output
