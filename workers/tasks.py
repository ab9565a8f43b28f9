"""Celery glue: thin tasks that call the stage bodies in ``workers.stages`` / ``workers.banks``.

Transient infrastructure errors (database, object store, network) are retried with
exponential backoff; anything else is recorded on the inspection (or bank) and the chain stops.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Task
from celery.exceptions import Ignore

from workers import banks, stages
from workers.app import TASK_NAMES, app
from workers.runtime import context

MAX_RETRIES = 8


def _guard(task: Task, run: Callable[[], object], fail: Callable[[str], None], what: str,
           transient: tuple[type[BaseException], ...] = stages.TRANSIENT) -> None:
    try:
        run()
    except transient as exc:
        if task.request.retries >= MAX_RETRIES:
            fail(f"infrastructure unavailable: {exc}")
            raise Ignore() from exc
        raise task.retry(exc=exc, countdown=min(2 ** task.request.retries, 30)) from exc
    except stages.StageFailed as exc:
        fail(str(exc))
        raise Ignore() from exc
    except Exception as exc:  # model/code error: recorded, the worker keeps running
        stages.log.exception("%s failed", what)
        fail(f"{type(exc).__name__}: {exc}")
        raise Ignore() from exc


def _frame(task: Task, stage: str, inspection_id: str, finalize: bool, with_stages: list[str]) -> str:
    ctx = context()
    _guard(
        task,
        lambda: stages.STAGES[stage](inspection_id, ctx, finalize=finalize, with_stages=tuple(with_stages)),
        lambda reason: stages.record_failure(ctx, inspection_id, stage, reason),
        f"stage {stage} for {inspection_id}",
    )
    return inspection_id


@app.task(name=TASK_NAMES["segment"], bind=True, max_retries=MAX_RETRIES)
def segment(self: Task, inspection_id: str, finalize: bool = False, with_stages: list[str] | None = None) -> str:
    return _frame(self, "segment", inspection_id, finalize, with_stages or [])


@app.task(name=TASK_NAMES["localize"], bind=True, max_retries=MAX_RETRIES)
def localize(self: Task, inspection_id: str, finalize: bool = False, with_stages: list[str] | None = None) -> str:
    return _frame(self, "localize", inspection_id, finalize, with_stages or [])


@app.task(name=TASK_NAMES["logical"], bind=True, max_retries=MAX_RETRIES)
def logical(self: Task, inspection_id: str, finalize: bool = False, with_stages: list[str] | None = None) -> str:
    return _frame(self, "logical", inspection_id, finalize, with_stages or [])


@app.task(name=TASK_NAMES["finalize"], bind=True, max_retries=MAX_RETRIES)
def finalize(self: Task, inspection_id: str, finalize: bool = True, with_stages: list[str] | None = None) -> str:
    return _frame(self, "finalize", inspection_id, True, [])


@app.task(name=TASK_NAMES["bank"], bind=True, max_retries=MAX_RETRIES)
def bank_build(self: Task, bank_id: int) -> int:
    ctx = context()
    _guard(self, lambda: banks.build_bank(bank_id, ctx), lambda r: banks.record_bank_failure(ctx, bank_id, r),
           f"bank {bank_id}")
    return bank_id


@app.task(name=TASK_NAMES["describe"], bind=True, max_retries=MAX_RETRIES)
def describe(self: Task, job_id: str) -> str:
    """LLM defect descriptions; an unreachable or overloaded LLM endpoint is retried with backoff."""
    from workers.jobs import job_body
    from workers.llm.base import LLMUnavailable

    ctx = context()
    run, fail = job_body("describe")
    _guard(self, lambda: run(job_id, ctx), lambda r: fail(ctx, job_id, r), f"describe {job_id}",
           transient=(*stages.TRANSIENT, LLMUnavailable))
    return job_id
