"""MES commands: ``inspect ingest`` (the intake consumer) and ``inspect mes ...`` (simulate, lines, rejections)."""

from __future__ import annotations

import base64
import json
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import click
from tqdm import tqdm

from common.images import ImageError, read_frame_file
from orchestrator.cli import cli, expand_paths
from orchestrator.context import open_orchestrator
from orchestrator.mes import connect, declare_topology, frame_routing_key
from orchestrator.mes_schema import InvalidMessage, build_envelope, name_field, sha256_hex
from storage import mes_repo


def _printable(text: str | None) -> str:
    # Frame ids and reasons come from outside: never let them drive the terminal.
    return "-" if text is None else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _need_broker(settings) -> None:
    if not settings.broker_url:
        raise click.ClickException("INSPECT_BROKER_URL is not set: the MES intake runs on RabbitMQ")


@cli.command()
@click.option("--queue", default=None, help="Intake queue (default: INSPECT_MES_INTAKE_QUEUE, frames.intake).")
@click.option("--prefetch", default=1, show_default=True, type=click.IntRange(1, 1000),
              help="Unacknowledged frames held at once (acks are late: after the commit).")
@click.option("--quiet", is_flag=True, help="Print a counter every --stats-every seconds instead of a line per frame.")
@click.option("--stats-every", default=30.0, show_default=True, type=click.FloatRange(min=0.1))
def ingest(queue: str | None, prefetch: int, quiet: bool, stats_every: float) -> None:
    """Consume MES frames from the intake queue (run as many as needed; SIGTERM stops cleanly)."""
    from orchestrator.mes_ingest import IngestConsumer, Outcome

    orch = open_orchestrator()
    _need_broker(orch.settings)
    last = [time.monotonic()]

    def report(o: Outcome) -> None:
        if not quiet:
            click.echo(f"{o.kind}\t{_printable(o.frame_id)}\t{_printable(o.routing_key)}\t{_printable(o.detail)}")
        elif time.monotonic() - last[0] >= stats_every:
            last[0] = time.monotonic()
            click.echo(_counts(consumer.counts))

    consumer = IngestConsumer(orch, queue=queue, prefetch=prefetch, report=report)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: consumer.stop())
    click.echo(f"ingest: consuming {consumer.queue_name} (prefetch {prefetch}); SIGTERM or Ctrl-C stops", err=True)
    consumer.run()
    click.echo(f"ingest stopped: {_counts(consumer.counts)}", err=True)


def _counts(counts) -> str:
    return ", ".join(f"{counts.get(k, 0)} {k}" for k in ("accepted", "duplicate", "rejected", "requeued"))


@cli.group()
def mes() -> None:
    """MES frames: simulate a camera, register lines, read rejected messages."""


@mes.command("declare")
def mes_declare() -> None:
    """Declare the frames exchanges and queues (the consumer and the simulator do it too)."""
    orch = open_orchestrator()
    _need_broker(orch.settings)
    with connect(orch.settings) as conn:
        topo = declare_topology(conn, orch.settings)
    click.echo(f"declared {topo.exchange.name} -> {topo.intake_queue.name} (quorum={topo.quorum}), "
               f"{topo.dead_letter_exchange.name} -> {topo.dead_queue.name}")


@mes.command("add-line")
@click.argument("name")
@click.option("--description", default=None)
def mes_add_line(name: str, description: str | None) -> None:
    """Register a production line: the intake refuses frames for unknown lines by default."""
    try:
        name_field(name, "line")
    except InvalidMessage as exc:
        raise click.BadParameter(exc.reason, param_hint="NAME") from None
    orch = open_orchestrator()
    with orch.sessions.begin() as s:
        _, created = mes_repo.add_line(s, name, description)
    click.echo(f"line {name} {'registered' if created else 'already registered'}")


@mes.command("lines")
def mes_lines() -> None:
    """Registered production lines."""
    orch = open_orchestrator()
    with orch.sessions() as s:
        for line in mes_repo.list_lines(s):
            click.echo(f"{line.name}\t{line.description or ''}")


