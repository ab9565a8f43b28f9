"""``inspect ingest``: consume MES frames from the intake queue, one inspection per frame id.

Per message (prefetch 1, late ack):

* valid -> ``Intake.submit`` (stores the image, commits the inspection, sends the stages) -> ack;
* a frame id seen before with the same content -> ack (exactly one inspection per frame id);
* refused (malformed, bad image, unknown line or category, missing object, SHA-256 mismatch,
  a reused frame id with other content) -> recorded in ``rejected_messages``, republished to the
  dead-letter exchange with ``x-reject-reason`` under publisher confirms, then acked: never lost;
* transient (database, object store or broker unreachable) -> not acked; requeued after a
  backoff. The quorum queue's delivery limit bounds the redeliveries, then RabbitMQ
  dead-letters the message itself (``x-death`` says ``delivery_limit``);
* unexpected errors are retried the same way, and refused with their reason on the last
  delivery, so a poison message is recorded instead of vanishing.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from kombu import Consumer, Producer
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import InterfaceError
from sqlalchemy.exc import OperationalError as DatabaseDown

from common.images import ImageError
from orchestrator.context import Orchestrator
from orchestrator.mes import Topology, connect, declare_topology
from orchestrator.mes_schema import FrameRequest, InlineImage, InvalidMessage, parse_envelope, sha256_hex
from orchestrator.service import UnknownCategory
from storage import mes_repo, repo
from storage.objects import ObjectNotFound, ObjectStoreUnavailable

log = logging.getLogger(__name__)
TRANSIENT = (DatabaseDown, InterfaceError, ObjectStoreUnavailable, BrokerError, ConnectionError, TimeoutError)
MAX_BACKOFF = 30.0


class Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Outcome:
    kind: str  # accepted | duplicate | rejected | requeued
    frame_id: str | None
    routing_key: str | None
    detail: str


def json_safe(value: Any) -> Any:
    """AMQP header values -> JSON for the database (bytes, timestamps, decimals; no NUL)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


