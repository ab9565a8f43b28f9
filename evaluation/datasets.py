"""Readers for public anomaly-detection layouts: MVTec AD, VisA (split CSV) and MVTec LOCO AD.

Readers are strict: a missing mask or a CSV row pointing nowhere raises ``DatasetError`` instead of
being skipped, because a silently dropped sample changes the metrics without anyone noticing.
"""

from __future__ import annotations

import csv
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("mvtec", "visa", "loco")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_SHOW = 5  # how many offending paths an error message lists


@dataclass(frozen=True)
class Sample:
    image_path: Path
    category: str
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" or the defect folder name ("scratch", "logical_anomalies", ...)
    mask_paths: tuple[Path, ...]  # empty for normal (or unannotated) samples
    split: str  # "train" | "validation" | "test"


class DatasetError(ValueError):
    """The folder does not match the expected layout; the message says what is wrong and where."""


def _listing(paths: Iterable[object]) -> str:
    items = [str(p) for p in paths]
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    # Hidden files (.DS_Store, ._x.png from macOS archives) are never samples.
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


class Dataset(ABC):
    """One dataset root; ``samples`` lists a category's images of one split, sorted by path."""

    kind: str = ""
    splits: tuple[str, ...] = ()

    def __init__(self, root: Path) -> None:
        self.root = root
        self._categories = self._scan()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, categories={len(self._categories)})"

    def categories(self) -> list[str]:
        return list(self._categories)

    def samples(self, category: str, split: str = "test") -> list[Sample]:
        if category not in self._categories:
            raise DatasetError(
                f"unknown category {category!r} in {self.kind} dataset {self.root}; "
                f"available: {', '.join(self._categories)}"
            )
        if split not in self.splits:
            raise DatasetError(
                f"{self.kind} datasets have no split {split!r}; splits: {', '.join(self.splits)}"
            )
        found = self._samples(category, split)
        if not found:
            # An empty split would make every metric undefined or meaningless downstream.
            raise DatasetError(
                f"{self.kind} dataset {self.root}: category {category!r} has no {split} images"
            )
        return sorted(found, key=lambda s: s.image_path.as_posix())

    @abstractmethod
    def _scan(self) -> list[str]:
        """Validate the root and return the sorted category names."""

    @abstractmethod
    def _samples(self, category: str, split: str) -> list[Sample]: ...


class _FolderDataset(Dataset):
    """Shared scanning for the one-folder-per-category layouts (MVTec AD and LOCO)."""

    markers = ("train", "test", "ground_truth")
    pattern = ""

    def _scan(self) -> list[str]:
        cats = [d for d in _subdirs(self.root) if any((d / m).is_dir() for m in self.markers)]
        if not cats:
            hint = ""
            if (self.root / "test").is_dir():
                hint = "; it looks like a single category folder, pass its parent folder instead"
            raise DatasetError(
                f"no {self.kind} categories found in {self.root} (looked for {self.pattern}){hint}"
            )
        no_test = [d.name for d in cats if not (d / "test").is_dir()]
        if no_test:
            raise DatasetError(f"{self.kind} dataset {self.root}: categories without a test/ folder: "
                               f"{_listing(no_test)}")
        return [d.name for d in cats]

    def _good(self, category: str, split: str) -> list[Sample]:
        folder = self.root / category / split / "good"
        if not folder.is_dir():
            raise DatasetError(f"{self.kind} dataset {self.root}: missing folder {folder}")
        return [Sample(p, category, 0, "good", (), split) for p in _images(folder)]

    def _test(self, category: str) -> list[Sample]:
        test = self.root / category / "test"
        defects = _subdirs(test)
        if not defects:
            raise DatasetError(f"{test} has no defect-type folders (expected test/good, test/<defect>)")
        out: list[Sample] = []
        missing: list[str] = []
        for folder in defects:
            for img in _images(folder):
                if folder.name == "good":
                    out.append(Sample(img, category, 0, "good", (), "test"))
                    continue
                masks, problem = self._masks_for(category, folder.name, img)
                if problem:
                    missing.append(problem)
                out.append(Sample(img, category, 1, folder.name, masks, "test"))
        if missing:
            raise DatasetError(f"{self.kind} category {category!r}: {len(missing)} anomalous test image(s) "
                               f"without a mask: {_listing(missing)}")
        return out

    @abstractmethod
    def _masks_for(self, category: str, defect: str, image: Path) -> tuple[tuple[Path, ...], str]:
        """The image's mask files, or () and a message naming the image and what was expected."""

    def _samples(self, category: str, split: str) -> list[Sample]:
        return self._test(category) if split == "test" else self._good(category, split)


