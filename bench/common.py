"""What every benchmark report starts and ends with: the run's settings, versions and machine load."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


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
