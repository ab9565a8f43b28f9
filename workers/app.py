"""The Celery app: JSON only, late acks, prefetch 1, explicit task names and per-stage queues.

Every stage goes to ``INSPECT_DEFAULT_QUEUE`` (``gpu``) unless ``INSPECT_QUEUE_ROUTES`` sends
it to its own queue (``segment=gpu.segment``). Each queue is bound once, with its own name as
routing key on one direct exchange, so a message lands in exactly one queue.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_ready
from kombu import Exchange, Queue

from common.settings import Settings, get_settings

EXCHANGE = Exchange("inspect", type="direct", durable=True)
# Messages a queue gives up on (delivery limit reached: e.g. a frame that kills its worker every time)
# go here, routed by their queue name; `inspect ingest` turns them into failed inspections.
DEAD_EXCHANGE = Exchange("inspect.dlx", type="topic", durable=True)
DEAD_QUEUE = "inspect.dead"
TASK_NAMES = {
    "segment": "inspect.segment",
    "logical": "inspect.logical",
    "finalize": "inspect.finalize",
    "bank": "inspect.bank_build",
    "describe": "inspect.describe",
    "localize": "inspect.localize",
}


def queues_for(settings: Settings) -> list[Queue]:
    """Durable quorum queues with an explicit dead-letter exchange and delivery limit (RabbitMQ 3.10
    does not default these), one binding each."""
    names = {settings.default_queue, *settings.stage_queues().values(), settings.queue_for("bank"),
             settings.queue_for("describe")}
    args = {"x-queue-type": "quorum", "x-dead-letter-exchange": DEAD_EXCHANGE.name,
            "x-delivery-limit": settings.task_delivery_limit}
    # Bank builds and LLM calls outlast RabbitMQ's 30 min default consumer timeout, which would cancel a
    # late-acking consumer mid-task: queues hosting them get their own (honoured by RabbitMQ 3.12+;
    # on 3.10 raise consumer_timeout in rabbitmq.conf instead).
    long = {settings.queue_for("bank"), settings.queue_for("describe")}
    return [Queue(n, EXCHANGE, routing_key=n, durable=True,
                  queue_arguments=args | ({"x-consumer-timeout": settings.long_stage_consumer_timeout_ms}
                                          if n in long else {}))
            for n in sorted(names)]


def dead_letter_queue() -> Queue:
    return Queue(DEAD_QUEUE, DEAD_EXCHANGE, routing_key="#", durable=True,
                 queue_arguments={"x-queue-type": "quorum"})


def make_app(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("inspect", broker=s.broker_url or "memory://", include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # pickle refused
        event_serializer="json",
        task_ignore_result=True,  # results live in the database, not a result backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=s.default_queue,
        task_default_exchange=EXCHANGE.name,
        task_default_routing_key=s.default_queue,
        task_queues=queues_for(s),
        task_routes={name: {"queue": s.queue_for(stage), "routing_key": s.queue_for(stage)}
                     for stage, name in TASK_NAMES.items()},
        broker_connection_retry_on_startup=True,
        broker_transport_options={"confirm_publish": True},
        worker_hijack_root_logger=False,
        worker_detect_quorum_queues=True,  # quorum queues have no global QoS: Celery uses per-consumer prefetch
    )
    return app


def declare_dead_letters(connection) -> None:
    """Bind the dead-letter queue so nothing a task queue gives up on is dropped."""
    dead_letter_queue()(connection.default_channel).declare()


app = make_app()


@worker_ready.connect
def _declare_on_start(sender=None, **_: object) -> None:
    with app.connection_for_write() as conn:
        declare_dead_letters(conn)
