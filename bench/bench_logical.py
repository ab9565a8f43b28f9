"""CLIP-LAD logical stage cost per frame, shared vs separate backbone pass, and bank memory/search.

One process, one random-weights model (``load_clip(arch, "random")``), fp32 on CPU, under
``torch.inference_mode``.

1. Per frame, batch 1 (the queue path's shape), timed interleaved after warm-up rounds, median
   ms per frame: ``bare`` ``model.encode_image``; ``sdp`` SDP alone; ``logical`` CLIP-LAD alone
   (encode + score + Mahalanobis fusion, as ``LADEngine.score``); ``shared`` SDP with
   ``return_features=True`` feeding ``CLIPLAD.encode_from`` + score (one backbone pass);
   ``separate`` SDP then CLIP-LAD with its own pass; ``logical_head`` encode_from + score on a
   cached pass (the logical stage's cost on top of a shared pass). The bank is fitted on 4 random
   shots and the vocabularies (``prompts/clip_lad/<category>.json``) are encoded beforehand,
   untimed; the NACLIP bias is cached during the fit.
2. Per backbone (the paper's ViT-L/14 at 448 px, the default SDP backbone ViT-B-16-plus-240)
   and shot count: exact bytes of an fp32 ``LADMemory`` (centroids + histograms + patch bank)
   built from random unit-norm tensors of the exact shapes (no ViT-L forward), what fp16
   storage would take, and the structural search time for one query image (every level through
   ``patch_memory.nearest_distance`` at the configured chunk, as ``CLIPLAD.score`` does).

    .venv/bin/python -m bench.bench_logical [--arch ViT-B-16-plus-240] [--iters 5] [--warmup 1]
        [--threads 2] [--shots 1,4,16,64] [--category splicing_connectors] [--chunk 4096] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from bench.common import finish_report, report_header
from bench.winclip_probe import summarize, time_interleaved
from prompts import load_lad_vocabulary
from workers.lad_engine import lad_config
from workers.models.clip_lad import (
    CLIPLAD,
    LADConfig,
    LADMemory,
    TextClasses,
    encode_vocabulary,
    fit_mahalanobis,
    mahalanobis,
)
from workers.models.clip_surgery import SDP
from workers.models.patch_memory import nearest_distance
from workers.weights import load_clip, register_configs

DEFAULT_ARCH = "ViT-B-16-plus-240"  # the default SDP backbone
FIT_SHOTS = 4  # normal images in the bank used for the per-frame timings
MIB = 2**20
# (open_clip config, image size or None for the config's own) of the bank-memory table
BANK_BACKBONES: tuple[tuple[str, int | None], ...] = (("ViT-L-14", 448), (DEFAULT_ARCH, None))
VARIANTS = ("bare", "sdp", "logical", "shared", "separate", "logical_head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=DEFAULT_ARCH, help="model for the per-frame timings")
    p.add_argument("--iters", type=int, default=5, help="timed rounds per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--shots", default="1,4,16,64", help="comma-separated shot counts for the bank table")
    p.add_argument("--category", default="splicing_connectors", help="CLIP-LAD vocabulary file")
    p.add_argument("--chunk", type=int, default=LADConfig().nn_chunk, help="bank rows per nearest-neighbour chunk")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    args = p.parse_args(argv)
    try:
        args.shots = sorted({int(s) for s in args.shots.split(",") if s.strip()})
    except ValueError:
        p.error("--shots takes comma-separated integers")
    if not args.shots or min(args.shots) < 1:
        p.error("--shots needs at least one count >= 1")
    if min(args.iters, args.threads, args.chunk) < 1 or args.warmup < 0:
        p.error("--iters, --threads and --chunk must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- 1. per frame


def bench_frame(arch: str, content: dict[str, Any], cfg: LADConfig, warmup: int, iters: int) -> dict[str, Any]:
    """The six per-frame variants on one model, timed interleaved at batch 1."""
    clip = load_clip(arch, "random")
    model = clip.model
    sdp = SDP(model.visual).eval()
    lad = CLIPLAD(model.visual, cfg).eval()
    h, w = sdp.image_size
    embed_dim = int(model.visual.proj.shape[1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, h, w, generator=g)  # one normalised frame
    shots = torch.randn(FIT_SHOTS, 3, h, w, generator=g)
    text = F.normalize(torch.randn(embed_dim, 2, generator=g), dim=0)  # (E, 2) normal/abnormal

    with torch.inference_mode():
        # untimed set-up: vocabularies, bank, Mahalanobis statistics, a cached pass for the head
        tpl = content["templates"]
        coarse = TextClasses(encode_vocabulary(model.encode_text, clip.tokenizer, content["coarse"], tpl),
                             tuple(content["coarse"]), tuple(bool(f) for f in content["foreground"]))
        fine = TextClasses(encode_vocabulary(model.encode_text, clip.tokenizer, content["fine"], tpl),
                           tuple(content["fine"]))
        t0 = time.perf_counter()
        shot_feats = lad.encode(shots)
        memory = lad.fit(shot_feats, coarse, fine)
        fit_s = time.perf_counter() - t0
        # statistics from the shots themselves: values are irrelevant to the timing
        s = lad.score(shot_feats, memory, coarse, fine)
        stats = fit_mahalanobis(s.logical, s.structural)
        cached = sdp(x, text, return_features=True).features

        def logical_from(feats) -> Tensor:
            sc = lad.score(feats, memory, coarse, fine)
            return mahalanobis(stats, sc.logical, sc.structural)

        def shared() -> Tensor:
            out = sdp(x, text, return_features=True)
            return logical_from(lad.encode_from(out.features))

        def separate() -> Tensor:
            sdp(x, text)
            return logical_from(lad.encode(x))

        fns: dict[str, Callable[[], object]] = {
            "bare": lambda: model.encode_image(x),
            "sdp": lambda: sdp(x, text),
            "logical": lambda: logical_from(lad.encode(x)),
            "shared": shared,
            "separate": separate,
            "logical_head": lambda: logical_from(lad.encode_from(cached)),
        }
        times = time_interleaved(fns, warmup, iters)

    res = {name: summarize(t, 1) for name, t in times.items()}
    for r in res.values():
        r["median_ms"] = r["median_s"] * 1000
    med = {name: r["median_s"] for name, r in res.items()}
    bare = med["bare"]
    saving = med["separate"] - med["shared"]
    grid = lad.encoder.grid
    width = int(model.visual.transformer.width)
    shapes = {k: list(v.shape) for k, v in memory.tensors().items()}
    expected = memory_shapes(grid, width, cfg, FIT_SHOTS, fine.n_classes)
    return {
        "image_size": [h, w],
        "grid": list(grid),
        "width": width,
        "fit_shots": FIT_SHOTS,
        "fit_s": fit_s,
        "vocabulary": {"coarse": len(content["coarse"]), "fine": fine.n_classes,
                       "templates": len(tpl), "n_clusters": cfg.n_clusters},
        "results": res,
        "ratios": {f"{name}_over_bare": med[name] / bare for name in VARIANTS},
        "saving": {
            "shared_vs_separate_ms": saving * 1000,
            "fraction_of_separate": saving / med["separate"],
            "bare_forwards": saving / bare,
            "shared_over_separate": med["shared"] / med["separate"],
            "shared_over_separate_min": res["shared"]["min_s"] / res["separate"]["min_s"],
            "logical_on_top_of_sdp_ms": (med["shared"] - med["sdp"]) * 1000,
        },
        # the bank-table formula checked against the bank actually fitted above
        "memory_shapes": shapes,
        "memory_shapes_match_formula": shapes == {k: list(v) for k, v in expected.items()},
    }


# --------------------------------------------------------------------------- 2. bank memory


@dataclass(frozen=True)
class Backbone:
    name: str
    image_size: int
    patch_size: int
    width: int

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]


def backbone(name: str, image_size: int | None) -> Backbone:
    """Shapes from open_clip's config (no weights built); ``image_size`` overrides its own."""
    register_configs()
    vision = open_clip.get_model_config(name)["vision_cfg"]
    size = image_size or vision["image_size"]
    return Backbone(f"{name}@{size}", int(size), int(vision["patch_size"]), int(vision["width"]))


