"""Faults with real processes: a SIGKILLed worker, a RabbitMQ restart, PostgreSQL and S3 outages.

Every frame must end in exactly one terminal state (done, or failed with a reason) and exactly one
result event, with retries and redelivery doing the work. Loopback only; bounded in time.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from faultproxy import FaultProxy
from kombu import Connection, Exchange, Queue
from PIL import Image
from sqlalchemy.engine import make_url

from common.settings import Settings
from orchestrator.context import open_orchestrator
from storage import repo
from storage.orm import InspectionStatus

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Stack:
    """One worker process behind optional fault proxies, an orchestrator in this process, a results listener."""

    def __init__(self, tmp: Path, pg_url: str, s3: str, creds: dict[str, str]):
        self.tmp = tmp
        self.queue = f"fault-{uuid.uuid4().hex[:6]}"
        self.line = f"F{uuid.uuid4().hex[:6]}"
        url = make_url(pg_url)
        self.pg_proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
        host, port = s3.split(":")
        self.s3_proxy = FaultProxy(host, int(port))
        base = {"broker_url": BROKER, "s3_access_key": creds["access_key"], "s3_secret_key": creds["secret_key"],
                "s3_bucket": f"fault-{uuid.uuid4().hex[:8]}", "s3_region": "us-east-1", "clip_model": "inspect-tiny",
                "weights": "random", "default_queue": self.queue, "data_dir": tmp / "data"}
        self.orch = open_orchestrator(Settings(database_url=pg_url, s3_endpoint=s3, **base))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECT_")}
        self.env.update({f"INSPECT_{k.upper()}": str(v) for k, v in base.items()})
        self.env["INSPECT_DATABASE_URL"] = url.set(port=self.pg_proxy.port).render_as_string(hide_password=False)
        self.env["INSPECT_S3_ENDPOINT"] = f"127.0.0.1:{self.s3_proxy.port}"
        self.events = Queue(f"fault-events-{uuid.uuid4().hex[:6]}", Exchange("results", "topic", durable=True),
                            routing_key=f"line.{self.line}.#", durable=True)  # survives a broker restart
        with Connection(BROKER) as c:
            self.events(c.default_channel).declare()
        self.worker: subprocess.Popen | None = None
        self.starts = 0

    def start_worker(self) -> None:
        self.starts += 1
        log = (self.tmp / f"worker{self.starts}.log").open("w")
        self.worker = subprocess.Popen(
            [str(Path(sys.executable).parent / "celery"), "-A", "workers", "worker", "-Q", self.queue,
             "--concurrency", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_worker(self, sig: int = signal.SIGKILL) -> None:
        if self.worker and self.worker.poll() is None:
            os.killpg(self.worker.pid, sig)
            self.worker.wait(30)

    def submit(self, n: int) -> list[str]:
        return [self.orch.intake.submit(_png(i), line=self.line, station="1", category="pcb1",
                                        serial=f"S{i}").inspection_id for i in range(n)]

    def states(self, ids: list[str]) -> dict[str, tuple[str, str | None]]:
        with self.orch.sessions() as s:
            return {i: (repo.get_inspection(s, i).status.value, repo.get_inspection(s, i).reason) for i in ids}

    def terminal(self, ids: list[str]) -> int:
        return sum(st in ("done", "failed") for st, _ in self.states(ids).values())

    def wait_until(self, ids: list[str], count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.terminal(ids) < count:
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1500:] for p in sorted(self.tmp.glob("worker*.log")))
                pytest.fail(f"{self.terminal(ids)}/{len(ids)} terminal after {timeout}s\n{logs}")
            time.sleep(0.2)

    def drain_events(self, expect: int, timeout: float = 60.0) -> list[str]:
        ids: list[str] = []
        deadline = time.monotonic() + timeout
        with Connection(BROKER) as c:
            q = self.events(c.default_channel)
            while time.monotonic() < deadline:
                msg = q.get(no_ack=True)
                if msg is None:
                    if len(ids) >= expect:
                        time.sleep(2.0)  # late duplicates would show up now
                        if (extra := q.get(no_ack=True)) is not None:
                            ids.append(extra.payload["id"])
                            continue
                        break
                    time.sleep(0.1)
                    continue
                ids.append(msg.payload["id"])
        return ids

    def close(self) -> None:
        self.kill_worker(signal.SIGTERM)
        self.pg_proxy.close()
        self.s3_proxy.close()
        with Connection(BROKER) as c:
            for name in (self.queue, self.events.name):
                c.default_channel.queue_delete(name)

    def check(self, ids: list[str]) -> None:
        """Exactly one terminal state per frame (failed ones with a reason) and exactly one event each."""
        states = self.states(ids)
        assert all(st in ("done", "failed") for st, _ in states.values())
        assert all(reason for st, reason in states.values() if st == "failed")
        events = self.drain_events(len(ids))
        assert sorted(events) == sorted(ids), f"{len(events)} events for {len(ids)} frames"


@pytest.fixture
def stack(tmp_path, pg_fresh_url, s3_server, s3_credentials):
    try:
        with Connection(BROKER, connect_timeout=5) as c:
            c.ensure_connection(max_retries=1)
    except Exception as exc:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"RabbitMQ not reachable: {exc}")
    st = Stack(tmp_path, pg_fresh_url, s3_server, s3_credentials)
    yield st
    st.close()


def test_worker_sigkilled_three_times_during_100_frames(stack):
    ids = stack.submit(100)
    stack.start_worker()
    for target in (15, 40, 65):
        stack.wait_until(ids, target, timeout=120)
        stack.kill_worker()  # mid-task: the unacked message returns to the queue
        stack.start_worker()
    stack.wait_until(ids, len(ids), timeout=240)
    assert all(st == "done" for st, _ in stack.states(ids).values())
    stack.check(ids)


@pytest.mark.parametrize("service", ["pg_proxy", "s3_proxy"], ids=["postgres-refuses", "s3-unavailable"])
def test_dependency_outage_for_a_few_seconds(stack, service):
    """PostgreSQL refusing connections, or S3 unreachable, for 4 s in the middle of a run."""
    ids = stack.submit(40)
    stack.start_worker()
    stack.wait_until(ids, 8, timeout=120)
    proxy = getattr(stack, service)
    proxy.cut()
    time.sleep(4)
    proxy.restore()
    stack.wait_until(ids, len(ids), timeout=240)
    assert all(st == "done" for st, _ in stack.states(ids).values())
    stack.check(ids)


def test_rabbitmq_restart_during_a_run(stack):
    ids = stack.submit(40)
    stack.start_worker()
    stack.wait_until(ids, 8, timeout=120)
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
    time.sleep(3)
    subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
    subprocess.run(["rabbitmqctl", "await_startup"], check=False, capture_output=True, timeout=120)
    stack.wait_until(ids, len(ids), timeout=300)
    assert all(st == InspectionStatus.done.value for st, _ in stack.states(ids).values())
    stack.check(ids)