@mes.command("rejections")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True)
def mes_rejections(limit: int, as_json: bool) -> None:
    """Messages the intake refused, newest first, with their reasons."""
    orch = open_orchestrator()
    with orch.sessions() as s:
        rows = [{"id": r.id, "received_at": r.received_at.isoformat(), "queue": r.queue, "routing_key": r.routing_key,
                 "message_id": r.message_id, "reason": r.reason, "body_size": r.body_size}
                for r in mes_repo.list_rejections(s, limit)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['received_at']}\t{_printable(r['message_id'])}\t{_printable(r['routing_key'])}\t"
                   f"{_printable(r['reason'])}")


@mes.command("simulate")
@click.option("--line", required=True)
@click.option("--station", required=True)
@click.option("--category", required=True)
@click.option("--rate", default=20.0, show_default=True, type=click.FloatRange(min=0.01), help="Frames per second.")
@click.option("--duration", default=60.0, show_default=True, type=click.FloatRange(min=0), help="Seconds.")
@click.option("--count", default=None, type=click.IntRange(min=1), help="Frames to send (instead of rate x duration).")
@click.option("--inline/--object-ref", default=True, show_default=True,
              help="Base64 in the message, or upload to the object store and send a reference.")
@click.option("--serial-prefix", default="SIM", show_default=True)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def mes_simulate(line, station, category, rate, duration, count, inline, serial_prefix, folder) -> None:
    """Publish FOLDER's images as a camera would: schema v1 envelopes to the frames exchange, cycling."""
    for value, what in ((line, "--line"), (station, "--station")):
        try:
            name_field(value, what)
        except InvalidMessage as exc:
            raise click.BadParameter(exc.reason, param_hint=what) from None
    orch = open_orchestrator()
    s = orch.settings
    _need_broker(s)
    images = _load_images(orch, folder, line, station, inline)
    total = count or max(1, int(rate * duration))
    run = uuid.uuid4().hex[:8]
    rk = frame_routing_key(line, station)
    sent = 0
    with connect(s) as conn:
        topo = declare_topology(conn, s)
        producer = conn.Producer()
        start = time.monotonic()
        for i in tqdm(range(total), desc="publishing", unit="frame", file=sys.stderr):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            frame_id = f"sim-{run}-{i:06d}"
            env = build_envelope(frame_id=frame_id, source=f"inspect-simulate/line/{line}/station/{station}",
                                 line=line, station=station, category=category, serial=f"{serial_prefix}-{i:06d}",
                                 image=images[i % len(images)], time=datetime.now(UTC).isoformat())
            try:
                producer.publish(json.dumps(env).encode(), exchange=topo.exchange, routing_key=rk,
                                 content_type="application/json", content_encoding="utf-8", delivery_mode=2,
                                 mandatory=True, message_id=frame_id, timeout=30)
            except Exception as exc:  # nacked, unroutable, timed out or disconnected: say how far we got
                raise click.ClickException(f"publishing frame {frame_id} failed after {sent} confirmed frames: "
                                           f"{type(exc).__name__}: {exc}") from None
            sent += 1
    click.echo(f"published {sent} frames to {topo.exchange.name} ({rk}); frame ids sim-{run}-000000.."
               f"sim-{run}-{sent - 1:06d}")


def _load_images(orch, folder: str, line: str, station: str, inline: bool) -> list[dict]:
    """The ``data.image`` objects to cycle through (uploaded once each in object-reference mode)."""
    files, errors = expand_paths((folder,))
    if errors:
        raise click.ClickException("; ".join(errors))
    s = orch.settings
    images = []
    for path in files:
        try:
            data = read_frame_file(str(path), max_bytes=s.max_image_bytes)
        except ImageError as exc:
            raise click.ClickException(str(exc)) from None
        sha = sha256_hex(data)
        if inline:
            if len(data) > s.mes_max_inline_bytes:
                raise click.ClickException(f"{path}: {len(data)} bytes, above the inline limit of "
                                           f"{s.mes_max_inline_bytes}; use --object-ref")
            images.append({"inline": base64.b64encode(data).decode("ascii"), "sha256": sha})
            continue
        key = f"incoming/{line}/{station}/{sha}{Path(path).suffix.lower()}"
        orch.store.put_bytes(key, data)
        uri = f"s3://{s.s3_bucket}/{key}" if s.s3_endpoint else key
        images.append({"uri": uri, "sha256": sha})
    return images
