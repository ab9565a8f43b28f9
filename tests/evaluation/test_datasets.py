"""Dataset readers on tiny fake MVTec AD / VisA / MVTec LOCO AD trees built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.datasets import DatasetError, Sample, detect_kind, load_mask, open_dataset


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _img(path: Path, h: int = 16, w: int = 16) -> Path:
    return _png(path, np.full((h, w, 3), 128, np.uint8))


def _mask(path: Path, box: tuple[int, int, int, int], value: int = 255, h: int = 16, w: int = 16) -> Path:
    m = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = value
    return _png(path, m)


def _mvtec(root: Path, cats: tuple[str, ...] = ("bottle", "zipper")) -> Path:
    for cat in cats:
        for i in range(2):
            _img(root / cat / "train" / "good" / f"{i:03d}.png")
        _img(root / cat / "test" / "good" / "000.png")
        for i in range(2):
            _img(root / cat / "test" / "broken" / f"{i:03d}.png")
            _mask(root / cat / "ground_truth" / "broken" / f"{i:03d}_mask.png", (0, 8, 0, 8))
    (root / "license.txt").write_text("x")
    (root / ".cache").mkdir()
    return root


def _loco(root: Path, cat: str = "juice_bottle") -> Path:
    c = root / cat
    for split in ("train", "validation"):
        _img(c / split / "good" / "000.png")
    _img(c / "test" / "good" / "000.png")
    _img(c / "test" / "logical_anomalies" / "000.png")
    _img(c / "test" / "structural_anomalies" / "000.png")
    # LOCO stores several masks per image, each with its own grey value.
    _mask(c / "ground_truth" / "logical_anomalies" / "000" / "000.png", (0, 4, 0, 4), value=255)
    _mask(c / "ground_truth" / "logical_anomalies" / "000" / "001.png", (12, 16, 12, 16), value=37)
    _mask(c / "ground_truth" / "structural_anomalies" / "000" / "000.png", (4, 8, 4, 8))
    return root


VISA_ROWS = [
    ("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
    ("candle", "train", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
    ("candle", "test", "normal", "candle/Data/Images/Normal/0002.JPG", ""),
    ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"),
    ("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""),
    ("pcb1", "test", "anomaly", "pcb1/Data/Images/Anomaly/000.JPG", "pcb1/Data/Masks/Anomaly/000.png"),
]


def _visa(root: Path, rows: list[tuple[str, ...]] = VISA_ROWS, header: str = "object,split,label,image,mask",
          write_files: bool = True) -> Path:
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    if write_files:
        for r in rows:
            _img(root / r[3])
            if r[4]:
                _mask(root / r[4], (2, 6, 2, 6), value=1)  # VisA-style masks may use small values
    return root


# --- MVTec AD ---------------------------------------------------------------------------------

def test_mvtec_samples_labels_and_masks(tmp_path: Path) -> None:
    ds = open_dataset(_mvtec(tmp_path))
    assert ds.kind == "mvtec" and ds.root == tmp_path
    assert ds.categories() == ["bottle", "zipper"]
    train = ds.samples("bottle", "train")
    assert [s.image_path.name for s in train] == ["000.png", "001.png"]
    assert all(s.label == 0 and s.split == "train" and s.mask_paths == () for s in train)
    test = ds.samples("bottle")
    assert [(s.defect_type, s.label) for s in test] == [("broken", 1), ("broken", 1), ("good", 0)]
    bad = test[1]
    assert bad == Sample(tmp_path / "bottle/test/broken/001.png", "bottle", 1, "broken",
                         (tmp_path / "bottle/ground_truth/broken/001_mask.png",), "test")
    mask = load_mask(bad)
    assert mask.dtype == bool and mask.shape == (16, 16) and mask.sum() == 64 and mask[:8, :8].all()
    assert not load_mask(test[2]).any()
    assert ds.samples("bottle") == test  # deterministic


def test_mvtec_missing_mask_names_the_image(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    (root / "zipper/ground_truth/broken/001_mask.png").unlink()
    ds = open_dataset(root)
    ds.samples("bottle")  # other categories stay usable
    with pytest.raises(DatasetError, match=r"1 anomalous test image\(s\) without a mask.*001\.png.*001_mask"):
        ds.samples("zipper")


def test_mvtec_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    looked_for = r"cannot tell the dataset kind.*1cls\.csv.*logical_anomalies.*test/"
    with pytest.raises(DatasetError, match=looked_for):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"no mvtec categories found .*looked for"):
        open_dataset(tmp_path / "empty", "mvtec")
    root = _mvtec(tmp_path / "ds")
    with pytest.raises(DatasetError, match="single category folder"):
        open_dataset(root / "bottle")
    _img(root / "carpet" / "train" / "good" / "000.png")
    with pytest.raises(DatasetError, match=r"categories without a test/ folder: carpet"):
        open_dataset(root, "mvtec")


def test_unknown_category_split_and_kind(tmp_path: Path) -> None:
    ds = open_dataset(_mvtec(tmp_path))
    with pytest.raises(DatasetError, match=r"unknown category 'cable'.*available: bottle, zipper"):
        ds.samples("cable")
    with pytest.raises(DatasetError, match=r"no split 'validation'; splits: train, test"):
        ds.samples("bottle", "validation")
    with pytest.raises(DatasetError, match="unknown dataset kind 'btad'"):
        open_dataset(tmp_path, "btad")


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    for p in (root / "bottle/train/good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="has no train images"):
        open_dataset(root).samples("bottle", "train")


# --- MVTec LOCO AD ----------------------------------------------------------------------------

def test_loco_samples_and_mask_union(tmp_path: Path) -> None:
    ds = open_dataset(_loco(tmp_path))
    assert ds.kind == "loco" and ds.categories() == ["juice_bottle"]
    assert [s.split for s in ds.samples("juice_bottle", "validation")] == ["validation"]
    test = ds.samples("juice_bottle")
    assert [(s.defect_type, s.label, len(s.mask_paths)) for s in test] == [
        ("good", 0, 0), ("logical_anomalies", 1, 2), ("structural_anomalies", 1, 1)]
    union = load_mask(test[1])
    assert union.sum() == 32 and union[:4, :4].all() and union[12:, 12:].all()  # grey 37 counts as defect


def test_loco_missing_or_empty_mask_folder(tmp_path: Path) -> None:
    root = _loco(tmp_path)
    gt = root / "juice_bottle/ground_truth/logical_anomalies/000"
    for p in gt.iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"mask folder .*000 is empty"):
        open_dataset(root).samples("juice_bottle")
    gt.rmdir()
    with pytest.raises(DatasetError, match=r"without a mask: .*anomalies/000\.png \(expected mask folder"):
        open_dataset(root).samples("juice_bottle")


def test_detection_and_ambiguity(tmp_path: Path) -> None:
    assert detect_kind(_mvtec(tmp_path / "m")) == "mvtec"
    assert detect_kind(_loco(tmp_path / "l")) == "loco"
    assert detect_kind(_visa(tmp_path / "v")) == "visa"
    mixed = _mvtec(_loco(tmp_path / "mixed"))
    with pytest.raises(DatasetError, match=r"ambiguous: LOCO-style categories \(juice_bottle\)"):
        open_dataset(mixed)
    assert open_dataset(mixed, "mvtec").categories() == ["bottle", "juice_bottle", "zipper"]
    both = _mvtec(_visa(tmp_path / "both"))
    with pytest.raises(DatasetError, match=r"ambiguous: it has split_csv/1cls\.csv"):
        open_dataset(both)
    (tmp_path / "fewshot" / "split_csv").mkdir(parents=True)
    with pytest.raises(DatasetError, match="split_csv/ exists but has no 1cls.csv"):
        open_dataset(tmp_path / "fewshot")


# --- VisA -------------------------------------------------------------------------------------

def test_visa_csv_samples(tmp_path: Path) -> None:
    ds = open_dataset(_visa(tmp_path))
    assert ds.kind == "visa" and ds.categories() == ["candle", "pcb1"]
    assert len(ds.samples("candle", "train")) == 2
    test = ds.samples("candle")
    assert [(s.label, s.defect_type) for s in test] == [(1, "anomaly"), (0, "good")]
    assert test[0].mask_paths == (tmp_path / "candle/Data/Masks/Anomaly/000.png",)
    assert load_mask(test[0]).sum() == 16


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([("candle", "test", "bad", "a.JPG", "")], None, r"line 2: label 'bad' is not"),
        ([("candle", "test", "anomaly", "a.JPG", "")], None, r"anomalous image a\.JPG has no mask"),
        ([("candle", "test", "normal", "a.JPG", "m.png")], None, r"normal image a\.JPG has a mask"),
        ([("candle", "val", "normal", "a.JPG", "")], None, r"split 'val' is not one of train, test"),
        ([("candle", "test", "normal", "a.JPG", "")] * 2, None, r"line 3: duplicate test image a\.JPG"),
        ([], None, "lists no images"),
        ([("candle", "test", "normal", "a.JPG", "")], "object,split,image", r"expected object,split,label"),
    ],
)
def test_visa_bad_rows(tmp_path: Path, rows: list[tuple[str, ...]], header: str | None, message: str) -> None:
    _visa(tmp_path, rows, header or "object,split,label,image,mask", write_files=False)
    with pytest.raises(DatasetError, match=message):
        open_dataset(tmp_path)


def test_visa_csv_referencing_missing_files(tmp_path: Path) -> None:
    root = _visa(tmp_path)
    (root / "pcb1/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(DatasetError, match=r"references 1 missing file\(s\).*pcb1/Data/Masks/Anomaly/000"):
        open_dataset(root)
    with pytest.raises(DatasetError, match="split file .* not found"):
        open_dataset(tmp_path / "candle", "visa")


# --- masks ------------------------------------------------------------------------------------

def test_load_mask_resize_threshold_and_shapes(tmp_path: Path) -> None:
    img = _img(tmp_path / "test/x/000.png", h=16, w=24)
    m = np.zeros((16, 24), np.uint8)
    m[0:8, 0:12] = 255  # a quarter: survives downscaling
    m[15, 23] = 255  # one pixel: averages below 0.5 and vanishes
    sample = Sample(img, "c", 1, "x", (_png(tmp_path / "m.png", m),), "test")
    assert load_mask(sample).shape == (16, 24)
    small = load_mask(sample, (4, 6))  # (height, width)
    expected = np.zeros((4, 6), bool)
    expected[:2, :3] = True
    assert np.array_equal(small, expected)
    assert load_mask(sample, (32, 48)).sum() == 4 * 8 * 12 + 4  # upscaling keeps the block exactly
    normal = Sample(img, "c", 0, "good", (), "test")
    assert load_mask(normal).shape == (16, 24) and not load_mask(normal).any()
    assert load_mask(normal, (5, 7)).shape == (5, 7)
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[3, 4] = (0, 0, 9)
    assert load_mask(Sample(img, "c", 1, "x", (_png(tmp_path / "rgb.png", rgb),), "test")).sum() == 1


def test_load_mask_size_mismatch(tmp_path: Path) -> None:
    img = _img(tmp_path / "a.png", h=16, w=16)
    bad = Sample(img, "c", 1, "x", (_mask(tmp_path / "m.png", (0, 2, 0, 2), h=8, w=8),), "test")
    with pytest.raises(DatasetError, match=r"is 8x8 but image .*a\.png is 16x16"):
        load_mask(bad)
