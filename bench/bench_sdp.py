"""SDP speed against a bare CLIP image forward, and anomalib WinCLIP zero-shot as a peer.

One process, one random-weights model (``load_clip(arch, "random")``), fp32 on CPU, under
``torch.inference_mode``. Variants are timed interleaved (bare, SDP, encoder, bare, ...) after
warm-up rounds; each reports its median seconds per batch. The WinCLIP peer runs afterwards in
a separate interpreter with anomalib installed (``bench/winclip_probe.py``), never in the
project's venv; it times its own bare forward too, so its ratio is measured within one process.

    .venv/bin/python -m bench.bench_sdp [--arch ViT-B-16-plus-240] [--batch 4] [--iters 5]
        [--warmup 1] [--threads 2] [--anomalib-python PATH] [--no-winclip] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import finish_report, report_header
from bench.winclip_probe import summarize, time_interleaved
from workers.models.clip_surgery import SDP
from workers.weights import load_clip

DEFAULT_ARCH = "ViT-B-16-plus-240"  # anomalib WinCLIP's backbone
DEFAULT_ANOMALIB_PYTHON = Path("/work/bench-venv/bin/python")
PROBE = Path(__file__).with_name("winclip_probe.py")
SDP_GOAL = 1.3  # SDP may cost at most this many bare forwards per image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=DEFAULT_ARCH)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=5, help="timed rounds per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, both processes")
    p.add_argument(
        "--anomalib-python",
        type=Path,
        default=None,
        help=f"interpreter with anomalib (default {DEFAULT_ANOMALIB_PYTHON} if present)",
    )
    p.add_argument(
        "--winclip-iters", type=int, default=3, help="timed WinCLIP rounds (~10x slower than a bare forward)"
    )
    p.add_argument("--winclip-timeout", type=float, default=900.0, help="seconds for the probe")
    p.add_argument("--class-name", default="pcb1", help="WinCLIP prompt class name")
    p.add_argument("--no-winclip", action="store_true", help="skip the anomalib WinCLIP probe")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    args = p.parse_args(argv)
    if min(args.batch, args.iters, args.winclip_iters, args.threads) < 1 or args.warmup < 0:
        p.error("--batch, --iters, --winclip-iters and --threads must be >= 1, --warmup >= 0")
    return args


def bench_sdp(arch: str, batch: int, warmup: int, iters: int) -> dict[str, Any]:
    """Bare encode_image, full SDP and the SDP encoder alone, timed interleaved."""
    clip = load_clip(arch, "random")
    model = clip.model
    sdp = SDP(model.visual).eval()
    h, w = sdp.image_size
    embed_dim = int(model.visual.proj.shape[1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, h, w, generator=g)  # stands in for normalised images
    text = F.normalize(torch.randn(embed_dim, 2, generator=g), dim=0)  # (E, 2) normal/abnormal
    fns = {
        "bare": lambda: model.encode_image(x),
        "sdp": lambda: sdp(x, text),  # encoder + surgery + upsampling + Gaussian smoothing
        "sdp_encoder": lambda: sdp.encoder(x),
    }
    with torch.inference_mode():
        times = time_interleaved(fns, warmup, iters)
    res = {name: summarize(t, batch) for name, t in times.items()}
    bare_s = res["bare"]["median_s"]
    return {
        "image_size": [h, w],
        "results": res,
        "ratios": {
            "sdp_over_bare": res["sdp"]["median_s"] / bare_s,  # bare forwards per image
            "sdp_encoder_over_bare": res["sdp_encoder"]["median_s"] / bare_s,
            "sdp_head_over_bare": (res["sdp"]["median_s"] - res["sdp_encoder"]["median_s"]) / bare_s,
            "sdp_over_bare_min": res["sdp"]["min_s"] / res["bare"]["min_s"],  # fastest batches
        },
    }


def run_winclip_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Run the probe in the anomalib interpreter; ``{"skipped": reason}`` when it cannot."""
    if args.no_winclip:
        return {"skipped": "--no-winclip"}
    if args.arch != DEFAULT_ARCH:
        return {"skipped": f"WinCLIP probe runs on {DEFAULT_ARCH} only (anomalib's backbone)"}
    python = args.anomalib_python or DEFAULT_ANOMALIB_PYTHON
    if not python.exists():
        return {"skipped": f"anomalib not available: no interpreter at {python} (see bench/README.md)"}
    cmd = [
        str(python),
        "-W",
        "ignore",
        str(PROBE),
        "--arch",
        args.arch,
        "--batch",
        str(args.batch),
        "--iters",
        str(args.winclip_iters),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--class-name",
        args.class_name,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ""}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.winclip_timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"anomalib WinCLIP probe timed out after {args.winclip_timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"skipped": f"anomalib not available: probe exited {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def print_report(report: dict[str, Any]) -> None:
    sdp = report["sdp"]
    res, ratios = sdp["results"], sdp["ratios"]
    batch = report["batch"]
    print(
        f"\n{report['arch']} @ {sdp['image_size'][0]}x{sdp['image_size'][1]}, batch {batch}, "
        f"{report['threads']} threads, random weights, fp32 CPU, torch {report['torch']}"
    )
    load = report["loadavg_start"][0], report["loadavg_end"][0]
    print(f"1-min load average {load[0]:.2f} -> {load[1]:.2f} on {report['cpu_count']} CPUs")
    print(f"{'variant':<14}{'s/batch':>10}{'img/s':>9}{'x bare':>9}   per-batch times (s)")
    bare_s = res["bare"]["median_s"]
    for name, r in res.items():
        times = " ".join(f"{t:.3g}" for t in r["times_s"])
        print(
            f"{name:<14}{r['median_s']:>10.3f}{r['images_per_s']:>9.2f}"
            f"{r['median_s'] / bare_s:>9.2f}   {times}"
        )
    verdict = "meets" if ratios["sdp_over_bare"] <= SDP_GOAL else "misses"
    print(
        f"SDP / bare time ratio {ratios['sdp_over_bare']:.2f} ({verdict} goal <= {SDP_GOAL}); "
        f"encoder {ratios['sdp_encoder_over_bare']:.2f}, maps+smoothing "
        f"{ratios['sdp_head_over_bare']:.2f} bare forwards; fastest-batch ratio "
        f"{ratios['sdp_over_bare_min']:.2f}"
    )
    win = report["winclip"]
    if "skipped" in win:
        print(f"WinCLIP: skipped: {win['skipped']}")
        win_text = "WinCLIP skipped"
    else:
        wr = win["winclip"]["images_per_s"]
        print(
            f"WinCLIP (anomalib {win['versions']['anomalib']}, open_clip_torch "
            f"{win['versions']['open_clip_torch']}, separate process): {wr:.3f} img/s, "
            f"own bare {win['bare']['images_per_s']:.2f} img/s, "
            f"WinCLIP/bare {win['winclip_over_bare']:.1f}x in-process, "
            f"{report['winclip_over_this_bare']:.1f}x this process's bare; "
            f"windows per scale {win['windows']}"
        )
        win_text = f"WinCLIP {wr:.3f} img/s ({win['winclip_over_bare']:.1f}x bare)"
    print(
        f"\nbare {res['bare']['images_per_s']:.2f} img/s | SDP {res['sdp']['images_per_s']:.2f} "
        f"img/s | SDP/bare time ratio {ratios['sdp_over_bare']:.2f} | {win_text}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    report = report_header(args, batch=args.batch)
    report["sdp"] = bench_sdp(args.arch, args.batch, args.warmup, args.iters)
    report["ratios"] = report["sdp"]["ratios"]  # top-level copy for quick lookups
    print(f"SDP part done in {time.perf_counter() - t0:.0f} s; WinCLIP probe next", file=sys.stderr)
    report["winclip"] = run_winclip_probe(args)  # sequential: never competes for the cores
    if "skipped" not in report["winclip"]:
        report["winclip_over_this_bare"] = (
            report["winclip"]["winclip"]["median_s"] / report["sdp"]["results"]["bare"]["median_s"]
        )
    finish_report(report, t0, args.json)
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
