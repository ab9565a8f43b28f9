"""Result events: one per finished inspection, on the ``results`` topic exchange.

Routing key ``line.<line>.<station>.<verdict>`` (verdict OK, NG or FAILED). The envelope follows
CloudEvents 1.0 (``id`` = inspection id, ``subject`` = part serial) with a versioned ``type``.
Published with publisher confirms after the verdict's commit; ``inspections.event_sent_at`` is
set afterwards, so a redelivered task re-sends only an event the broker never confirmed
(consumers can drop a repeat by ``id``). The embedded default (no broker) publishes nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from kombu import Exchange

from storage import job_repo, repo
from storage.db import utcnow
from storage.orm import Inspection, InspectionStatus
from workers.runtime import StageContext

log = logging.getLogger(__name__)
RESULTS = Exchange("results", type="topic", durable=True)
EVENT_VERSION = "v1"


def _key_part(value: str | None) -> str:
    # Topic routing keys use '.' as separator and '*'/'#' as wildcards: keep names out of that syntax.
    text = (value or "_").strip() or "_"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:64]


def routing_key(line: str, station: str | None, verdict: str) -> str:
    return f"line.{_key_part(line)}.{_key_part(station)}.{verdict}"


def build_event(s, insp: Inspection, store) -> dict[str, Any]:
    r = insp.result
    failed = insp.status == InspectionStatus.failed or r is None
    verdict = "FAILED" if failed else r.verdict.value
    runs = {st.stage: st for st in insp.stage_runs}
    objects: dict[str, Any] = {"image": {"key": insp.image_key, "url": store.url(insp.image_key)}}
    if r is not None:
        for name, key in (("anomaly_map", r.anomaly_map_key), ("overlay", r.overlay_key)):
            if key:
                objects[name] = {"key": key, "url": store.url(key)}
    boxes = [{"phrase": d.phrase, "score": d.score, "box": [d.x0, d.y0, d.x1, d.y1]}
             for d in job_repo.list_detections(s, insp.id) if d.kept]
    data: dict[str, Any] = {
        "inspection_id": insp.id, "frame_id": insp.frame_id, "serial": insp.serial, "line": insp.line.name,
        "station": insp.station, "category": insp.category.name, "status": insp.status.value, "verdict": verdict,
        "reason": insp.reason, "objects": objects, "boxes": boxes,
        "timings_ms": {k: v.duration_ms for k, v in runs.items()},
        "received_at": insp.created_at.isoformat() if insp.created_at else None,
        "finished_at": insp.finished_at.isoformat() if insp.finished_at else None,
    }
    if r is not None:
        data |= {
            "image_score": r.image_score, "threshold": r.threshold, "scores": r.scores,
            "defect_phrases": (r.scores or {}).get("phrases", []),
            "versions": {"model": r.model_name, "weights": r.weights_ref, "random_weights": r.random_weights,
                         "prompt_set_version": r.prompt_set_version, "bank_version": r.bank_version},
        }
    return {
        "specversion": "1.0", "id": insp.id, "type": f"inspect.{'failure' if failed else 'result'}.{EVENT_VERSION}",
        "source": f"inspect/line/{insp.line.name}/station/{insp.station or '_'}", "subject": insp.serial,
        "time": datetime.now(UTC).isoformat(), "datacontenttype": "application/json", "data": data,
    }


_apps: dict[str, Any] = {}


def _app_for(settings):
    """The Celery app (producer pool, confirm_publish) of this settings' broker; one per broker URL."""
    from workers.app import app, make_app

    if settings.broker_url == app.conf.broker_url:
        return app
    if settings.broker_url not in _apps:
        _apps[settings.broker_url] = make_app(settings)
    return _apps[settings.broker_url]


def publish_in(ctx: StageContext, s, insp: Inspection) -> bool:
    """Publish the terminal inspection's event inside the transaction that marks it sent.

    Called in the verdict's (or failure's) own transaction: the broker confirms the event before
    the commit, so once the verdict is visible its event is out. A worker killed between the
    confirm and the commit leaves neither verdict nor marker, and its redelivery publishes again:
    the one window for a repeated event (consumers drop repeats by ``id``).
    """
    if ctx.settings.embedded or insp.event_sent_at is not None:
        return False
    if insp.status not in (InspectionStatus.done, InspectionStatus.failed):
        return False
    s.flush()
    s.expire(insp, ["result", "stage_runs"])  # read what this transaction just wrote
    event = build_event(s, insp, ctx.store)
    key = routing_key(insp.line.name, insp.station, event["data"]["verdict"])
    with _app_for(ctx.settings).producer_or_acquire() as producer:  # confirm_publish applies
        producer.publish(event, exchange=RESULTS, routing_key=key, serializer="json", declare=[RESULTS],
                         delivery_mode=2, message_id=insp.id, headers={"type": event["type"]}, retry=True,
                         retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
    insp.event_sent_at = utcnow()
    s.flush()
    return True


def publish_event(ctx: StageContext, inspection_id: str) -> bool:
    """The event of an inspection that is terminal but unsent (a redelivery, a broker outage earlier)."""
    if ctx.settings.embedded:
        return False
    with ctx.sessions.begin() as s:
        insp = repo.get_inspection_for_stage(s, inspection_id)  # row lock: one publisher at a time
        return insp is not None and publish_in(ctx, s, insp)


def publish_after_commit(ctx: StageContext, inspection_id: str) -> None:
    """Publish, letting broker outages propagate (the task retries and the redelivery publishes);
    any other error is logged: the verdict is committed and must not be turned into a failure."""
    from kombu.exceptions import OperationalError as BrokerError

    try:
        publish_event(ctx, inspection_id)
    except (BrokerError, ConnectionError, TimeoutError):
        raise
    except Exception:
        log.exception("result event for %s not published", inspection_id)
