"""FiLo scoring cost per frame against SDP, plus Grounding DINO as HQ-Loc's localize cost.

One process, random weights everywhere (``load_clip(arch, "random")``; FiLoHead randomly
initialised and run with ``allow_untrained=True``: this measures cost, not quality), fp32 on CPU
under ``torch.inference_mode``. Variants run interleaved (A, B, C, A, B, C, ...) after warm-up
rounds; each reports its median seconds per batch:

- ``bare``: ``model.encode_image(x)``;
- ``sdp``: ``SDP(model.visual)(x, text)`` (what the segment engine runs per frame);
- ``filo``: a ``StagedDualPathViT`` pass + ``FiLoHead`` (7 heads: 4 Linear, 3 MMCI);
- ``filo_head``: ``FiLoHead`` alone on a precomputed pass (fused MMCI kernel, the default);
- ``filo_head_unfused``: the same with MMCI's six conv branches run separately;
- ``sdp_plus_filo``: SDP with ``return_features=True`` and FiLoHead on that pass (one backbone
  pass for both scorers);
- ``localize_tiny``: ``workers.grounding``'s tiny random Grounding DINO, a full ``detect`` call
  (processor, model, post-processing) on one uint8 frame, when ``workers.grounding`` imports;
- ``localize_swin_t``: the same pipeline with a Grounding DINO built from transformers'
  default ``GroundingDinoConfig`` (Swin-T backbone, BERT-base text encoder, 6+6 layers, 900
  queries: the grounding-dino-tiny architecture, 172 M parameters) with random weights, offline
  (``use_pretrained_backbone=False``), the frame resized to ``--gdino-size`` (FiLo: 518).
  The caption is ``hqloc.build_caption`` of sample phrases; its tokenizer is a word-level BERT
  vocabulary written for the caption, so the token count is close to the real tokenizer's.

    .venv/bin/python -m bench.bench_filo [--arch ViT-B-16-plus-240] [--batch 1] [--iters 5]
        [--warmup 1] [--threads 2] [--gdino-size 518] [--no-localize] [--no-swin-t] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import finish_report, report_header
from bench.winclip_probe import summarize, time_interleaved
from workers.models.clip_surgery import SDP
from workers.models.filo import FiLoHead, encode_filo_text
from workers.weights import load_clip

DEFAULT_ARCH = "ViT-B-16-plus-240"
CLASS_NAME = "pcb"
TINY_GDINO_EDGE = 128
# Sample defect phrases (written for this benchmark; any category's LLM phrases would do).
PHRASES = [
    "solder bridge between pins",
    "scratched copper trace",
    "missing component",
    "burn mark",
    "bent pin",
    "discoloration",
    "lifted pad",
    "excess solder residue",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=DEFAULT_ARCH)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5, help="timed rounds per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--gdino-size", type=int, default=518, help="Grounding DINO shortest edge (FiLo: 518)")
    p.add_argument("--no-localize", action="store_true", help="skip every Grounding DINO variant")
    p.add_argument("--no-swin-t", action="store_true", help="skip the Swin-T-sized Grounding DINO")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    args = p.parse_args(argv)
    if min(args.batch, args.iters, args.threads, args.gdino_size) < 1 or args.warmup < 0:
        p.error("--batch, --iters, --threads and --gdino-size must be >= 1, --warmup >= 0")
    return args


def _grounding_module() -> tuple[Any | None, str]:
    try:
        return importlib.import_module("workers.grounding"), ""
    except ImportError as exc:
        return None, f"workers.grounding not importable: {exc}"


def _caption() -> str:
    from workers.models.hqloc import build_caption

    return build_caption(PHRASES)


def _swin_t_grounding(grounding: Any, caption: str, size: int, workdir: Path) -> Any:
    """transformers' default Grounding DINO config (Swin-T + BERT-base) with random weights."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    words = sorted({w for w in caption.split() if w != "."})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]
    (workdir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(workdir)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": size, "longest_edge": 1333})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GroundingDinoForObjectDetection(GroundingDinoConfig(use_pretrained_backbone=False)).eval()
    return grounding.GroundingModel(model, processor, "random-swin-t", "cpu")


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _ratios(t: dict[str, float]) -> dict[str, float]:
    """Time ratios from per-variant seconds (medians or minima)."""
    ratios = {
        "filo_over_sdp": t["filo"] / t["sdp"],
        "filo_over_bare": t["filo"] / t["bare"],
        "sdp_over_bare": t["sdp"] / t["bare"],
        "filo_head_over_sdp": t["filo_head"] / t["sdp"],
        "filo_head_unfused_over_fused": t["filo_head_unfused"] / t["filo_head"],
        "sdp_plus_filo_over_sdp": t["sdp_plus_filo"] / t["sdp"],
    }
    for name in ("localize_tiny", "localize_swin_t"):
        if name in t:
            ratios[f"{name}_over_sdp"] = t[name] / t["sdp"]
            # a FiLo frame = localize (box -> position word) + backbone pass + FiLo head
            ratios[f"filo_with_{name}_over_sdp"] = (t[name] + t["filo"]) / t["sdp"]
    return ratios


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    clip = load_clip(args.arch, "random")
    model = clip.model
    sdp = SDP(model.visual).eval()
    head = FiLoHead.for_visual(model.visual).eval()
    h, w = sdp.image_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, h, w, generator=g)  # stands in for normalised images
    embed_dim = int(model.visual.proj.shape[1])
    sdp_text = F.normalize(torch.randn(embed_dim, 2, generator=g), dim=0)
    # FiLo text pair for one position (cached per class and position in production: not timed)
    filo_text = encode_filo_text(model.encode_text, clip.tokenizer, CLASS_NAME, PHRASES, "center")
    with torch.inference_mode():
        feats = sdp.encoder(x)

    unfused = FiLoHead.for_visual(model.visual, fuse_mmci=False).eval()
    unfused.load_state_dict(head.state_dict())  # same weights; flag stays untrained

    def sdp_plus_filo() -> object:
        out = sdp(x, sdp_text, return_features=True)
        return head(out.features, filo_text, allow_untrained=True)

    fns: dict[str, Callable[[], object]] = {
        "bare": lambda: model.encode_image(x),
        "sdp": lambda: sdp(x, sdp_text),
        "filo": lambda: head(sdp.encoder(x), filo_text, allow_untrained=True),
        "filo_head": lambda: head(feats, filo_text, allow_untrained=True),
        "filo_head_unfused": lambda: unfused(feats, filo_text, allow_untrained=True),
        "sdp_plus_filo": sdp_plus_filo,
    }
    localize: dict[str, Any] = {}
    grounding, reason = (None, "--no-localize") if args.no_localize else _grounding_module()
    if grounding is None:
        localize["skipped"] = reason
    else:
        caption = _caption()
        rng = np.random.default_rng(0)
        frame = rng.integers(0, 256, (args.gdino_size, args.gdino_size, 3), dtype=np.uint8)
        frames = [frame] * args.batch
        # shortest edge 128: at the tiny processor's 64 a square frame leaves a 1x1 top level whose
        # GroupNorm (32 channels, 32 groups) refuses a single value per group
        tiny_dir = grounding.tiny_random_grounding(workdir / "gdino-tiny")
        tiny = grounding.load_grounding(str(tiny_dir), shortest_edge=TINY_GDINO_EDGE)
        detect_kw = {"box_threshold": 0.0, "text_threshold": 0.25}
        fns["localize_tiny"] = lambda: tiny.detect(frames, caption, **detect_kw)
        localize["caption"] = caption
        localize["tiny_params"] = _n_params(tiny.model)
        if args.no_swin_t:
            localize["swin_t_skipped"] = "--no-swin-t"
        else:
            swin = _swin_t_grounding(grounding, caption, args.gdino_size, workdir)
            fns["localize_swin_t"] = lambda: swin.detect(frames, caption, **detect_kw)
            localize["swin_t_params"] = _n_params(swin.model)
            ids = swin.processor(text=caption, return_tensors="pt")["input_ids"]
            localize["swin_t_caption_tokens"] = int(ids.shape[1])
        localize["frame"] = [args.gdino_size, args.gdino_size]

    with torch.inference_mode():
        times = time_interleaved(fns, args.warmup, args.iters)
    res = {name: summarize(t, args.batch) for name, t in times.items()}
    ratios = _ratios({name: r["median_s"] for name, r in res.items()})
    # fastest batch of each variant: less sensitive to other work on the cores than the median
    ratios_min = _ratios({name: r["min_s"] for name, r in res.items()})
    return {
        "image_size": [h, w],
        "head_params": _n_params(head),
        "n_heads": head.n_heads,
        "results": res,
        "ratios": ratios,
        "ratios_min": ratios_min,
        "localize": localize,
    }


