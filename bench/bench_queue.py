"""Per-frame overhead of the queue path: submit -> RabbitMQ -> Celery worker -> result row.

Real RabbitMQ and PostgreSQL on this machine, an S3 server (moto) on loopback, one
``celery -A workers worker`` process, the tiny random model. Frames are submitted one at a
time (no queueing delay) and each latency is ``finished_at - submit start``. The worker
records the model's own time per frame (``model_ms``); overhead = latency - model time, so
the figure is what the system adds around the model.

    .venv/bin/python -m bench.bench_queue [--frames 200] [--warmup 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
from moto.server import ThreadedMotoServer
from tqdm import tqdm

from bench.common import ADMIN, BROKER, ROOT, random_pngs
from common.settings import Settings
from orchestrator.context import open_orchestrator
from storage import repo
from storage.db import ensure_schema


def frames(n: int, size: int = 128) -> list[bytes]:
    return random_pngs(n, size)


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "mean": float(a.mean())}


def run(n_frames: int, warmup: int) -> dict:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    db = f"inspect_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{db}"')
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    env = {
        "INSPECT_BROKER_URL": BROKER,
        "INSPECT_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}",
        "INSPECT_S3_ENDPOINT": f"{host}:{port}", "INSPECT_S3_ACCESS_KEY": "bench",
        "INSPECT_S3_SECRET_KEY": "bench", "INSPECT_S3_BUCKET": "bench", "INSPECT_S3_REGION": "us-east-1",
        "INSPECT_CLIP_MODEL": "inspect-tiny", "INSPECT_WEIGHTS": "random", "INSPECT_DEFAULT_QUEUE": queue,
    }
    ensure_schema(env["INSPECT_DATABASE_URL"])
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "celery"), "-A", "workers", "worker", "-Q", queue,
         "--concurrency", "1", "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env={**os.environ, **env}, start_new_session=True,
    )
    try:
        return measure(Settings(**{k.removeprefix("INSPECT_").lower(): v for k, v in env.items()}),
                       n_frames, warmup)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
        s3.stop()
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        from kombu import Connection

        with Connection(BROKER) as conn:
            conn.channel().queue_delete(queue)


def s3_round_trip(store, n: int = 50) -> dict[str, float]:
    """Latency of one small PUT and one GET on the same S3 server, for attributing overhead."""
    blob = frames(1)[0]
    put, get = [], []
    for i in range(n):
        t = time.perf_counter()
        store.put_bytes(f"bench/rt-{i}", blob)
        put.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        store.get_bytes(f"bench/rt-{i}")
        get.append((time.perf_counter() - t) * 1000)
    return {"put_p50": float(np.median(put)), "get_p50": float(np.median(get))}


def measure(settings: Settings, n_frames: int, warmup: int) -> dict:
    orch = open_orchestrator(settings)
    s3_rt = s3_round_trip(orch.store)
    data = frames(n_frames + warmup)
    latency, model, stages_ms, submits = [], [], [], []
    for i, frame in enumerate(tqdm(data, desc="frames", unit="frame")):
        t0 = datetime.now(UTC)
        t_sub = time.perf_counter()
        sub = orch.intake.submit(frame, line="bench", category="pcb1")
        submit_ms = (time.perf_counter() - t_sub) * 1000
        done = orch.intake.wait([sub.inspection_id], timeout=120, poll=0.02)
        insp = done[sub.inspection_id]
        if insp.status.value != "done":
            raise RuntimeError(f"frame {i} failed: {insp.reason}")
        if i < warmup:  # model load and text features happen on the first frame
            continue
        with orch.sessions() as s:
            runs = repo.get_inspection(s, sub.inspection_id).stage_runs
            seg = next(r for r in runs if r.stage == "segment")
            latency.append((insp.finished_at - t0).total_seconds() * 1000)
            model.append(seg.output["model_ms"])
            stages_ms.append(sum(r.duration_ms or 0 for r in runs))
            submits.append(submit_ms)
    overhead = [lat - m for lat, m in zip(latency, model, strict=True)]
    return {"frames": n_frames, "latency_ms": percentiles(latency), "model_ms": percentiles(model),
            "stage_bodies_ms": percentiles(stages_ms), "submit_ms": percentiles(submits),
            "overhead_ms": percentiles(overhead), "s3_ms": s3_rt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    res = run(args.frames, args.warmup)
    for k in ("latency_ms", "submit_ms", "model_ms", "stage_bodies_ms", "overhead_ms"):
        v = res[k]
        print(f"{k:>16}: p50 {v['p50']:8.1f}  p95 {v['p95']:8.1f}  mean {v['mean']:8.1f}")
    print(f"queue-path overhead above model time: p50 {res['overhead_ms']['p50']:.1f} ms "
          f"(goal <= 10 ms), p95 {res['overhead_ms']['p95']:.1f} ms over {res['frames']} frames")
    s3 = res["s3_ms"]
    print(f"S3 server round trip (same run): PUT p50 {s3['put_p50']:.1f} ms, GET p50 {s3['get_p50']:.1f} ms; "
          "a frame makes 2 PUTs + 1 GET in the worker and 1 PUT at submit")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
