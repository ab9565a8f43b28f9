"""A task message redelivered past the quorum queue's delivery limit ends as a failed inspection."""

from __future__ import annotations

import io
import os
import uuid

import numpy as np
import pytest
from kombu import Connection, Exchange, Queue
from PIL import Image

from common.settings import Settings
from orchestrator.context import open_orchestrator
from orchestrator.deadletters import drain
from storage import repo
from storage.orm import InspectionStatus

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def test_poison_message_is_dead_lettered_and_recorded(tmp_path, pg_module_url, s3_server, s3_credentials):
    try:
        Connection(BROKER, connect_timeout=5).ensure_connection(max_retries=1)
    except Exception as exc:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"RabbitMQ not reachable: {exc}")
    q = f"poison-{uuid.uuid4().hex[:6]}"
    settings = Settings(broker_url=BROKER, database_url=pg_module_url, s3_endpoint=s3_server,
                        s3_access_key=s3_credentials["access_key"], s3_secret_key=s3_credentials["secret_key"],
                        s3_bucket=f"p-{uuid.uuid4().hex[:8]}", s3_region="us-east-1", default_queue=q,
                        task_delivery_limit=1, data_dir=tmp_path)
    orch = open_orchestrator(settings)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "PNG")
    line = f"P{uuid.uuid4().hex[:5]}"
    events = Queue(f"poison-events-{uuid.uuid4().hex[:6]}", Exchange("results", "topic", durable=True),
                   routing_key=f"line.{line}.#", auto_delete=True)
    with Connection(BROKER) as conn:
        bound_events = events(conn.default_channel)
        bound_events.declare()
        iid = orch.intake.submit(buf.getvalue(), line=line, category="pcb1").inspection_id
        task_queue = Queue(q, Exchange("inspect", "direct", durable=True), routing_key=q, durable=True,
                           queue_arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": "inspect.dlx",
                                            "x-delivery-limit": 1})(conn.default_channel)
        for _ in range(3):  # a worker that dies on this frame every time: the message comes back
            msg = task_queue.get(no_ack=False)
            if msg is None:
                break
            msg.requeue()
        assert task_queue.get(no_ack=False) is None  # the queue gave up on it
        lines = [line_ for line_ in drain(orch, conn) if iid in line_]
        assert lines and "dead-lettered by queue" in lines[0]
        event = bound_events.get(no_ack=True)
        task_queue.delete()
    with orch.sessions() as s:
        insp = repo.get_inspection(s, iid)
        assert insp.status == InspectionStatus.failed and "delivery" in insp.reason and q in insp.reason
    assert event is not None and event.payload["type"] == "inspect.failure.v1" and event.payload["id"] == iid


def test_frame_whose_send_failed_is_sent_again_when_resubmitted(tmp_path, pg_module_url, s3_server, s3_credentials):
    common = dict(database_url=pg_module_url, s3_endpoint=s3_server, s3_access_key=s3_credentials["access_key"],
                  s3_secret_key=s3_credentials["secret_key"], s3_bucket=f"r-{uuid.uuid4().hex[:8]}",
                  s3_region="us-east-1", default_queue=f"resend-{uuid.uuid4().hex[:6]}", data_dir=tmp_path)
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(buf, "PNG")
    frame_id = f"resend-{uuid.uuid4().hex}"
    down = open_orchestrator(Settings(broker_url="amqp://guest:guest@127.0.0.1:1//", **common))
    down.intake.dispatcher.app.conf.broker_connection_max_retries = 1
    down.intake.dispatcher.app.conf.broker_connection_timeout = 1
    with pytest.raises(Exception):  # noqa: B017 - the broker refuses: whatever kombu raises
        down.intake.submit(buf.getvalue(), line="R1", category="pcb1", frame_id=frame_id)
    with down.sessions() as s:
        insp = repo.get_inspection_by_frame(s, frame_id)
        assert insp.status == InspectionStatus.failed and insp.reason.startswith("could not enqueue")
    up = open_orchestrator(Settings(broker_url=BROKER, **common))
    again = up.intake.submit(buf.getvalue(), line="R1", category="pcb1", frame_id=frame_id)
    assert again.inspection_id == insp.id and not again.created
    with up.sessions() as s:
        assert repo.get_inspection(s, insp.id).status == InspectionStatus.queued
    with Connection(BROKER) as conn:
        name = common["default_queue"]
        q = Queue(name, Exchange("inspect", "direct", durable=True), routing_key=name, durable=True,
                  queue_arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": "inspect.dlx",
                                   "x-delivery-limit": 5})(conn.default_channel)
        msg = q.get(no_ack=True)
        assert msg is not None and msg.headers["task"] == "inspect.segment"
        assert insp.id in msg.headers["argsrepr"]  # the same inspection, sent again
        q.delete()
