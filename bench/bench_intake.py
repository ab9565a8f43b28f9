"""The MES intake under load: frames published at increasing rates, result events counted.

Real RabbitMQ and PostgreSQL, an S3 server (moto) on loopback, one ``inspect ingest`` and one
``celery -A workers worker`` (tiny random model). Each rate runs for ``--duration`` seconds; the
script then waits for the backlog to drain and reports, per rate: frames published, result events
received (distinct and repeated), sustained frames/s (events over the span from first publish to
last event), and end-to-end latency publish -> result event p50 / p99.

    .venv/bin/python -m bench.bench_intake [--rates 5,10,20] [--duration 60] [--json OUT]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
from kombu import Connection, Exchange, Queue
from moto.server import ThreadedMotoServer

from bench.common import ADMIN, BROKER, ROOT, random_pngs
from orchestrator.mes_schema import build_envelope
from storage.db import ensure_schema


def frame_bytes(n: int, size: int = 96) -> list[bytes]:
    return random_pngs(n, size)


class Events(threading.Thread):
    """Collects result events (id -> receive times) on a private queue bound to the bench's line."""

    def __init__(self, line: str):
        super().__init__(daemon=True)
        self.queue = Queue(f"bench-events-{uuid.uuid4().hex[:6]}", Exchange("results", "topic", durable=True),
                           routing_key=f"line.{line}.#", auto_delete=True)
        self.seen: dict[str, list[float]] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with Connection(BROKER) as conn:
            def on_message(body, message) -> None:
                self.seen.setdefault(body["id"], []).append(time.time())
                message.ack()

            with conn.Consumer(self.queue, callbacks=[on_message], accept=["json"]):
                self.ready.set()
                while not self.stop.is_set():
                    try:
                        conn.drain_events(timeout=0.5)
                    except TimeoutError:
                        continue


def run_rate(rate: float, duration: float, env: dict[str, str], line: str, images: list[bytes],
             events: Events, sent_at: dict[str, float]) -> dict:
    exchange = Exchange(env["INSPECT_MES_EXCHANGE"], "topic", durable=True)
    ids: list[str] = []
    with Connection(BROKER, transport_options={"confirm_publish": True}) as conn:
        producer = conn.Producer()
        t0 = time.time()
        i = 0
        while time.time() - t0 < duration:
            due = t0 + i / rate
            if (wait := due - time.time()) > 0:
                time.sleep(wait)
            data = images[i % len(images)]
            fid = f"bench-{uuid.uuid4().hex}"
            env_ = build_envelope(frame_id=fid, source="bench://camera", line=line, station="1", category="pcb1",
                                  serial=f"S{i}", time=datetime.now(UTC).isoformat(),
                                  image={"inline": base64.b64encode(data).decode(),
                                         "sha256": hashlib.sha256(data).hexdigest()})
            sent_at[fid] = time.time()
            producer.publish(json.dumps(env_), exchange=exchange, routing_key=f"line.{line}.1",
                             content_type="application/json", content_encoding="utf-8", delivery_mode=2)
            ids.append(fid)
            i += 1
    return {"rate": rate, "published": len(ids), "frame_ids": ids, "publish_span_s": time.time() - t0}


