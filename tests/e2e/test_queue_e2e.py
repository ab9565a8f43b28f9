"""The deployed path: `inspect submit --wait` -> RabbitMQ -> `celery -A workers worker` -> PG + S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kombu import Connection
from PIL import Image

from storage import repo
from storage.db import session_factory
from storage.objects import S3ObjectStore
from storage.orm import InspectionStatus

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
BROKER = os.environ.get("INSPECT_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
EXAMPLES = ROOT / "examples" / "pcb1"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def broker() -> str:
    try:
        with Connection(BROKER, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # CI must have RabbitMQ: fail there, skip on a bare laptop
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"RabbitMQ not reachable: {exc}")
    return BROKER


def _env(tmp_path, pg_module_url, s3_server, creds, bucket, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECT_")}
    env.update(
        INSPECT_BROKER_URL=BROKER, INSPECT_DATABASE_URL=pg_module_url, INSPECT_S3_ENDPOINT=s3_server,
        INSPECT_S3_ACCESS_KEY=creds["access_key"], INSPECT_S3_SECRET_KEY=creds["secret_key"],
        INSPECT_S3_BUCKET=bucket, INSPECT_S3_REGION="us-east-1", INSPECT_CLIP_MODEL="inspect-tiny",
        INSPECT_WEIGHTS="random", INSPECT_DATA_DIR=str(tmp_path / "data"), **extra,
    )
    return env


def _start_worker(env: dict[str, str], queues: str, log: Path) -> subprocess.Popen:
    cmd = [_bin("celery"), "-A", "workers", "worker", "-Q", queues, "--concurrency", "1",
           "--loglevel", "INFO", "-n", f"e2e-{uuid.uuid4().hex[:6]}@%h", "--without-gossip",
           "--without-mingle"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _listen(binding: str) -> tuple[Connection, object]:
    """A private queue on the results exchange, declared before frames flow so nothing is missed."""
    from kombu import Exchange, Queue

    conn = Connection(BROKER)
    q = Queue(f"results-test-{uuid.uuid4().hex[:6]}", Exchange("results", "topic", durable=True),
              routing_key=binding, auto_delete=True, exclusive=True)
    q(conn.default_channel).declare()
    return conn, q


def _drain(listener, expect: int, timeout: float = 30.0) -> list:
    """Every message on the listener's queue (waits for ``expect``, then a little more for extras)."""
    import time

    conn, q = listener
    got, deadline = [], time.monotonic() + timeout
    with conn:
        bound = q(conn.default_channel)
        while time.monotonic() < deadline:
            msg = bound.get(no_ack=True)
            if msg is None:
                if len(got) >= expect:
                    time.sleep(1.0)  # a duplicate would arrive right behind
                    extra = bound.get(no_ack=True)
                    if extra is None:
                        break
                    got.append(extra)
                    continue
                time.sleep(0.1)
                continue
            got.append(msg)
    return got


def _submit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_bin("inspect"), "submit", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_submit_wait_through_rabbitmq_worker(tmp_path, broker, pg_module_url, s3_server, s3_credentials):
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    env = _env(tmp_path, pg_module_url, s3_server, s3_credentials, bucket)
    line = f"L{uuid.uuid4().hex[:6]}"
    events = _listen(f"line.{line}.#")
    worker = _start_worker(env, "gpu", tmp_path / "worker.log")
    try:
        res = _submit(env, "--line", line, "--category", "pcb1", "--station", "2", "--serial", "SN-9",
                      "--wait", "--timeout", "240", str(EXAMPLES))
    finally:
        _stop(worker)
    got = _drain(events, expect=3)
    log = (tmp_path / "worker.log").read_text()
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n--- worker log ---\n{log[-4000:]}"
    rows = [r.split("\t") for r in res.stdout.strip().splitlines()]
    assert len(rows) == 3 and all(r[1] in ("OK", "NG") for r in rows)
    assert all("[random weights]" in r[-1] for r in rows)
    assert "inspect.segment" in log  # finalize rides on the segment task (one message per frame)

    store = S3ObjectStore(endpoint=s3_server, bucket=bucket, region="us-east-1", **s3_credentials)
    with session_factory(pg_module_url)() as s:
        found = repo.list_results(s, line=line)
        assert len(found) == 3
        for insp, result in found:
            assert insp.status == InspectionStatus.done and insp.serial == "SN-9"
            assert result is not None and result.random_weights
            assert store.exists(result.overlay_key) and store.exists(result.anomaly_map_key)
            png = store.get_bytes(result.overlay_key)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            assert [st.stage for st in insp.stage_runs] == ["segment", "finalize"]
            assert insp.event_sent_at is not None
    # one result event per inspection on the results exchange, routed by line, station and verdict
    assert sorted(e.payload["id"] for e in got) == sorted(insp.id for insp, _ in found)
    for e in got:
        data = e.payload["data"]
        assert e.delivery_info["routing_key"] == f"line.{line}.2.{data['verdict']}"
        assert e.payload["type"] == "inspect.result.v1" and e.payload["subject"] == "SN-9"
        assert data["serial"] == "SN-9" and data["versions"]["random_weights"] is True
        assert data["objects"]["overlay"]["url"].startswith("http://")  # presigned S3 URL


