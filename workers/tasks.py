"""Celery glue: thin tasks that call the stage bodies in ``workers.stages``.

Transient infrastructure errors (database, object store, network) are retried with
exponential backoff; anything else is recorded on the inspection and the chain stops.
"""

from __future__ import annotations

from celery import Task
from celery.exceptions import Ignore

from workers import stages
from workers.app import TASK_NAMES, app
from workers.runtime import context

MAX_RETRIES = 8


def _run(task: Task, stage: str, inspection_id: str, finalize: bool) -> str:
    ctx = context()
    try:
        stages.STAGES[stage](inspection_id, ctx, finalize=finalize)
    except stages.TRANSIENT as exc:
        if task.request.retries >= MAX_RETRIES:
            stages.record_failure(ctx, inspection_id, stage, f"infrastructure unavailable: {exc}")
            raise Ignore() from exc
        raise task.retry(exc=exc, countdown=min(2 ** task.request.retries, 30)) from exc
    except stages.StageFailed as exc:
        stages.record_failure(ctx, inspection_id, stage, str(exc))
        raise Ignore() from exc
    except Exception as exc:  # model/code error: recorded, the worker keeps running
        stages.log.exception("stage %s failed for %s", stage, inspection_id)
        stages.record_failure(ctx, inspection_id, stage, f"{type(exc).__name__}: {exc}")
        raise Ignore() from exc
    return inspection_id


@app.task(name=TASK_NAMES["segment"], bind=True, max_retries=MAX_RETRIES)
def segment(self: Task, inspection_id: str, finalize: bool = False) -> str:
    return _run(self, "segment", inspection_id, finalize)


@app.task(name=TASK_NAMES["finalize"], bind=True, max_retries=MAX_RETRIES)
def finalize(self: Task, inspection_id: str, finalize: bool = True) -> str:
    return _run(self, "finalize", inspection_id, finalize)