def summarise(run: dict, inspection_of: dict[str, str], events: Events, sent_at: dict[str, float]) -> dict:
    lat, last, dup, lost = [], 0.0, 0, 0
    for fid in run["frame_ids"]:
        iid = inspection_of.get(fid)
        times = events.seen.get(iid or "", [])
        if not times:
            lost += 1
            continue
        dup += len(times) - 1
        lat.append((times[0] - sent_at[fid]) * 1000)
        last = max(last, times[0])
    first = min(sent_at[f] for f in run["frame_ids"])
    done = len(lat)
    return {"rate": run["rate"], "published": run["published"], "events": done, "repeated_events": dup,
            "lost": lost, "sustained_fps": done / max(last - first, 1e-9) if done else 0.0,
            "latency_p50_ms": float(np.percentile(lat, 50)) if lat else None,
            "latency_p99_ms": float(np.percentile(lat, 99)) if lat else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="5,10,20")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    db = f"inspect_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{db}"')
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    tag = uuid.uuid4().hex[:6]
    line = f"B{tag}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("INSPECT_")},
           "INSPECT_BROKER_URL": BROKER, "INSPECT_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}",
           "INSPECT_S3_ENDPOINT": f"{host}:{port}", "INSPECT_S3_ACCESS_KEY": "bench", "INSPECT_S3_SECRET_KEY": "bench",
           "INSPECT_S3_BUCKET": "bench", "INSPECT_S3_REGION": "us-east-1", "INSPECT_CLIP_MODEL": "inspect-tiny",
           "INSPECT_WEIGHTS": "random", "INSPECT_DEFAULT_QUEUE": f"bench-gpu-{tag}",
           "INSPECT_MES_EXCHANGE": f"bench-frames-{tag}", "INSPECT_MES_INTAKE_QUEUE": f"bench-intake-{tag}",
           "INSPECT_MES_DEAD_LETTER_EXCHANGE": f"bench-frames-dlx-{tag}", "INSPECT_MES_DEAD_QUEUE": f"bench-dead-{tag}"}
    ensure_schema(env["INSPECT_DATABASE_URL"])
    cli = [str(Path(sys.executable).parent / "inspect")]
    for cmd in (["mes", "add-line", line], ["category", "add", "pcb1"]):
        subprocess.run([*cli, *cmd], env=env, cwd=ROOT, check=True, capture_output=True)
    procs = [subprocess.Popen([*cli, "ingest", "--quiet"], env=env, cwd=ROOT, start_new_session=True),
             subprocess.Popen([str(Path(sys.executable).parent / "celery"), "-A", "workers", "worker", "-Q",
                               env["INSPECT_DEFAULT_QUEUE"], "--concurrency", "1", "--loglevel", "WARNING",
                               "--without-gossip", "--without-mingle"], env=env, cwd=ROOT, start_new_session=True)]
    events = Events(line)
    events.start()
    events.ready.wait(30)
    images = frame_bytes(50)
    sent_at: dict[str, float] = {}
    results = []
    try:
        time.sleep(5)  # worker and intake start; the first frame also loads the model
        for rate in (float(r) for r in args.rates.split(",")):
            run = run_rate(rate, args.duration, env, line, images, events, sent_at)
            deadline = time.time() + args.drain_timeout
            inspection_of = {}
            while time.time() < deadline:
                with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{db}") as c:
                    inspection_of = dict(c.execute("select frame_id, id from inspections where frame_id = any(%s)",
                                                   (run["frame_ids"],)).fetchall())
                if sum(1 for f in run["frame_ids"] if events.seen.get(inspection_of.get(f, ""))) >= run["published"]:
                    break
                time.sleep(1)
            time.sleep(2)  # repeats, if any, arrive right behind
            row = summarise(run, inspection_of, events, sent_at)
            results.append(row)
            print(f"rate {rate:5.1f}/s: published {row['published']}, events {row['events']} "
                  f"(lost {row['lost']}, repeated {row['repeated_events']}), sustained {row['sustained_fps']:.1f} "
                  f"frames/s, latency p50 {row['latency_p50_ms'] or float('nan'):.0f} ms "
                  f"p99 {row['latency_p99_ms'] or float('nan'):.0f} ms", flush=True)
    finally:
        events.stop.set()
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        with Connection(BROKER) as conn:
            ch = conn.default_channel
            for q in (env["INSPECT_DEFAULT_QUEUE"], env["INSPECT_MES_INTAKE_QUEUE"], env["INSPECT_MES_DEAD_QUEUE"]):
                ch.queue_delete(q)
            for ex in (env["INSPECT_MES_EXCHANGE"], env["INSPECT_MES_DEAD_LETTER_EXCHANGE"]):
                ch.exchange_delete(ex)
        s3.stop()
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
