"""MES intake topology on RabbitMQ, and the connection every MES producer and consumer uses.

::

    camera/MES --(line.<line>.<station>)--> frames (topic) --line.#--> frames.intake (quorum)
                                                                          |  x-dead-letter-exchange
    refused by `inspect ingest` (x-reject-reason) ---> frames.dlx (topic) <+  x-delivery-limit
                                                          |--#--> frames.dead (quorum)

Arguments are explicit (RabbitMQ 3.10 here): newer brokers' defaults are not relied on.
Dead-lettering by the broker (delivery limit reached) uses the at-least-once strategy, so a
message is removed from the intake queue only once the dead-letter queue confirmed it.
The consumer lives in ``orchestrator.mes_ingest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kombu import Connection, Exchange, Queue

from common.settings import Settings

_QUORUM_SINCE = (3, 8)


@dataclass(frozen=True)
class Topology:
    exchange: Exchange
    dead_letter_exchange: Exchange
    dead_queue: Queue
    intake_queue: Queue
    quorum: bool


def connect(settings: Settings) -> Connection:
    """A broker connection whose channels wait for publisher confirms on every publish."""
    if not settings.broker_url:
        raise ValueError("INSPECT_BROKER_URL is not set: the MES intake needs RabbitMQ")
    return Connection(settings.broker_url, heartbeat=60, connect_timeout=10,
                      transport_options={"confirm_publish": True})


def frame_routing_key(line: str, station: str) -> str:
    return f"line.{line}.{station}"


def server_version(channel: Any) -> tuple[int, ...] | None:
    props = getattr(getattr(channel, "connection", None), "server_properties", None) or {}
    version = props.get("version")
    if isinstance(version, bytes):
        version = version.decode("ascii", "replace")
    nums = re.findall(r"\d+", str(version or ""))
    return tuple(int(n) for n in nums[:3]) or None


def topology(settings: Settings, *, quorum: bool = True, intake_queue: str | None = None) -> Topology:
    exchange = Exchange(settings.mes_exchange, type="topic", durable=True)
    dlx = Exchange(settings.mes_dead_letter_exchange, type="topic", durable=True)
    kind = {"x-queue-type": "quorum"} if quorum else {}
    dead = Queue(settings.mes_dead_queue, dlx, routing_key="#", durable=True, queue_arguments=dict(kind))
    args: dict[str, Any] = {**kind, "x-dead-letter-exchange": dlx.name}
    if quorum:  # delivery limits and at-least-once dead-lettering exist on quorum queues only
        args |= {"x-delivery-limit": settings.mes_delivery_limit, "x-dead-letter-strategy": "at-least-once",
                 "x-overflow": "reject-publish"}
    intake = Queue(intake_queue or settings.mes_intake_queue, exchange, routing_key="line.#", durable=True,
                   queue_arguments=args)
    return Topology(exchange, dlx, dead, intake, quorum)


def declare_topology(channel_or_conn: Any, settings: Settings, *, intake_queue: str | None = None) -> Topology:
    """Declare exchanges and queues (idempotent; a queue declared with other arguments fails loudly)."""
    channel = channel_or_conn.default_channel if isinstance(channel_or_conn, Connection) else channel_or_conn
    version = server_version(channel)
    topo = topology(settings, quorum=version is not None and version >= _QUORUM_SINCE, intake_queue=intake_queue)
    for entity in (topo.exchange, topo.dead_letter_exchange, topo.dead_queue, topo.intake_queue):
        entity(channel).declare()
    return topo