class MVTecDataset(_FolderDataset):
    kind = "mvtec"
    splits = ("train", "test")
    pattern = "<root>/<category>/test/<defect>/*.png"

    def _masks_for(self, category: str, defect: str, image: Path) -> tuple[tuple[Path, ...], str]:
        mask = self.root / category / "ground_truth" / defect / f"{image.stem}_mask.png"
        return ((mask,), "") if mask.is_file() else ((), f"{image} (expected {mask})")


class LocoDataset(_FolderDataset):
    kind = "loco"
    splits = ("train", "validation", "test")
    markers = ("train", "validation", "test", "ground_truth")
    pattern = "<root>/<category>/test/{good,logical_anomalies,structural_anomalies}/*.png"

    def _masks_for(self, category: str, defect: str, image: Path) -> tuple[tuple[Path, ...], str]:
        folder = self.root / category / "ground_truth" / defect / image.stem
        if not folder.is_dir():
            return (), f"{image} (expected mask folder {folder})"
        masks = tuple(_images(folder))
        return (masks, "") if masks else ((), f"{image} (mask folder {folder} is empty)")


class VisADataset(Dataset):
    kind = "visa"
    splits = ("train", "test")

    def _scan(self) -> list[str]:
        csv_path = self.root / VISA_CSV
        if not csv_path.is_file():
            raise DatasetError(f"VisA split file {csv_path} not found")
        rows: dict[str, list[Sample]] = {}
        errors: list[str] = []
        seen: set[tuple[str, str]] = set()
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = tuple(h.strip() for h in reader.fieldnames or ())
            if not set(VISA_COLUMNS) <= set(header):
                raise DatasetError(f"{csv_path}: header is {','.join(header) or '(empty)'}, "
                                   f"expected {','.join(VISA_COLUMNS)}")
            for line, raw in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
                sample, problem = self._row(row)
                if problem:
                    errors.append(f"line {line}: {problem}")
                    continue
                assert sample is not None
                key = (sample.split, sample.image_path.as_posix())
                if key in seen:
                    errors.append(f"line {line}: duplicate {sample.split} image {row['image']}")
                    continue
                seen.add(key)
                rows.setdefault(sample.category, []).append(sample)
        if errors:
            raise DatasetError(f"{csv_path}: {len(errors)} bad row(s): {_listing(errors)}")
        if not rows:
            raise DatasetError(f"{csv_path} lists no images, so no categories found")
        files = (p for ss in rows.values() for s in ss for p in (s.image_path, *s.mask_paths))
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise DatasetError(f"{csv_path} references {len(missing)} missing file(s) under {self.root}: "
                               f"{_listing(missing)}")
        self._rows = rows
        return sorted(rows)

    def _row(self, row: dict[str, str]) -> tuple[Sample | None, str]:
        obj, split, label = row["object"], row["split"], row["label"]
        image, mask = row["image"].replace("\\", "/"), row["mask"].replace("\\", "/")
        if not obj or not image:
            return None, "empty object or image"
        if split not in self.splits:
            return None, f"split {split!r} is not one of {', '.join(self.splits)}"
        if label == "normal":
            if mask:  # a normal row with a mask means the columns or labels are mixed up
                return None, f"normal image {image} has a mask {mask}"
            return Sample(self.root / image, obj, 0, "good", (), split), ""
        if label == "anomaly":
            if not mask:
                return None, f"anomalous image {image} has no mask"
            return Sample(self.root / image, obj, 1, "anomaly", (self.root / mask,), split), ""
        return None, f"label {label!r} is not 'normal' or 'anomaly'"

    def _samples(self, category: str, split: str) -> list[Sample]:
        return [s for s in self._rows[category] if s.split == split]


