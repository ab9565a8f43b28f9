"""Jobs that are not frames (LLM descriptions): body lookup and failure recording by kind."""

from __future__ import annotations

import logging
from collections.abc import Callable

from workers.runtime import StageContext

log = logging.getLogger(__name__)


def job_body(kind: str) -> tuple[Callable[[str, StageContext], object], Callable[[StageContext, str, str], None]]:
    """(run, record_failure) for a job kind; imported lazily so workers load only what they run."""
    if kind == "describe":
        from workers.describe import record_describe_failure, run_describe

        return run_describe, record_describe_failure
    raise ValueError(f"unknown job kind {kind!r}")


def run_job_inline(kind: str, job_id: str, ctx: StageContext) -> None:
    """Embedded default: run now; every failure ends on the job row with its reason."""
    run, fail = job_body(kind)
    try:
        run(job_id, ctx)
    except Exception as exc:
        log.warning("job %s (%s) failed: %s", job_id, kind, exc)
        fail(ctx, job_id, str(exc) if exc.__class__.__name__ == "StageFailed" else f"{type(exc).__name__}: {exc}")
