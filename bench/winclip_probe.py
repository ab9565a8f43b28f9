"""anomalib WinCLIP zero-shot speed probe, run by ``bench.bench_sdp`` in a separate interpreter.

Runs under an environment with anomalib installed (never the project's venv), e.g.
``/work/bench-venv/bin/python bench/winclip_probe.py --batch 4``. It builds anomalib's
``WinClipModel`` zero-shot with random weights (module constant ``PRETRAINED`` set to None),
times WinCLIP and a bare ``clip.encode_image`` of the same model interleaved, and prints one
JSON object on stdout. Only torch is imported at module level: ``bench.bench_sdp`` reuses
:func:`time_interleaved` from here without anomalib.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, iters: int) -> dict[str, list[float]]:
    """Per-call seconds of each variant, run A, B, A, B, ... after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: list[float], batch: int) -> dict[str, Any]:
    """Median seconds per batch, the images/s it implies, and the fastest batch (less load-prone)."""
    med = statistics.median(times)
    return {"median_s": med, "images_per_s": batch / med, "min_s": min(times), "times_s": times}


def build_winclip(arch: str, class_name: str, seed: int) -> torch.nn.Module:
    """anomalib's zero-shot WinClipModel on ``arch`` with seeded random weights."""
    from anomalib.models.image.winclip import torch_model

    if not hasattr(torch_model, "PRETRAINED") or not hasattr(torch_model, "BACKBONE"):
        raise RuntimeError("anomalib's winclip torch_model has no PRETRAINED/BACKBONE constants")
    torch_model.PRETRAINED = None  # random init instead of downloading laion400m_e31
    torch_model.BACKBONE = arch
    torch.manual_seed(seed)
    return torch_model.WinClipModel(class_name=class_name).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-16-plus-240")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--class-name", default="pcb1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_winclip(args.arch, args.class_name, args.seed)
    build_s = time.perf_counter() - t0
    size = model.clip.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(args.seed + 1))

    fns: dict[str, Callable[[], object]] = {
        "bare": lambda: model.clip.encode_image(x),
        "winclip": lambda: model(x),
    }
    with torch.inference_mode():
        # The first round is always run and checked; it counts as one warm-up round.
        fns["bare"]()
        out = model(x)
        if tuple(out.anomaly_map.shape) != (args.batch, h, w):
            raise RuntimeError(f"unexpected WinCLIP map shape {tuple(out.anomaly_map.shape)}")
        times = time_interleaved(fns, max(args.warmup - 1, 0), args.iters)
    bare = summarize(times["bare"], args.batch)
    win = summarize(times["winclip"], args.batch)
    result = {
        "arch": args.arch,
        "batch": args.batch,
        "image_size": [h, w],
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "warmup": args.warmup,
        "class_name": args.class_name,
        "weights": "random",
        "versions": {
            "anomalib": version("anomalib"),
            "open_clip_torch": version("open_clip_torch"),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "windows": [int(m.shape[1]) for m in model.masks],  # sliding windows per scale
        "build_s": build_s,
        "bare": bare,
        "winclip": win,
        "winclip_over_bare": win["median_s"] / bare["median_s"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