class IngestConsumer:
    def __init__(self, orch: Orchestrator, *, queue: str | None = None, prefetch: int = 1,
                 report: Callable[[Outcome], None] | None = None) -> None:
        self.orch = orch
        self.settings = orch.settings
        self.queue_name = queue or self.settings.mes_intake_queue
        self.prefetch = prefetch
        self.report = report or (lambda _outcome: None)
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._failures = 0  # consecutive transient failures: the backoff grows with them
        self._topo: Topology | None = None
        self._producer: Producer | None = None
        self._conn: Any = None

    def stop(self) -> None:
        """Finish the message in hand, then leave (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> None:
        """Consume until ``stop()``; reconnects after broker outages."""
        while not self._stop.is_set():
            conn = connect(self.settings)
            try:
                with conn:
                    self._serve(conn)
            except (BrokerError, *conn.connection_errors) as exc:
                log.warning("broker connection lost (%s); reconnecting", exc)
                self._backoff()

    def _serve(self, conn) -> None:
        conn.ensure_connection(max_retries=1)
        self._topo = declare_topology(conn, self.settings, intake_queue=self.queue_name)
        self._failures = 0
        self._conn = conn
        self._producer = Producer(conn.channel())  # confirm mode comes from the connection
        channel = conn.channel()
        channel.auto_decode = False  # py-amqp would turn bodies with a content_encoding into str: keep bytes
        consumer = Consumer(channel, queues=[self._topo.intake_queue], on_message=self._on_message,
                            prefetch_count=self.prefetch, no_ack=False, auto_declare=False)
        log.info("consuming %s (quorum=%s)", self.queue_name, self._topo.quorum)
        with consumer:
            while not self._stop.is_set():
                try:
                    conn.drain_events(timeout=1.0)
                except TimeoutError:
                    conn.heartbeat_check()

    def _backoff(self) -> None:
        delay = min(self.settings.mes_retry_backoff * 2 ** self._failures, MAX_BACKOFF)
        self._failures += 1
        self._stop.wait(delay)

    def _on_message(self, message) -> None:
        try:
            outcome = self.handle(message)
        except (BrokerError, *self._conn.connection_errors):
            raise  # the connection is gone: run() reconnects and the broker redelivers
        except Exception as exc:  # a bug here must not stop the consumer: retry, bounded by the delivery limit
            log.exception("unexpected error handling a message")
            outcome = self._requeue(message, None, None, exc)
        self.counts[outcome.kind] += 1
        self.report(outcome)

    # --- one message ----------------------------------------------------------------------

    def handle(self, message) -> Outcome:
        rk = message.delivery_info.get("routing_key")
        headers = dict(message.headers or {})
        body = _body(message)
        req: FrameRequest | None = None
        try:
            try:
                req = parse_envelope(body, message.content_type, headers,
                                     max_inline_bytes=self.settings.mes_max_inline_bytes)
                kind, detail = self._process(req)
            except (InvalidMessage, ImageError, UnknownCategory) as exc:
                raise Refused(str(exc)) from exc
            except (Refused, *TRANSIENT):
                raise
            except Exception as exc:
                count = int(headers.get("x-delivery-count") or 0)
                if count < self.settings.mes_delivery_limit:
                    raise
                log.exception("message %s failed on its last delivery", _frame_id(req, message, body, headers))
                raise Refused(f"internal error on delivery {count + 1}: {type(exc).__name__}: {exc}") from exc
        except Refused as exc:
            return self._refuse(message, body, rk, _frame_id(req, message, body, headers), exc.reason)
        except Exception as exc:
            return self._requeue(message, rk, _frame_id(req, message, body, headers), exc)
        self._failures = 0
        message.ack()
        return Outcome(kind, req.frame_id, rk, detail)

    def _process(self, req: FrameRequest) -> tuple[str, str]:
        s = self.settings
        data = self._fetch(req)
        sha = sha256_hex(data)
        with self.orch.sessions() as ses:
            if not s.mes_register_lines and mes_repo.get_line(ses, req.line) is None:
                raise Refused(f"line {req.line!r} is not registered; add it with `inspect mes add-line {req.line}` "
                              "(or set INSPECT_MES_REGISTER_LINES=true)")
            seen = self._seen(ses, req, sha)
        if seen:
            return "duplicate", seen
        sub = self.orch.intake.submit(data, line=req.line, category=req.category, station=req.station,
                                      serial=req.serial, frame_id=req.frame_id, source="mes",
                                      strict=s.mes_strict_categories)
        if not sub.created:  # another consumer won the race for this frame id
            with self.orch.sessions() as ses:
                return "duplicate", self._seen(ses, req, sha) or f"already inspection={sub.inspection_id}"
        return "accepted", f"inspection={sub.inspection_id}"

    def _seen(self, ses, req: FrameRequest, sha: str) -> str | None:
        """None for a new frame id; a note for a true duplicate; Refused for a reused id."""
        insp = repo.get_inspection_by_frame(ses, req.frame_id)
        if insp is None:
            return None
        mine = (sha, req.line, req.station, req.category, req.serial)
        theirs = (insp.image_sha256, insp.line.name, insp.station, insp.category.name, insp.serial)
        if mine != theirs:
            fields = [n for n, a, b in zip(("image", "line", "station", "category", "serial"), mine, theirs,
                                           strict=True) if a != b]
            raise Refused(f"frame id {req.frame_id!r} was already used by inspection {insp.id} with a different "
                          f"{', '.join(fields)}: frame ids must be unique")
        return f"already inspection={insp.id}"

    def _fetch(self, req: FrameRequest) -> bytes:
        image = req.image
        if isinstance(image, InlineImage):
            return image.data
        s = self.settings
        if image.bucket is not None and (not s.s3_endpoint or image.bucket != s.s3_bucket):
            raise Refused(f"image uri names bucket {image.bucket!r}; this intake reads "
                          f"{'bucket ' + repr(s.s3_bucket) if s.s3_endpoint else 'a local object directory'}")
        try:
            data = self.orch.store.get_bytes(image.key)
        except ObjectNotFound:
            raise Refused(f"image object {image.key!r} not found in the object store") from None
        except ValueError as exc:  # the local store refuses keys that would leave its root
            raise Refused(f"image object key refused: {exc}") from None
        actual = sha256_hex(data)
        if actual != image.sha256:
            raise Refused(f"sha256 mismatch: object {image.key!r} hashes to {actual}, the message says {image.sha256}")
        return data

    # --- endings --------------------------------------------------------------------------

    def _refuse(self, message, body: bytes, rk: str | None, frame_id: str | None, reason: str) -> Outcome:
        """Record, dead-letter under confirms, then ack; if any step fails the message stays queued."""
        try:
            with self.orch.sessions.begin() as ses:
                mes_repo.record_rejection(ses, queue=self.queue_name, routing_key=rk, message_id=frame_id,
                                          reason=reason, headers=json_safe(message.headers or {}), body=body)
            self._dead_letter(message, body, rk, reason)
        except Exception as exc:
            return self._requeue(message, rk, frame_id, exc)
        log.info("refused %s: %s", frame_id, reason)
        self._failures = 0
        message.ack()
        return Outcome("rejected", frame_id, rk, reason)

    def _dead_letter(self, message, body: bytes, rk: str | None, reason: str) -> None:
        assert self._producer is not None and self._topo is not None
        if self._producer.channel is None or not self._producer.channel.is_open:
            self._producer = Producer(self._conn.channel())
        headers = {**(message.headers or {}), "x-reject-reason": reason[:4000], "x-reject-queue": self.queue_name}
        props = message.properties or {}
        try:
            self._producer.publish(
                body, exchange=self._topo.dead_letter_exchange, routing_key=rk or "unrouted",
                headers=headers, content_type=message.content_type or "application/octet-stream",
                content_encoding=message.content_encoding or "binary", delivery_mode=2, mandatory=True,
                message_id=props.get("message_id"), timeout=30,
            )
        except Exception:
            # A returned (unroutable) or timed-out publish leaves its confirm pending on the channel,
            # where the next publish would take it for its own: start over on a fresh channel.
            self._producer.channel.close()
            raise

    def _requeue(self, message, rk: str | None, frame_id: str | None, exc: BaseException) -> Outcome:
        detail = f"{type(exc).__name__}: {exc}"
        log.warning("frame %s not processed (%s); requeueing", frame_id, detail)
        self._backoff()
        message.requeue()
        return Outcome("requeued", frame_id, rk, detail)


def _body(message) -> bytes:
    body = message.body
    if isinstance(body, bytes):
        return body
    # py-amqp gives "" for an empty body, and str when a channel decodes by content_encoding.
    try:
        return str(body or "").encode(message.content_encoding or "utf-8")
    except (LookupError, UnicodeError):
        return str(body).encode("utf-8", "surrogateescape")


def _frame_id(req: FrameRequest | None, message, body: bytes, headers: dict[str, Any]) -> str | None:
    """The frame id for logs and rejection rows, best effort when the envelope did not parse."""
    if req is not None:
        return req.frame_id
    candidate = headers.get("x-frame-id") or (message.properties or {}).get("message_id")
    if candidate is None and len(body) <= 1 << 20:
        try:
            doc = json.loads(body)
            candidate = doc.get("id") if isinstance(doc, dict) else None
        except (ValueError, RecursionError):
            candidate = None
    if isinstance(candidate, bytes):
        candidate = candidate.decode("utf-8", "backslashreplace")
    return candidate[:256] if isinstance(candidate, str) else None