def memory_shapes(grid: tuple[int, int], width: int, cfg: LADConfig, shots: int,
                  n_fine: int) -> dict[str, tuple[int, ...]]:
    """Shapes of ``LADMemory.tensors()`` after ``CLIPLAD.fit`` on ``shots`` images."""
    p = grid[0] * grid[1]
    out: dict[str, tuple[int, ...]] = {
        "centroids": (cfg.n_clusters, len(cfg.shallow_stages) * width),
        "histograms": (shots, n_fine),
        "n_fine": (1,),
    }
    for i in range(len(cfg.patch_stages)):
        out[f"patch_bank.{i}"] = (shots * p, width)
    return out


def random_memory(shapes: dict[str, tuple[int, ...]], n_fine: int, gen: torch.Generator) -> LADMemory:
    """An fp32 LADMemory of exactly these shapes: unit-norm rows, histograms summing to 1."""
    def unit(shape: tuple[int, ...]) -> Tensor:
        return F.normalize(torch.randn(*shape, generator=gen), dim=-1)

    hist = torch.rand(*shapes["histograms"], generator=gen)
    levels = sorted(k for k in shapes if k.startswith("patch_bank."))
    return LADMemory(centroids=unit(shapes["centroids"]), histograms=hist / hist.sum(dim=1, keepdim=True),
                     patch_bank=[unit(shapes[k]) for k in levels], n_fine=n_fine)