def print_report(report: dict[str, Any]) -> None:
    r = report["filo"]
    res, ratios = r["results"], r["ratios"]
    print(
        f"\n{report['arch']} @ {r['image_size'][0]}x{r['image_size'][1]}, batch {report['batch']}, "
        f"{report['threads']} threads, random weights, fp32 CPU, torch {report['torch']}; "
        f"FiLoHead {r['n_heads']} heads, {r['head_params'] / 1e6:.1f} M params (untrained, cost only)"
    )
    load = report["loadavg_start"][0], report["loadavg_end"][0]
    print(f"1-min load average {load[0]:.2f} -> {load[1]:.2f} on {report['cpu_count']} CPUs")
    print(f"{'variant':<20}{'ms/batch':>10}{'img/s':>9}{'x sdp':>8}   per-batch times (ms)")
    sdp_s = res["sdp"]["median_s"]
    for name, v in res.items():
        times = " ".join(f"{1000 * t:.1f}" for t in v["times_s"])
        ms, ips, rel = 1000 * v["median_s"], v["images_per_s"], v["median_s"] / sdp_s
        print(f"{name:<20}{ms:>10.1f}{ips:>9.2f}{rel:>8.2f}   {times}")
    loc = r["localize"]
    if "skipped" in loc:
        print(f"localize: skipped: {loc['skipped']}")
    else:
        extra = f"Swin-T-sized {loc['swin_t_params'] / 1e6:.0f} M params, " if "swin_t_params" in loc else ""
        print(
            f"localize: Grounding DINO on a {loc['frame'][0]}x{loc['frame'][1]} frame, {extra}"
            f"tiny {loc['tiny_params'] / 1e3:.0f} k params at {TINY_GDINO_EDGE} px; caption {loc['caption']!r}"
        )
    summary = (
        f"\nSDP {res['sdp']['images_per_s']:.2f} img/s | FiLo scoring {res['filo']['images_per_s']:.2f} img/s "
        f"({ratios['filo_over_sdp']:.2f}x SDP time) | FiLo head alone {ratios['filo_head_over_sdp']:.2f}x SDP "
        f"| SDP+FiLo shared pass {ratios['sdp_plus_filo_over_sdp']:.2f}x SDP "
        f"| unfused/fused MMCI head {ratios['filo_head_unfused_over_fused']:.2f}"
    )
    for name in ("localize_tiny", "localize_swin_t"):
        if name in res:
            summary += (
                f"\n{name}: {res[name]['images_per_s']:.3f} img/s ({ratios[f'{name}_over_sdp']:.2f}x SDP); "
                f"FiLo frame incl. {name}: {ratios[f'filo_with_{name}_over_sdp']:.2f}x SDP"
            )
    print(summary)
    rm = r["ratios_min"]
    line = (
        f"fastest-batch ratios: FiLo/SDP {rm['filo_over_sdp']:.2f}, head/SDP {rm['filo_head_over_sdp']:.2f}, "
        f"SDP+FiLo/SDP {rm['sdp_plus_filo_over_sdp']:.2f}, unfused/fused {rm['filo_head_unfused_over_fused']:.2f}"
    )
    for name in ("localize_tiny", "localize_swin_t"):
        if f"{name}_over_sdp" in rm:
            line += f", {name}/SDP {rm[f'{name}_over_sdp']:.2f}"
    print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    report = report_header(args, batch=args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        report["filo"] = bench(args, Path(tmp))
    report["ratios"] = report["filo"]["ratios"]
    finish_report(report, t0, args.json)
    print_report(report)
    print(f"done in {report['total_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