_READERS: dict[str, type[Dataset]] = {"mvtec": MVTecDataset, "visa": VisADataset, "loco": LocoDataset}


def detect_kind(root: Path) -> str:
    """"visa", "loco" or "mvtec" from the folder layout; DatasetError when none or several fit."""
    has_csv = (root / VISA_CSV).is_file()
    cats = [d for d in _subdirs(root) if (d / "test").is_dir()]
    loco = [
        d.name for d in cats if (d / "validation").is_dir() and (d / "test" / "logical_anomalies").is_dir()
    ]
    plain = [d.name for d in cats if d.name not in loco]
    if has_csv and cats:
        raise DatasetError(f"{root} is ambiguous: it has {VISA_CSV} (VisA) and category folders with test/ "
                           f"({_listing(d.name for d in cats)}); pass kind explicitly")
    if loco and plain:
        raise DatasetError(f"{root} is ambiguous: LOCO-style categories ({_listing(loco)}) next to "
                           f"MVTec-style ones ({_listing(plain)}); pass kind explicitly")
    if has_csv:
        return "visa"
    if loco:
        return "loco"
    if plain:
        return "mvtec"
    hint = ""
    if (root / "test").is_dir():
        hint = "; it looks like a single category folder, pass its parent folder instead"
    elif (root / "split_csv").is_dir():
        hint = "; split_csv/ exists but has no 1cls.csv"
    raise DatasetError(
        f"cannot tell the dataset kind of {root}: looked for {VISA_CSV} (VisA), "
        "<category>/validation/ with <category>/test/logical_anomalies/ (MVTec LOCO AD) and "
        f"<category>/test/ (MVTec AD), found none{hint}"
    )


def open_dataset(root: Path | str, kind: str | None = None) -> Dataset:
    """Open a dataset root; ``kind`` is "mvtec", "visa", "loco", or None to detect it from the layout."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder")
    if kind is None:
        kind = detect_kind(root)
    if kind not in _READERS:
        raise DatasetError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    return _READERS[kind](root)


def _read_binary(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        # Palette values are indices, not intensities: convert so "black" means background.
        arr = np.asarray(im.convert("L") if im.mode in ("P", "PA") else im)
    if arr.ndim == 3:  # RGB(A) masks: any colour channel counts; alpha does not
        arr = arr[..., : min(3, arr.shape[2])].max(axis=2) if arr.shape[2] != 2 else arr[..., 0]
    return arr > 0


def load_mask(sample: Sample, size: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean defect mask, the union of the sample's mask files (any value > 0 is defect).

    ``size`` is (height, width), the shape of the result. Resizing is bilinear on the 0/1 float
    mask, then ``> 0.5``, so small defects survive downscaling the way the reference protocols do.
    """
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (height, width) with positive values, got {size!r}")
    if not sample.mask_paths:
        if size is not None:
            return np.zeros(size, dtype=bool)
        with Image.open(sample.image_path) as im:  # header only; pixels are not decoded
            w, h = im.size
        return np.zeros((h, w), dtype=bool)
    with Image.open(sample.image_path) as im:
        w, h = im.size
    union = np.zeros((h, w), dtype=bool)
    for path in sample.mask_paths:
        m = _read_binary(path)
        if m.shape != (h, w):
            raise DatasetError(
                f"mask {path} is {m.shape[1]}x{m.shape[0]} but image {sample.image_path} is {w}x{h}"
            )
        union |= m
    if size is None or tuple(size) == (h, w):
        return union
    resized = Image.fromarray(union.astype(np.float32)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized) > 0.5