def structural_search(queries: list[Tensor], bank: list[Tensor], chunk: int) -> Tensor:
    """Eq. 3 for one image as ``CLIPLAD.score`` computes it: per level NN distance, mean, max."""
    per_level = [nearest_distance(q, mem.to(q), chunk) for q, mem in zip(queries, bank, strict=True)]
    return torch.stack(per_level).mean(dim=0).amax()


def bench_bank(bb: Backbone, cfg: LADConfig, n_fine: int, shots: list[int], chunk: int,
               warmup: int, iters: int, seed: int = 0) -> dict[str, Any]:
    """Bytes and search time of fitted-size banks for ``bb``, shot counts timed interleaved."""
    gen = torch.Generator().manual_seed(seed)
    levels = len(cfg.patch_stages)
    queries = [F.normalize(torch.randn(bb.patches, bb.width, generator=gen), dim=-1) for _ in range(levels)]
    rows: list[dict[str, Any]] = []
    fns: dict[str, Callable[[], object]] = {}
    for k in shots:
        mem = random_memory(memory_shapes(bb.grid, bb.width, cfg, k, n_fine), n_fine, gen)
        tensors = mem.tensors()
        nbytes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
        parts = {
            "centroids": nbytes["centroids"],
            "histograms": nbytes["histograms"],
            "patch_bank": sum(v for name, v in nbytes.items() if name.startswith("patch_bank.")),
            "n_fine": nbytes["n_fine"],  # int64 scalar, not halved by fp16
        }
        floats = parts["centroids"] + parts["histograms"] + parts["patch_bank"]
        m = k * bb.patches
        c = min(chunk, m)
        bank16 = [lv.half() for lv in mem.patch_bank]
        rows.append({
            "shots": k,
            "bank_rows_per_level": m,
            "bytes": parts,
            "total_bytes": floats + parts["n_fine"],
            "total_mib": (floats + parts["n_fine"]) / MIB,
            "fp16_total_bytes": floats // 2 + parts["n_fine"],
            "fp16_total_mib": (floats // 2 + parts["n_fine"]) / MIB,
            "fp16_saves_mib": floats / 2 / MIB,
            "chunk_cols": c,
            # nearest_distance's (Q, chunk) float32 distance block. `2 - 2 * (q @ b.T)` holds two
            # at once (operand and result), and from the second chunk on the previous d2 is still
            # bound while the next is computed: three (checked against VmHWM). Levels run in turn.
            "search_block_bytes": bb.patches * c * 4,
            "search_block_mib": bb.patches * c * 4 / MIB,
            "search_peak_blocks": 2 if m <= chunk else 3,
            "search_peak_extra_mib": (2 if m <= chunk else 3) * bb.patches * c * 4 / MIB,
        })
        fns[f"search_{k}"] = lambda mem=mem: structural_search(queries, mem.patch_bank, chunk)
        # CLIPLAD.score calls mem.to(q): an fp16 bank would be upcast whole on every frame
        fns[f"fp16_upcast_{k}"] = lambda b16=bank16: [lv.float() for lv in b16]
    with torch.inference_mode():
        times = time_interleaved(fns, warmup, iters)
    for row in rows:
        k = row["shots"]
        s = summarize(times[f"search_{k}"], 1)
        row["search_ms"] = s["median_s"] * 1000
        row["search_min_ms"] = s["min_s"] * 1000
        row["search_times_ms"] = [t * 1000 for t in s["times_s"]]
        row["fp16_upcast_ms"] = summarize(times[f"fp16_upcast_{k}"], 1)["median_s"] * 1000
    return {
        "backbone": bb.name,
        "image_size": bb.image_size,
        "grid": list(bb.grid),
        "patches": bb.patches,
        "width": bb.width,
        "levels": levels,
        "n_clusters": cfg.n_clusters,
        "centroid_dim": len(cfg.shallow_stages) * bb.width,
        "n_fine": n_fine,
        "chunk": chunk,
        "query_patches": bb.patches,
        "rows": rows,
    }


# --------------------------------------------------------------------------- report


def print_report(report: dict[str, Any]) -> None:
    fr = report["frame"]
    res, ratios, sav = fr["results"], fr["ratios"], fr["saving"]
    voc = fr["vocabulary"]
    print(
        f"\n{report['arch']} @ {fr['image_size'][0]}x{fr['image_size'][1]}, batch 1 (queue path), "
        f"{report['threads']} threads, random weights, fp32 CPU, torch {report['torch']}"
    )
    load = report["loadavg_start"][0], report["loadavg_end"][0]
    print(f"1-min load average {load[0]:.2f} -> {load[1]:.2f} on {report['cpu_count']} CPUs")
    print(f"bank: {fr['fit_shots']} shots, {voc['n_clusters']} clusters, vocabulary {report['category']} "
          f"({voc['coarse']} coarse, {voc['fine']} fine, {voc['templates']} templates), fitted untimed")
    print(f"{'variant':<14}{'ms/frame':>10}{'x bare':>9}   per-frame times (ms)")
    for name in VARIANTS:
        r = res[name]
        times = " ".join(f"{t * 1000:.0f}" for t in r["times_s"])
        print(f"{name:<14}{r['median_ms']:>10.1f}{ratios[name + '_over_bare']:>9.2f}   {times}")
    print(
        f"shared pass (SDP + logical, one backbone pass) saves {sav['shared_vs_separate_ms']:.1f} ms/frame "
        f"against two passes: {100 * sav['fraction_of_separate']:.1f} % of separate, "
        f"{sav['bare_forwards']:.2f} bare forwards (shared/separate {sav['shared_over_separate']:.2f}, "
        f"fastest frames {sav['shared_over_separate_min']:.2f}); logical on top of SDP "
        f"{sav['logical_on_top_of_sdp_ms']:.1f} ms shared vs {res['logical']['median_ms']:.1f} ms alone"
    )
    print(f"fitted bank shapes match the table's formula: {fr['memory_shapes_match_formula']}")

    for tab in report["banks"]:
        print(
            f"\nLADMemory fp32, {tab['backbone']}: grid {tab['grid'][0]}x{tab['grid'][1]} = {tab['patches']} "
            f"patches, width {tab['width']}, {tab['levels']} levels, centroids {tab['n_clusters']}x"
            f"{tab['centroid_dim']}, {tab['n_fine']} fine bins; search: one query image "
            f"({tab['query_patches']} patches x {tab['levels']} levels), chunk {tab['chunk']}"
        )
        print(f"{'shots':>5}{'rows/level':>11}{'centr KiB':>10}{'hist B':>8}{'bank MiB':>10}{'total MiB':>10}"
              f"{'fp16 MiB':>9}{'search ms':>10}{'QxC MiB':>8}{'peak MiB':>9}{'f16->32 ms':>11}")
        for r in tab["rows"]:
            b = r["bytes"]
            print(
                f"{r['shots']:>5}{r['bank_rows_per_level']:>11}{b['centroids'] / 1024:>10.1f}{b['histograms']:>8}"
                f"{b['patch_bank'] / MIB:>10.2f}{r['total_mib']:>10.2f}{r['fp16_total_mib']:>9.2f}"
                f"{r['search_ms']:>10.1f}{r['search_block_mib']:>8.1f}{r['search_peak_extra_mib']:>9.1f}"
                f"{r['fp16_upcast_ms']:>11.1f}"
            )
    print(
        "\nQxC: one (query patches x chunk) fp32 distance block; peak: the blocks nearest_distance holds at "
        "once, 2 with one chunk, 3 with more (the previous chunk's d2 is still bound).\nfp16 halves centroids, "
        "histograms and patch bank (n_fine stays 8 bytes); "
        "CLIPLAD.score would upcast an fp16 bank whole per frame (f16->32 ms, a transient fp32 copy)."
    )
    print(
        f"\nbare {res['bare']['median_ms']:.0f} ms | SDP {res['sdp']['median_ms']:.0f} ms | logical "
        f"{res['logical']['median_ms']:.0f} ms | shared {res['shared']['median_ms']:.0f} ms | separate "
        f"{res['separate']['median_ms']:.0f} ms | sharing saves {sav['shared_vs_separate_ms']:.0f} ms/frame "
        f"({100 * sav['fraction_of_separate']:.0f} %)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    report = report_header(args, shots=args.shots, category=args.category, chunk=args.chunk)
    content = load_lad_vocabulary(args.category)["content"]
    cfg = lad_config(content, {"nn_chunk": args.chunk})
    report["frame"] = bench_frame(args.arch, content, cfg, args.warmup, args.iters)
    print(f"per-frame part done in {time.perf_counter() - t0:.0f} s; bank tables next", file=sys.stderr)
    n_fine = report["frame"]["vocabulary"]["fine"]
    report["banks"] = [bench_bank(backbone(name, size), cfg, n_fine, args.shots, args.chunk,
                                  args.warmup, args.iters) for name, size in BANK_BACKBONES]
    finish_report(report, t0, args.json)
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
