"""Synthetic defect data: layouts, readability, mask/pixel agreement, determinism, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from evaluation import synth
from evaluation.datasets import load_mask, open_dataset
from orchestrator.cli import cli

N = 5  # one logical anomaly of each of the five subtypes
READER_KIND = {"texture": "mvtec", "object": "mvtec", "logical": "loco"}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=synth.KINDS)
def generated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param)
    synth.generate(out, request.param, N, seed=0, size=96)
    return request.param, out


def test_layout_meta_and_reader(generated: tuple[str, Path]) -> None:
    kind, out = generated
    ds = open_dataset(out)  # auto-detected
    assert ds.kind == READER_KIND[kind]
    assert ds.categories() == [f"synth_{kind}"]
    cat = ds.categories()[0]
    meta = json.loads((out / cat / "meta.json").read_text())
    assert meta["generator"] == "evaluation.synth" and meta["seed"] == 0 and meta["kind"] == kind
    assert meta["counts"] == synth.planned_counts(kind, N)
    assert len(ds.samples(cat, "train")) == max(N, 8)
    test = ds.samples(cat)
    assert sorted({s.defect_type for s in test}) == sorted(synth.defect_types(kind))
    assert len(test) == N * len(synth.defect_types(kind))
    if kind == "logical":
        assert len(ds.samples(cat, "validation")) == meta["counts"]["validation/good"]
        logical = [v for k, v in meta["subtypes"].items() if "logical_anomalies" in k]
        assert sorted(logical) == sorted(synth.LOGICAL_SUBTYPES)
    else:
        assert sorted((out / cat / "ground_truth").iterdir()) == sorted(
            out / cat / "ground_truth" / d for d in synth.STRUCTURAL)
    for s in test:
        with Image.open(s.image_path) as im:
            assert im.mode == "RGB" and im.size == (96, 96)
        for m in s.mask_paths:
            values = set(np.unique(np.asarray(Image.open(m))).tolist())
            assert values <= {0, 255}


def test_masks_match_the_painted_pixels(generated: tuple[str, Path]) -> None:
    """Masks are non-empty exactly for anomalies, and the defect changed pixels only inside them."""
    kind, out = generated
    ds = open_dataset(out)
    for s in ds.samples(ds.categories()[0]):
        mask = load_mask(s)
        assert mask.any() == bool(s.label), s.image_path
        r = synth.render_sample(kind, s.defect_type, int(s.image_path.stem), seed=0, size=96)
        assert np.array_equal(np.asarray(Image.open(s.image_path)), r.image), "render_sample != written file"
        if not s.label:
            assert np.array_equal(r.image, r.clean)
            continue
        assert np.array_equal(mask, np.logical_or.reduce(r.masks))
        changed = np.abs(r.image.astype(int) - r.clean.astype(int)).max(axis=2) > 32
        inside = (changed & mask).sum()
        assert inside >= 0.98 * changed.sum(), f"{s.image_path}: defect pixels outside the mask"
        assert inside >= 0.5 * mask.sum(), f"{s.image_path}: mask much larger than the visible defect"


def test_logical_mask_files_per_region(tmp_path: Path) -> None:
    out = tmp_path
    synth.generate(out, "logical", N, seed=1, size=64, n_train=2)
    meta = json.loads((out / "synth_logical" / "meta.json").read_text())
    ds = open_dataset(out)
    by_name = {f"test/{s.defect_type}/{s.image_path.name}": s for s in ds.samples("synth_logical")}
    for name, subtype in meta["subtypes"].items():
        expected = 2 if subtype in ("swapped", "misplaced") else 1
        assert len(by_name[name].mask_paths) == expected, (name, subtype)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for kind in synth.KINDS:
        a = synth.generate(tmp_path / "a", kind, 2, seed=7, size=64, n_train=2)
        b = synth.generate(tmp_path / "b", kind, 2, seed=7, size=64, n_train=2)
        c = synth.generate(tmp_path / "c", kind, 2, seed=8, size=64, n_train=2)
        fa, fb, fc = _files(a), _files(b), _files(c)
        assert fa == fb
        assert fa.keys() == fc.keys()
        pngs = [k for k in fa if k.startswith(("train/", "test/"))]
        assert all(fa[k] != fc[k] for k in pngs), "another seed must give other images"
        again = synth.generate(tmp_path / "a", kind, 2, seed=7, size=64, n_train=2)  # replaces its own output
        assert _files(again) == fa


def test_refuses_foreign_folder_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "synth_texture").mkdir()
    (tmp_path / "synth_texture" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by evaluation.synth"):
        synth.generate(tmp_path, "texture", 1)
    assert (tmp_path / "synth_texture" / "notes.txt").read_text() == "mine"
    for kwargs, message in (
        ({"kind": "fabric"}, "unknown synthetic kind"),
        ({"n": 0}, "at least 1"),
        ({"size": 32}, "between 64 and 4096"),
        ({"category": "../x"}, "plain folder name"),
        ({"seed": -1}, "seed"),
    ):
        args = {"kind": "object", "n": 1, **kwargs}
        with pytest.raises(ValueError, match=message):
            synth.generate(tmp_path / "o", args.pop("kind"), args.pop("n"), **args)


def test_cli_data_synth(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["data", "synth", "--out", str(tmp_path), "--kind", "object", "--n", "2",
                              "--seed", "3", "--size", "64", "--category", "washer"])
    assert res.exit_code == 0, res.output
    root = tmp_path / "washer"
    assert f"wrote {root}" in res.stdout
    assert "test/scratch: 2" in res.stdout and "train/good: 8" in res.stdout
    ds = open_dataset(tmp_path)
    assert ds.kind == "mvtec" and ds.categories() == ["washer"]
    assert json.loads((root / "meta.json").read_text())["seed"] == 3
    bad = runner.invoke(cli, ["data", "synth", "--out", str(tmp_path), "--kind", "cloth", "--n", "2"])
    assert bad.exit_code == 2 and "cloth" in bad.output
    (tmp_path / "synth_logical").mkdir()
    (tmp_path / "synth_logical" / "x").write_text("x")
    taken = runner.invoke(cli, ["data", "synth", "--out", str(tmp_path), "--kind", "logical", "--n", "1"])
    assert taken.exit_code == 1 and "not overwriting" in taken.output
