"""What every benchmark report starts and ends with: the run's settings, versions and machine load."""

from __future__ import annotations

import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The machine's services for the queue-path benchmarks (loopback only).
ADMIN = os.environ.get("INSPECT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BROKER = os.environ.get("INSPECT_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def random_pngs(n: int, size: int) -> list[bytes]:
    """n seeded random RGB frames as PNG bytes."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def report_header(args: Any, **extra: Any) -> dict[str, Any]:
    """Settings, versions and the load average at the start (other work on the cores skews every number)."""
    return {
        "arch": args.arch, "threads": torch.get_num_threads(), "iters": args.iters, "warmup": args.warmup,
        **extra, "weights": "random", "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
    }


def finish_report(report: dict[str, Any], t0: float, json_path: Path | None) -> None:
    report["total_s"] = time.perf_counter() - t0
    report["loadavg_end"] = os.getloadavg()
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
