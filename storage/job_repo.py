"""Queries for background jobs (not frames): created by the CLI, run by a task, waited on by id."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from storage.db import utcnow
from storage.orm import Detection, Job, JobStatus


def create_job(s: Session, kind: str, params: dict[str, Any]) -> Job:
    job = Job(id=str(uuid.uuid4()), kind=kind, status=JobStatus.queued, params=params, attempts=0)
    s.add(job)
    s.flush()
    return job


def get_job(s: Session, job_id: str) -> Job | None:
    return s.get(Job, job_id)


def start_job(s: Session, job: Job) -> None:
    job.status = JobStatus.running
    job.attempts += 1
    s.flush()


def finish_job(s: Session, job: Job, *, result: dict[str, Any] | None = None, error: str | None = None) -> None:
    """Terminal: done with a result, or failed with the reason."""
    job.status = JobStatus.failed if error else JobStatus.done
    job.result = result
    job.error = error[:4000] if error else None
    job.finished_at = utcnow()
    s.flush()


def replace_detections(s: Session, inspection_id: str, rows: list[dict[str, Any]]) -> list[Detection]:
    """The inspection's boxes, replaced as a whole so a redelivered localize stage stays idempotent."""
    s.query(Detection).filter(Detection.inspection_id == inspection_id).delete()
    out = [Detection(inspection_id=inspection_id, **r) for r in rows]
    s.add_all(out)
    s.flush()
    return out


def list_detections(s: Session, inspection_id: str) -> list[Detection]:
    return list(s.query(Detection).filter(Detection.inspection_id == inspection_id).order_by(Detection.rank))
