"""Task messages a quorum queue gave up on (delivery limit reached) become failed inspections.

A frame that crashes its worker on every delivery must not loop forever, nor vanish: RabbitMQ
dead-letters it to ``inspect.dlx`` after ``INSPECT_TASK_DELIVERY_LIMIT`` deliveries; this handler
marks the inspection (or bank, or job) failed with the reason and publishes the failure event.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from storage import bank_repo, job_repo, repo
from storage.orm import BankStatus, InspectionStatus, JobStatus

log = logging.getLogger(__name__)
FRAME_TASKS = {"inspect.segment", "inspect.logical", "inspect.localize", "inspect.finalize"}


def death_reason(headers: dict[str, Any]) -> str:
    deaths = headers.get("x-death") or []
    first = deaths[0] if deaths else {}
    queue = first.get("queue", "?")
    why = first.get("reason", "rejected")
    count = headers.get("x-delivery-count") or first.get("count")
    return f"dead-lettered by queue {queue} ({why}{f' after {count} deliveries' if count else ''})"


def task_target(body: Any, headers: dict[str, Any]) -> tuple[str, Any] | None:
    """(task name, first argument) of a Celery protocol-2 message, or None when it is not one."""
    task = headers.get("task")
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    if not task or not isinstance(body, list) or not body or not isinstance(body[0], list) or not body[0]:
        return None
    return task, body[0][0]


def handle_dead_task(orch, body: Any, headers: dict[str, Any]) -> str:
    """Record the failure on what the message was about; returns a line for the operator."""
    target = task_target(body, headers)
    reason = death_reason(headers)
    if target is None:
        return f"unrecognised dead letter: {reason}"
    task, arg = target
    with orch.sessions.begin() as s:
        if task in FRAME_TASKS:
            if repo.get_inspection(s, str(arg)) is None:
                return f"{task} {arg}: no such inspection ({reason})"
            repo.mark_inspection(s, str(arg), InspectionStatus.failed, reason=f"{task}: {reason}")
        elif task == "inspect.bank_build":
            bank = bank_repo.get_bank(s, int(arg))
            if bank is not None and bank.status == BankStatus.building:
                bank_repo.finish_bank(s, bank, status=BankStatus.failed, error=reason)
        else:
            job = job_repo.get_job(s, str(arg))
            if job is not None and job.status in (JobStatus.queued, JobStatus.running):
                job_repo.finish_job(s, job, error=reason)
    if task in FRAME_TASKS and not orch.settings.embedded:
        from workers.events import publish_event  # no torch: events only read the database

        publish_event(_ctx(orch), str(arg))
    return f"{task} {arg}: failed, {reason}"


def _ctx(orch):
    from workers.runtime import StageContext

    return StageContext(orch.settings, orch.sessions, orch.store)


def drain(orch, connection, limit: int | None = None, timeout: float = 1.0) -> list[str]:
    """Handle the dead letters waiting now (ack each after its failure is recorded)."""
    from workers.app import dead_letter_queue

    lines: list[str] = []
    queue = dead_letter_queue()(connection.default_channel)
    queue.declare()
    while limit is None or len(lines) < limit:
        msg = queue.get(no_ack=False, accept=["json"])
        if msg is None:
            break
        try:
            lines.append(handle_dead_task(orch, msg.body, dict(msg.headers or {})))
        except Exception:
            msg.requeue()  # e.g. the database is down: keep it for the next pass
            raise
        msg.ack()
    return lines
