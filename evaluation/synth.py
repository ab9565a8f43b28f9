"""Seeded synthetic defect data with exact ground-truth masks, in MVTec AD or MVTec LOCO AD layout.

Every image has its own random stream derived from (seed, kind, split, defect, index), so a sample
can be re-rendered alone (``render_sample``), with its defect-free twin, and re-runs are
byte-identical. Defects are painted through an alpha map; the mask is ``alpha > 0.1``, so pixels
outside the mask change by at most a tenth of the paint contrast.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

KINDS = ("texture", "object", "logical")
STRUCTURAL = ("scratch", "hole", "stain", "crack")
LOGICAL_SUBTYPES = ("missing", "extra", "swapped", "misplaced", "wrong_colour")
LOCO_TYPES = ("logical_anomalies", "structural_anomalies")
GENERATOR = "evaluation.synth"
MIN_SIZE, MAX_SIZE = 64, 4096  # below 64 px the tray has no room for extra/misplaced parts
VERSION = 1
_KIND_ID = {k: i + 1 for i, k in enumerate(KINDS)}
_SPLIT_ID = {"train": 0, "validation": 1, "test": 2}
_DEFECT_ID = {d: i for i, d in enumerate(("good", *STRUCTURAL, *LOCO_TYPES))}
_MASK_ALPHA = 0.1
_SUB = 16  # cv2 drawing with shift=4: sub-pixel coordinates
_STAIN_COLOURS = np.array([(95, 60, 30), (60, 115, 55), (160, 35, 40), (40, 60, 150), (20, 20, 20)],
                          np.float32)
_PALETTES = (((110, 88, 62), (205, 182, 146)), ((70, 82, 98), (165, 176, 192)),
             ((82, 88, 56), (172, 176, 124)))  # fabric (dark, light) colour pairs
RED, BLUE, YELLOW = (205, 40, 40), (40, 75, 195), (235, 200, 40)
_ODD_COLOURS = ((60, 165, 80), (145, 70, 185))  # colours no correct component has
# Logical board: (shape, colour, x, y) of the canonical components, as fractions of the image size.
_LAYOUT = (("circle", RED, 0.25, 0.27), ("circle", RED, 0.75, 0.27),
           ("square", BLUE, 0.25, 0.73), ("bar", YELLOW, 0.68, 0.73))


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # uint8 RGB (H, W, 3)
    clean: np.ndarray  # the same scene without the defect (equal to image for good samples)
    masks: tuple[np.ndarray, ...]  # bool (H, W) per affected region; empty for good samples
    subtype: str  # "good", a structural defect name, or a logical subtype such as "missing"


@dataclass(frozen=True)
class _Comp:
    shape: str
    colour: tuple[int, int, int]
    cx: float
    cy: float
    angle: float  # degrees
    scale: float


def defect_types(kind: str) -> tuple[str, ...]:
    """Folders under test/ for a kind, "good" first."""
    _check_kind(kind)
    return ("good", *(LOCO_TYPES if kind == "logical" else STRUCTURAL))


def planned_counts(kind: str, n: int, n_train: int | None = None) -> dict[str, int]:
    """Images per "<split>/<defect>" folder that ``generate`` writes."""
    n_train = max(n, 8) if n_train is None else n_train
    counts = {"train/good": n_train}
    if kind == "logical":  # LOCO has a validation split of good images for threshold tuning
        counts["validation/good"] = max(2, n_train // 4)
    counts.update({f"test/{d}": n for d in defect_types(kind)})
    return counts


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {', '.join(KINDS)}")


def _pts(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points, np.float64) * _SUB).astype(np.int32)


def _canvas(size: int, draw: Callable[[np.ndarray], None]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1]; drawn in 8 bit because cv2 anti-aliases only there."""
    c = np.zeros((size, size), np.uint8)
    draw(c)
    return c.astype(np.float32) / 255.0


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | tuple[int, ...]) -> np.ndarray:
    a = alpha[..., None]
    return img * (1.0 - a) + np.asarray(colour, np.float32) * a


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _disc(size: int, c: np.ndarray, r: float, thickness: int = -1) -> np.ndarray:
    return _canvas(size, lambda im: cv2.circle(im, tuple(_pts(c)), int(r * _SUB), 255, thickness,
                                               cv2.LINE_AA, 4))