def test_routed_stage_queue_and_bad_frame(tmp_path, broker, pg_module_url, s3_server, s3_credentials):
    q = f"gpu-e2e-{uuid.uuid4().hex[:6]}"
    env = _env(tmp_path, pg_module_url, s3_server, s3_credentials, f"e2e-{uuid.uuid4().hex[:10]}",
               INSPECT_DEFAULT_QUEUE=q, INSPECT_QUEUE_ROUTES=f"segment={q}.segment")
    bad = tmp_path / "truncated.png"
    bad.write_bytes((EXAMPLES / "good_000.png").read_bytes()[:500])
    grey = tmp_path / "grey.png"
    Image.open(EXAMPLES / "good_000.png").convert("L").save(grey)
    worker = _start_worker(env, f"{q},{q}.segment", tmp_path / "worker.log")
    try:
        res = _submit(env, "--line", "7", "--category", "pcb1", "--wait", "--timeout", "240",
                      str(bad), str(grey))
    finally:
        _stop(worker)
        with Connection(BROKER) as conn:  # leave no test queues behind
            ch = conn.channel()
            for name in (q, f"{q}.segment"):
                ch.queue_delete(name)
    log = (tmp_path / "worker.log").read_text()
    assert res.returncode == 2, f"{res.stdout}\n{res.stderr}\n{log[-3000:]}"  # one frame refused
    assert "truncated.png" in res.stderr and "corrupt or truncated" in res.stderr
    assert "\tOK\t" in res.stdout or "\tNG\t" in res.stdout
    assert f"{q}.segment" in log  # the worker consumed the routed queue


def test_bank_build_and_logical_stage_through_the_queue(tmp_path, broker, pg_module_url, s3_server, s3_credentials):
    from evaluation.synth import generate

    root = generate(tmp_path / "loco", "logical", n=1, seed=1, size=64, n_train=4)
    q = f"gpu-e2e-{uuid.uuid4().hex[:6]}"
    env = _env(tmp_path, pg_module_url, s3_server, s3_credentials, f"e2e-{uuid.uuid4().hex[:10]}",
               INSPECT_DEFAULT_QUEUE=q)
    worker = _start_worker(env, q, tmp_path / "worker.log")
    try:
        built = subprocess.run([_bin("inspect"), "bank", "build", "--category", "synth_logical", "--line", "5",
                                "--images", str(root / "train" / "good")],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        frames = [*sorted((root / "test" / "good").glob("*.png"))[:1],
                  *sorted((root / "test" / "logical_anomalies").glob("*.png"))[:1]]
        res = _submit(env, "--line", "5", "--category", "synth_logical", "--wait", "--timeout", "240",
                      *map(str, frames))
    finally:
        _stop(worker)
        with Connection(BROKER) as conn:
            conn.channel().queue_delete(q)
    log = (tmp_path / "worker.log").read_text()
    assert built.returncode == 0, f"{built.stdout}\n{built.stderr}\n{log[-3000:]}"
    assert "inspect.bank_build" in log and "ready" in built.stdout
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{log[-3000:]}"
    with session_factory(pg_module_url)() as s:
        found = repo.list_results(s, line="5")
        assert len(found) == 2
        for insp, result in found:
            assert result.bank_id is not None and result.bank_version == 1
            assert {"logical", "structural", "fused"} <= set(result.scores)
            runs = {st.stage: st for st in insp.stage_runs}
            assert set(runs) == {"segment", "logical", "finalize"}
            assert runs["logical"].output["shared_backbone"] is True  # one message, one backbone pass


def test_filo_chain_with_imported_grounding_through_the_queue(
    tmp_path, broker, pg_module_url, s3_server, s3_credentials
):
    from safetensors.torch import save_file

    from workers.grounding import tiny_random_grounding
    from workers.models.filo import FiLoHead
    from workers.weights import load_clip

    gdino = tiny_random_grounding(tmp_path / "gdino")
    head = FiLoHead.for_visual(load_clip("inspect-tiny", "random").model.visual)
    head.mark_trained()  # stands in for trained weights: the chain's code path is under test
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "filo.safetensors"))
    q = f"gpu-e2e-{uuid.uuid4().hex[:6]}"
    name = f"gdino-{uuid.uuid4().hex[:6]}"
    env = _env(tmp_path, pg_module_url, s3_server, s3_credentials, f"e2e-{uuid.uuid4().hex[:10]}",
               INSPECT_DEFAULT_QUEUE=q, INSPECT_GROUNDING=name,
               INSPECT_FILO_WEIGHTS=str(tmp_path / "filo.safetensors"))
    cli = [_bin("inspect")]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    imported = run("models", "import-dir", str(gdino), "--name", name)
    assert imported.returncode == 0, imported.stderr
    cat = f"pcb1_{uuid.uuid4().hex[:4]}"
    assert run("category", "add", cat).returncode == 0
    assert run("category", "set", cat, "--pipeline",
               '{"stages": ["localize", "segment"], "segment_method": "filo"}').returncode == 0
    worker = _start_worker(env, q, tmp_path / "worker.log")
    try:
        res = _submit(env, "--line", "9", "--category", cat, "--wait", "--timeout", "240",
                      str(EXAMPLES / "scratch_001.png"))
    finally:
        _stop(worker)
        with Connection(BROKER) as conn:
            conn.channel().queue_delete(q)
    log = (tmp_path / "worker.log").read_text()
    assert res.returncode == 0 and "FAILED" not in res.stdout, f"{res.stdout}\n{res.stderr}\n{log[-3000:]}"
    assert "inspect.localize" in log  # localize -> segment -> finalize travel as one message
    with session_factory(pg_module_url)() as s:
        ((insp, result),) = repo.list_results(s, line="9")
        runs = {st.stage: st for st in insp.stage_runs}
        assert set(runs) == {"localize", "segment", "finalize"}
        assert runs["segment"].output["method"] == "filo"
        assert "weights-cache" in runs["localize"].output["grounding"]  # loaded from the object-store import
        assert "phrases" in result.scores and "position" in result.scores
        from storage.job_repo import list_detections

        assert len(list_detections(s, insp.id)) == min(runs["localize"].output["n_boxes"], 50)
