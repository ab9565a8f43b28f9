"""CLIP-LAD's evaluation protocol on generated LOCO-layout data (tiny random model)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner

from common.settings import reset_settings
from evaluation.datasets import open_dataset
from evaluation.lad_eval import groups, split_aurocs
from evaluation.synth import generate
from orchestrator.cli import cli
from workers import runtime


@pytest.fixture(scope="module")
def loco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loco")
    generate(root, "logical", n=2, seed=0, size=64, n_train=4)
    return root


def test_eval_clip_lad_shots_and_seeds(loco_root, tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECT_CLIP_MODEL", "inspect-tiny")
    monkeypatch.setenv("INSPECT_WEIGHTS", "random")
    reset_settings()
    runtime.reset_engine()
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["eval", "--method", "clip-lad", "--root", str(loco_root), "--shots", "1,2",
                                   "--seeds", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    with (out / "table.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["category"], r["shots"]) for r in rows] == [
        ("synth_logical", "1-shot"), ("synth_logical", "2-shot"), ("mean", "1-shot"), ("mean", "2-shot")]
    for r in rows:
        for split in ("all", "logical", "structural"):
            assert 0.0 <= float(r[f"{split}_mean"]) <= 1.0
    assert "± " in (out / "table.md").read_text()
    runtime.reset_engine()


def test_subtypes_split_a_category(loco_root):
    ds = open_dataset(loco_root)
    cat = ds.categories()[0]
    every = [s for split in ("train", "validation", "test") for s in ds.samples(cat, split)]
    mapping = {str(s.image_path.relative_to(ds.root)): ("a" if i % 2 else "b") for i, s in enumerate(every)}
    gs = groups(ds, cat, mapping)
    assert [g.name for g in gs] == [f"{cat}(a)", f"{cat}(b)"]
    assert sum(len(g.train) + len(g.validation) + len(g.test) for g in gs) == len(every)
    del mapping[next(iter(mapping))]
    with pytest.raises(ValueError, match="no sub-type"):
        groups(ds, cat, mapping)


def test_split_aurocs_separate_logical_and_structural(loco_root):
    ds = open_dataset(loco_root)
    test = ds.samples(ds.categories()[0], "test")
    perfect = np.array([float(s.label) for s in test])
    assert split_aurocs(test, perfect) == {"all": 1.0, "logical": 1.0, "structural": 1.0}
    logical_only = np.array([1.0 if s.defect_type == "logical_anomalies" else 0.0 for s in test])
    res = split_aurocs(test, logical_only)
    assert res["logical"] == 1.0 and res["structural"] == 0.5