def _walk(rng: np.random.Generator, start: np.ndarray, ang: float, steps: int, step: float) -> np.ndarray:
    pts = [start]
    for _ in range(steps):
        ang += rng.normal(0, 0.45)
        pts.append(pts[-1] + step * np.array([np.cos(ang), np.sin(ang)]))
    return np.array(pts)


def _defect_alpha(name: str, rng: np.random.Generator, size: int, c: np.ndarray, scale: float) -> np.ndarray:
    """Coverage of one structural defect centred near ``c``; ``scale`` is its characteristic length."""
    if name == "scratch":
        length, ang = scale * rng.uniform(0.8, 1.6), rng.uniform(0, np.pi)
        d, nrm = np.array([np.cos(ang), np.sin(ang)]), np.array([-np.sin(ang), np.cos(ang)])
        t = np.linspace(-0.5, 0.5, 4)[:, None]
        pts = c + t * length * d + rng.normal(0, 0.04 * length, (4, 1)) * nrm
        th = max(1, round(size / 80))
        return _canvas(size, lambda im: cv2.polylines(im, [_pts(pts)], False, 255, th, cv2.LINE_AA, 4))
    if name == "hole":
        r = scale * rng.uniform(0.12, 0.24)
        axes = _pts([r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)])
        ang = float(rng.uniform(0, 180))
        return _canvas(size, lambda im: cv2.ellipse(im, tuple(_pts(c)), tuple(axes), ang, 0, 360, 255, -1,
                                                    cv2.LINE_AA, 4))
    if name == "stain":
        r = scale * rng.uniform(0.2, 0.36)
        blobs = [(c + rng.normal(0, 0.3 * r, 2), r * rng.uniform(0.4, 0.7, 2), rng.uniform(0, 180))
                 for _ in range(int(rng.integers(3, 6)))]

        def draw(im: np.ndarray) -> None:
            for bc, ax, ang in blobs:
                cv2.ellipse(im, tuple(_pts(bc)), tuple(_pts(ax)), float(ang), 0, 360, 255, -1, cv2.LINE_AA, 4)

        cov = cv2.GaussianBlur(_canvas(size, draw), (0, 0), max(0.8, 0.12 * r))
        return np.clip(cov * 1.3, 0, 1) * rng.uniform(0.75, 0.9)
    if name == "crack":
        steps = int(rng.integers(10, 16))
        step, ang = scale * rng.uniform(0.8, 1.4) / steps, rng.uniform(0, 2 * np.pi)
        trunk = _walk(rng, c, ang, steps, step)
        # One side branch makes it read as a crack rather than a scratch.
        branch = _walk(rng, trunk[steps // 2], ang + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2),
                       steps // 3, step)
        th = max(1, round(size / 128))
        return _canvas(size, lambda im: cv2.polylines(im, [_pts(trunk), _pts(branch)], False, 255, th,
                                                      cv2.LINE_AA, 4))
    raise ValueError(f"unknown structural defect {name!r}")


def _paint_defect(name: str, rng: np.random.Generator, img: np.ndarray, surface: np.ndarray,
                  scale: float, centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint a structural defect starting in ``centres``, clipped to ``surface``; returns (image, mask)."""
    size = img.shape[0]
    ys, xs = np.nonzero(surface if centres is None else centres)
    for _ in range(50):  # redraw when clipping to the surface cuts away much of the defect
        i = int(rng.integers(len(xs)))
        c = np.array([xs[i], ys[i]], np.float64) + 0.5
        full = _defect_alpha(name, rng, size, c, scale)
        alpha = full * surface
        mask = alpha > _MASK_ALPHA
        if mask.sum() >= max(6, 0.6 * (full > _MASK_ALPHA).sum()):
            break
    local = img[mask].mean(axis=0)
    if name == "scratch":  # bright on dark surfaces, dark on bright ones, so it is visible
        colour: np.ndarray = np.full(3, 240.0 if np.dot(local, (0.299, 0.587, 0.114)) < 140 else 30.0)
    elif name in ("hole", "crack"):
        colour = np.array((22, 20, 18), np.float32)
    else:
        far = [s for s in _STAIN_COLOURS if np.linalg.norm(s - local) > 120] or list(_STAIN_COLOURS)
        colour = far[int(rng.integers(len(far)))]
    return _blend(img, alpha, colour), mask


def _texture(rng: np.random.Generator, style: np.random.Generator,
             size: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain-weave fabric; ``style`` (per category) fixes colours and thread pitch, ``rng`` the phase."""
    dark, light = (np.array(c, np.float32) for c in _PALETTES[int(style.integers(len(_PALETTES)))])
    period = size / style.uniform(10, 14)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    th = rng.normal(0, np.deg2rad(2))
    u = (xx * np.cos(th) + yy * np.sin(th)) / period + rng.uniform(0, 2)
    v = (-xx * np.sin(th) + yy * np.cos(th)) / period + rng.uniform(0, 2)
    fu, fv = u % 1.0, v % 1.0
    warp, weft = np.sin(np.pi * fu) ** 0.6, np.sin(np.pi * fv) ** 0.6
    over = (np.floor(u) + np.floor(v)) % 2 == 0  # plain weave: warp over weft on alternate cells
    t = np.where(over, warp * (0.7 + 0.3 * np.sin(np.pi * fv)), weft * (0.7 + 0.3 * np.sin(np.pi * fu)))
    mottle = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), size / 12)
    mottle /= mottle.std() + 1e-6
    t = 0.12 + 0.78 * t + 0.05 * mottle + 0.04 * rng.standard_normal((size, size)).astype(np.float32)
    img = dark + (light - dark) * np.clip(t, 0, 1)[..., None]
    return img, np.ones((size, size), bool)


def _object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A flanged disc part (centre bore, four bolt holes, groove, orientation arrow) on a plain table."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array((198, 200, 196), np.float32) - 14 * (yy / size)[..., None]
    cx, cy = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    rad = 0.32 * size * rng.uniform(0.98, 1.02)
    rot = np.deg2rad(rng.uniform(-10, 10))
    c = np.array([cx, cy])
    img *= 1 - 0.3 * cv2.GaussianBlur(_disc(size, c + 0.025 * size, rad), (0, 0), 0.03 * size)[..., None]
    part = np.clip(_disc(size, c, rad) - _disc(size, c, 0.26 * rad), 0, 1)  # disc minus centre bore
    shade = 1 + 0.25 * (-(xx - cx) - (yy - cy)) / (2 * rad)  # lit from the top left
    body = np.array((70, 110, 170), np.float32) * shade[..., None]
    img = img * (1 - part[..., None]) + body * part[..., None]
    img = _blend(img, _disc(size, c, 0.86 * rad, max(1, round(size / 128))) * 0.6, (35, 55, 95))
    for k in range(4):
        a = rot + np.pi / 4 + k * np.pi / 2
        p = c + 0.62 * rad * np.array([np.cos(a), np.sin(a)])
        img = _blend(img, _disc(size, p, 0.09 * rad), (30, 34, 44))  # bolt holes
    up = np.array([np.sin(rot), -np.cos(rot)])
    side = np.array([np.cos(rot), np.sin(rot)])
    tri = np.array([c + 0.62 * rad * up, c + rad * (0.4 * up + 0.1 * side),
                    c + rad * (0.4 * up - 0.1 * side)])
    arrow = _canvas(size, lambda im: cv2.fillPoly(im, [_pts(tri)], 255, cv2.LINE_AA, 4))
    img = _blend(img, arrow, (235, 235, 230))
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)
    return img, part > 0.5


