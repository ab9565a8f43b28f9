"""`inspect ingest` against real RabbitMQ, PostgreSQL and an S3 server: every frame accounted for.

No Celery worker runs: accepted frames' stage messages wait in a throwaway queue; the test reads
the inspection rows. Each test declares its own exchanges and queues (unique names through the
INSPECT_MES_* settings) and deletes them afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue
from mes_cases import STATION, Case, build_cases, reused_id_case
from sqlalchemy import func, select

from common.settings import Settings
from orchestrator.mes import declare_topology
from orchestrator.service import register_category
from storage import mes_repo, repo
from storage.db import session_factory
from storage.objects import S3ObjectStore
from storage.orm import Inspection, Line, RejectedMessage

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
BROKER = os.environ.get("INSPECT_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
MAX_INLINE = 256 * 1024
# Works whether or not cli.py imports cli_mes yet (the import registers the commands).
INSPECT = [sys.executable, "-c", "from orchestrator import cli_mes; from orchestrator.cli import main; main()"]
OUTCOMES = ("accepted\t", "duplicate\t", "rejected\t")


@pytest.fixture(scope="module")
def broker() -> str:
    try:
        with Connection(BROKER, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"RabbitMQ not reachable: {exc}")
    return BROKER


class Rig:
    """Unique topology names, the env for `inspect ingest`, and cleanup of everything declared."""

    def __init__(self, tmp: Path, pg_url: str, s3: str, creds: dict[str, str], **extra: str) -> None:
        self.run = uuid.uuid4().hex[:6]
        names = {"MES_EXCHANGE": f"t-frames-{self.run}", "MES_DEAD_LETTER_EXCHANGE": f"t-frames-dlx-{self.run}",
                 "MES_DEAD_QUEUE": f"t-frames-dead-{self.run}", "MES_INTAKE_QUEUE": f"t-frames-intake-{self.run}",
                 "DEFAULT_QUEUE": f"t-gpu-{self.run}"}
        self.bucket = f"mes-{self.run}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECT_")}
        self.env.update({f"INSPECT_{k}": v for k, v in names.items()})
        self.env.update(
            INSPECT_BROKER_URL=BROKER, INSPECT_DATABASE_URL=pg_url, INSPECT_S3_ENDPOINT=s3,
            INSPECT_S3_ACCESS_KEY=creds["access_key"], INSPECT_S3_SECRET_KEY=creds["secret_key"],
            INSPECT_S3_BUCKET=self.bucket, INSPECT_S3_REGION="us-east-1", INSPECT_DATA_DIR=str(tmp / "data"),
            INSPECT_MES_MAX_INLINE_BYTES=str(MAX_INLINE), INSPECT_MAX_IMAGE_BYTES="100000",
            INSPECT_MES_RETRY_BACKOFF="0.1",
        )
        self.env.update(extra)
        self.settings = Settings(**{k.removeprefix("INSPECT_").lower(): v for k, v in self.env.items()
                                    if k.startswith("INSPECT_")})
        self.conn = Connection(BROKER, transport_options={"confirm_publish": True})
        self.topo = declare_topology(self.conn, self.settings)  # before publishing: nothing unroutable
        self.tmp, self.procs = tmp, []

    def start_ingest(self, name: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen([*INSPECT, "ingest"], cwd=ROOT, env=self.env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def publish(self, case: Case) -> None:
        producer = self.conn.Producer()
        producer.publish(case.body, exchange=self.topo.exchange, routing_key=case.routing_key,
                         content_type=case.content_type, content_encoding="binary", headers=case.headers,
                         delivery_mode=2, mandatory=True, message_id=f"{self.run}-{case.name}", timeout=30)

    def drain_dead(self) -> list:
        bound = self.topo.dead_queue(self.conn.default_channel)
        got = []
        while (msg := bound.get(no_ack=True)) is not None:
            got.append(msg)
        return got

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.conn.release()
        gpu = Queue(self.settings.default_queue, Exchange("inspect", "direct", durable=True))
        with Connection(BROKER) as conn:  # a fresh one: the test's may have died with the broker
            ch = conn.channel()
            for entity in (self.topo.intake_queue, self.topo.dead_queue, gpu, self.topo.exchange,
                           self.topo.dead_letter_exchange):
                try:
                    entity(ch).delete()
                except conn.channel_errors:
                    ch = conn.channel()  # a failed delete closes the channel; go on with the rest


@pytest.fixture
def rig_factory(tmp_path, pg_module_url, s3_server, s3_credentials, broker) -> Iterator:
    rigs: list[Rig] = []

    def make(**extra: str) -> Rig:
        tmp = tmp_path / f"rig{len(rigs)}"
        tmp.mkdir()
        rigs.append(Rig(tmp, pg_module_url, s3_server, s3_credentials, **extra))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def _register(pg_url: str, lines: list[str]) -> None:
    with session_factory(pg_url).begin() as s:
        for line in lines:
            mes_repo.add_line(s, line)
        if repo.get_category(s, "pcb1") is None:
            register_category(s, "pcb1", 0.5, auto=False)


def _outcomes(logs: list[Path]) -> list[str]:
    return [ln for log in logs for ln in log.read_text(errors="replace").splitlines() if ln.startswith(OUTCOMES)]


def _wait_outcomes(logs: list[Path], expect: int, procs: list[subprocess.Popen], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(_outcomes(logs)) < expect:
        for p, log in zip(procs, logs, strict=True):
            assert p.poll() is None, f"ingest died:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{len(_outcomes(logs))}/{expect} outcomes:\n{logs[0].read_text()[-3000:]}"
        time.sleep(0.2)


def test_every_frame_ends_inspected_or_dead_lettered(rig_factory, pg_module_url, s3_server, s3_credentials):
    rig = rig_factory()
    store = S3ObjectStore(endpoint=s3_server, bucket=rig.bucket, region="us-east-1", **s3_credentials)
    cases = build_cases(rig.run, lambda key, data: store.put_bytes(key, data), rig.bucket, MAX_INLINE)
    good = [c for c in cases if c.expect is None]
    reused = reused_id_case(rig.run, good[0])
    _register(pg_module_url, [c.line for c in cases if c.register_line] + [reused.line])
    assert len(cases) - len(good) >= 20

    # Two consumers compete, as in production; the first good frame is published three times.
    procs_logs = [rig.start_ingest("ingest-a"), rig.start_ingest("ingest-b")]
    procs, logs = [p for p, _ in procs_logs], [lg for _, lg in procs_logs]
    for case in [good[0], good[0], *cases, good[0]]:
        rig.publish(case)
    published = len(cases) + 3
    _wait_outcomes(logs, published, procs)

    # Phase two, after the first frames are in: redeliveries out of order, and a reused frame id.
    for case in [good[2], good[1], reused, good[0]]:
        rig.publish(case)
    _wait_outcomes(logs, published + 4, procs)
    assert not [ln for ln in "\n".join(lg.read_text() for lg in logs).splitlines() if ln.startswith("requeued")]

    bad = [c for c in cases if c.expect] + [reused]
    with session_factory(pg_module_url)() as s:
        for c in good:
            rows = s.scalars(select(Inspection).where(Inspection.frame_id == c.frame_id)).all()
            assert len(rows) == 1, c.name
            assert rows[0].source == "mes" and rows[0].station == STATION and rows[0].line.name == c.line
        lines = [c.line for c in cases] + [reused.line]
        total = s.scalar(select(func.count()).select_from(Inspection).where(
            Inspection.line.has(Line.name.in_(lines))))
        assert total == len(good)
        rejected = defaultdict(list)
        for row in s.scalars(select(RejectedMessage).where(RejectedMessage.routing_key.in_(
                [c.routing_key for c in bad]))):
            rejected[row.routing_key].append(row)
    for c in bad:
        assert len(rejected[c.routing_key]) == 1, (c.name, rejected[c.routing_key])
        row = rejected[c.routing_key][0]
        assert c.expect in row.reason, (c.name, row.reason)
        assert row.body_size == len(c.body) and row.queue == rig.settings.mes_intake_queue

    dead = defaultdict(list)
    for msg in rig.drain_dead():
        dead[msg.delivery_info["routing_key"]].append(msg)
    for c in bad:
        assert len(dead[c.routing_key]) == 1, (c.name, len(dead[c.routing_key]))
        msg = dead[c.routing_key][0]
        assert c.expect in msg.headers["x-reject-reason"], (c.name, msg.headers["x-reject-reason"])
        assert (msg.body or b"") == c.body, c.name  # the original bytes, ready to be replayed (b"" reads as "")
    assert sum(len(v) for v in dead.values()) == len(bad)

    for p in procs:
        assert p.poll() is None
        os.killpg(p.pid, signal.SIGTERM)
    for p, log in zip(procs, logs, strict=True):
        assert p.wait(30) == 0
        assert "ingest stopped" in log.read_text()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_transient_errors_requeue_until_the_delivery_limit(rig_factory, pg_module_url):
    # The object store is down: never acked, requeued, then dead-lettered by RabbitMQ itself.
    rig = rig_factory(INSPECT_S3_ENDPOINT=f"127.0.0.1:{_closed_port()}", INSPECT_MES_DELIVERY_LIMIT="2")
    case = build_cases(rig.run, lambda *_: None, rig.bucket, MAX_INLINE)[0]
    _register(pg_module_url, [case.line])
    proc, log = rig.start_ingest("ingest-down")
    rig.publish(case)
    deadline, dead = time.monotonic() + 90, []
    while not dead:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.3)
        dead = rig.drain_dead()
    assert len(dead) == 1 and dead[0].body == case.body
    assert dead[0].headers["x-first-death-reason"] == "delivery_limit"
    assert "x-reject-reason" not in dead[0].headers
    requeued = [ln for ln in log.read_text().splitlines() if ln.startswith("requeued")]
    assert len(requeued) == 3 and "ObjectStoreUnavailable" in requeued[0]  # first delivery + limit
    with session_factory(pg_module_url)() as s:
        assert s.scalar(select(func.count()).select_from(Inspection).where(Inspection.frame_id == case.frame_id)) == 0
    assert proc.poll() is None


@pytest.mark.parametrize("mode", ["--inline", "--object-ref"])
def test_simulate_publishes_frames_the_intake_accepts(rig_factory, pg_module_url, mode):
    rig = rig_factory()
    _register(pg_module_url, ["3"])
    proc, log = rig.start_ingest("ingest-sim")
    out = subprocess.run([*INSPECT, "mes", "simulate", "--line", "3", "--station", "2", "--category", "pcb1",
                          "--rate", "50", "--count", "6", mode, str(ROOT / "examples" / "pcb1")],
                         cwd=ROOT, env=rig.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "published 6 frames" in out.stdout
    prefix = re.search(r"frame ids (sim-[0-9a-f]+-)000000\.\.", out.stdout).group(1)
    _wait_outcomes([log], 6, [proc])
    assert all(ln.startswith("accepted\t" + prefix) for ln in _outcomes([log])), log.read_text()
    with session_factory(pg_module_url)() as s:
        rows = s.scalars(select(Inspection).where(Inspection.frame_id.startswith(prefix))).all()
        assert len(rows) == 6 and {r.serial for r in rows} == {f"SIM-{i:06d}" for i in range(6)}
        assert {(r.line.name, r.station, r.source) for r in rows} == {("3", "2", "mes")}