def _comp_alpha(comp: _Comp, size: int) -> np.ndarray:
    c, s, ang = np.array([comp.cx, comp.cy]) * size, comp.scale * size, np.deg2rad(comp.angle)
    if comp.shape == "circle":
        return _disc(size, c, 0.095 * s)
    hw, hh = (0.085, 0.085) if comp.shape == "square" else (0.15, 0.04)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    box = np.array([(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]) * s @ rot.T + c
    return _canvas(size, lambda im: cv2.fillPoly(im, [_pts(box)], 255, cv2.LINE_AA, 4))


def _board(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[_Comp]]:
    """Tray background, per-pixel grain (added last) and the jittered canonical components."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = (50, 52, 56)
    lo, hi, rr = 0.06 * size, 0.94 * size, 0.05 * size

    def tray(im: np.ndarray) -> None:
        for x0, y0, x1, y1 in ((lo + rr, lo, hi - rr, hi), (lo, lo + rr, hi, hi - rr)):
            cv2.rectangle(im, (int(x0), int(y0)), (int(x1), int(y1)), 255, -1)
        for x, y in ((lo + rr, lo + rr), (hi - rr, lo + rr), (lo + rr, hi - rr), (hi - rr, hi - rr)):
            cv2.circle(im, tuple(_pts((x, y))), int(rr * _SUB), 255, -1, cv2.LINE_AA, 4)  # round corners

    img = _blend(img, _canvas(size, tray), (212, 208, 198))
    lip = _canvas(size, lambda im: cv2.rectangle(im, (int(0.1 * size),) * 2, (int(0.9 * size),) * 2, 255, 1))
    img = _blend(img, lip * 0.5, (170, 166, 156))
    comps = [
        _Comp(shape, colour, x + rng.uniform(-0.02, 0.02), y + rng.uniform(-0.02, 0.02),
              0.0 if shape == "circle" else rng.uniform(-6, 6), rng.uniform(0.96, 1.04))
        for shape, colour, x, y in _LAYOUT
    ]
    grain = rng.normal(0, 2.0, (size, size, 3)).astype(np.float32)
    return img, grain, comps


def _draw_comps(base: np.ndarray, grain: np.ndarray, comps: list[_Comp]) -> np.ndarray:
    size = base.shape[0]
    img = base.copy()
    for comp in comps:
        alpha = _comp_alpha(comp, size)
        img = _blend(img, alpha, comp.colour)
        inner = cv2.erode(alpha, np.ones((3, 3), np.uint8))  # darker rim gives the parts an edge
        img = _blend(img, np.clip(alpha - inner, 0, 1) * 0.5, np.array(comp.colour) * 0.6)
    return img + grain


def _region(comp: _Comp, size: int) -> np.ndarray:
    """Where a component's pixels can change: its footprint grown past the anti-aliased edge."""
    grow = max(1, round(size / 64))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    return cv2.dilate((_comp_alpha(comp, size) > 0).astype(np.uint8), k) > 0


def _place(rng: np.random.Generator, comp: _Comp, others: list[_Comp], size: int,
           away_from: tuple[float, float] | None = None) -> _Comp:
    """Move ``comp`` to a random free spot inside the tray's lip, clear of ``others``."""
    taken = np.ones((size, size), bool)
    lo, hi = round(0.1 * size) + 1, round(0.9 * size) - 1
    taken[lo:hi, lo:hi] = False
    for o in others:
        taken |= _region(o, size)
    gap = max(1, round(size / 64))  # keep a visible gap between parts
    taken = cv2.dilate(taken.astype(np.uint8), np.ones((2 * gap + 1,) * 2, np.uint8)) > 0
    # Random tries first; then a shuffled grid, so a free spot is found whenever one exists on it.
    grid = np.stack(np.meshgrid(np.linspace(0.12, 0.88, 25), np.linspace(0.12, 0.88, 25)), -1).reshape(-1, 2)
    for x, y in np.concatenate([rng.uniform(0.12, 0.88, (200, 2)), rng.permutation(grid)]):
        if away_from is not None and np.hypot(x - away_from[0], y - away_from[1]) < 0.15:
            continue
        cand = replace(comp, cx=float(x), cy=float(y))
        if not (_region(cand, size) & taken).any():
            return cand
    raise RuntimeError("no free spot on the synthetic tray; this is a bug in the layout constants")


def _logical(scene: np.random.Generator, rng: np.random.Generator, size: int,
             subtype: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    base, grain, comps = _board(scene, size)
    clean = _draw_comps(base, grain, comps)
    if subtype == "good":
        return clean, clean, []
    if subtype in ("scratch", "stain"):
        k = int(rng.integers(len(comps)))
        foot = (_comp_alpha(comps[k], size) > 0.5).astype(np.uint8)
        region = cv2.erode(foot, np.ones((3, 3), np.uint8)) > 0
        img, mask = _paint_defect(subtype, rng, clean, region, 0.19 * comps[k].scale * size)
        return img, clean, [mask]
    new = list(comps)
    if subtype == "missing":
        k = int(rng.integers(len(comps)))
        masks = [_region(new.pop(k), size)]
    elif subtype == "extra":
        shape, colour, _, _ = _LAYOUT[int(rng.integers(len(_LAYOUT)))]
        template = _Comp(shape, colour, 0, 0, rng.uniform(-6, 6), rng.uniform(0.96, 1.04))
        extra = _place(rng, template, comps, size)
        new.append(extra)
        masks = [_region(extra, size)]
    elif subtype == "swapped":
        pairs = [(i, j) for i in range(len(comps)) for j in range(i + 1, len(comps))
                 if comps[i].shape != comps[j].shape]
        i, j = pairs[int(rng.integers(len(pairs)))]
        new[i] = replace(comps[i], cx=comps[j].cx, cy=comps[j].cy)
        new[j] = replace(comps[j], cx=comps[i].cx, cy=comps[i].cy)
        # One region per slot: what left it and what arrived there.
        masks = [_region(comps[i], size) | _region(new[j], size),
                 _region(comps[j], size) | _region(new[i], size)]
    elif subtype == "misplaced":
        k = int(rng.integers(len(comps)))
        new[k] = _place(rng, comps[k], comps[:k] + comps[k + 1:], size, away_from=(comps[k].cx, comps[k].cy))
        masks = [_region(comps[k], size), _region(new[k], size)]
    elif subtype == "wrong_colour":
        k = int(rng.integers(len(comps)))
        options = [c for c in (RED, BLUE, YELLOW, *_ODD_COLOURS) if c != comps[k].colour]
        new[k] = replace(comps[k], colour=options[int(rng.integers(len(options)))])
        masks = [_region(comps[k], size)]
    else:
        raise ValueError(f"unknown logical subtype {subtype!r}")
    return _draw_comps(base, grain, new), clean, masks


def render_sample(kind: str, defect: str, index: int, *, seed: int = 0, size: int = 128,
                  split: str = "test") -> Rendered:
    """The image ``generate`` writes for ``<split>/<defect>/<index>``, with its defect-free twin."""
    _check_kind(kind)
    if defect not in defect_types(kind):
        raise ValueError(f"{kind} has no defect type {defect!r}; expected {', '.join(defect_types(kind))}")
    if split not in _SPLIT_ID or (split != "test" and defect != "good"):
        raise ValueError(f"split {split!r} cannot hold {defect!r} images")
    seq = np.random.SeedSequence([seed, _KIND_ID[kind], _SPLIT_ID[split], _DEFECT_ID[defect], index])
    # Separate streams: the scene draws never depend on whether or which defect follows.
    scene_rng, defect_rng = (np.random.default_rng(s) for s in seq.spawn(2))
    if kind == "logical":
        subtype = defect
        if defect == "logical_anomalies":
            subtype = LOGICAL_SUBTYPES[index % len(LOGICAL_SUBTYPES)]
        elif defect == "structural_anomalies":
            subtype = ("scratch", "stain")[index % 2]
        img, clean, masks = _logical(scene_rng, defect_rng, size, subtype)
        return Rendered(_to_u8(img), _to_u8(clean), tuple(masks), subtype)
    if kind == "texture":
        clean, surface = _texture(scene_rng, np.random.default_rng([seed, _KIND_ID[kind]]), size)
        centres = np.zeros_like(surface)
        m = round(0.1 * size)  # centres away from the border, so the image edge does not cut defects
        centres[m:-m, m:-m] = True
    else:
        clean, surface = _object(scene_rng, size)
        # Centres off the part's outer edge, so defects read as surface damage.
        centres = cv2.erode(surface.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if defect == "good":
        u8 = _to_u8(clean)
        return Rendered(u8, u8, (), "good")
    img, mask = _paint_defect(defect, defect_rng, clean, surface, 0.25 * size, centres)
    return Rendered(_to_u8(img), _to_u8(clean), (mask,), defect)


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")  # PIL writes no timestamps: same pixels, same bytes


def _prepare(root: Path) -> None:
    """Start from an empty category folder; only replace what this generator wrote before."""
    if root.exists():
        meta = root / "meta.json"
        try:
            ours = json.loads(meta.read_text()).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if ours:
            shutil.rmtree(root)
        elif not root.is_dir() or any(root.iterdir()):
            raise FileExistsError(f"{root} exists and was not written by {GENERATOR}; not overwriting it")
    root.mkdir(parents=True, exist_ok=True)


def generate(out: Path | str, kind: str, n: int, *, seed: int = 0, size: int = 128,
             category: str | None = None, n_train: int | None = None,
             on_image: Callable[[Path], None] | None = None) -> Path:
    """Write ``<out>/<category>`` in MVTec AD layout (texture, object) or MVTec LOCO AD layout (logical).

    ``n`` test images per defect type and of test/good; ``n_train`` good training images (default
    max(n, 8)). Returns the category folder; ``open_dataset(out)`` reads it. ``on_image`` is called
    after each image is written (progress bars). A previous output of this generator is replaced.
    """
    _check_kind(kind)
    if n < 1 or (n_train is not None and n_train < 1):
        raise ValueError("n and n_train must be at least 1")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    category = category or f"synth_{kind}"
    if category in (".", "..") or category.startswith(".") or any(c in category for c in "/\\:"):
        raise ValueError(f"category {category!r} must be a plain folder name")
    root = Path(out) / category
    _prepare(root)
    counts = planned_counts(kind, n, n_train)
    subtypes: dict[str, str] = {}
    for key, count in counts.items():
        split, defect = key.split("/")
        width = max(3, len(str(count - 1)))
        for i in range(count):
            r = render_sample(kind, defect, i, seed=seed, size=size, split=split)
            stem = f"{i:0{width}d}"
            path = root / split / defect / f"{stem}.png"
            _save_png(r.image, path)
            if kind == "logical":
                for j, m in enumerate(r.masks):  # LOCO: one file per affected region
                    mask_path = root / "ground_truth" / defect / stem / f"{j:03d}.png"
                    _save_png(m.astype(np.uint8) * 255, mask_path)
                if r.masks:
                    subtypes[f"{split}/{defect}/{stem}.png"] = r.subtype
            elif r.masks:
                union = np.logical_or.reduce(r.masks)
                _save_png(union.astype(np.uint8) * 255, root / "ground_truth" / defect / f"{stem}_mask.png")
            if on_image is not None:
                on_image(path)
    meta: dict[str, object] = {
        "generator": GENERATOR, "version": VERSION, "kind": kind, "category": category, "seed": seed,
        "size": size, "layout": "loco" if kind == "logical" else "mvtec", "counts": counts,
    }
    if subtypes:
        meta["subtypes"] = subtypes
    (root / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return root
