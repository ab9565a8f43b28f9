"""Sending stage chains after commit: by task name through the broker, or in-process.

The queue dispatcher never imports the stage code (or torch); it only names tasks. The inline
dispatcher is the embedded default: the same stage bodies, run one after another here.
"""

from __future__ import annotations

import logging
from typing import Protocol

from celery import chain

from common.settings import Settings
from orchestrator.planner import plan_messages

log = logging.getLogger(__name__)
ENQUEUE_FAILED = "could not enqueue"  # reason prefix: such a frame is sent again when resubmitted


class Dispatcher(Protocol):
    def send(self, inspection_id: str, stages: list[str]) -> None: ...

    def send_bank(self, bank_id: int) -> None: ...

    def send_job(self, job_id: str, kind: str) -> None: ...


class QueueDispatcher:
    def __init__(self, settings: Settings, on_error=None):
        from workers.app import TASK_NAMES, make_app  # Celery config only; no torch

        self.settings = settings
        self.app = make_app(settings)
        self._declared = False
        self.names = TASK_NAMES
        self.on_error = on_error

    def send(self, inspection_id: str, stages: list[str]) -> None:
        sigs = [
            self.app.signature(self.names[m.stage], queue=m.queue,
                               kwargs={"finalize": m.finalize, "with_stages": list(m.with_stages)})
            for m in plan_messages(stages, self.settings.queue_for)
        ]
        sigs[0] = sigs[0].clone(args=(inspection_id,))
        try:
            self._declare()
            chain(*sigs).apply_async()
        except Exception as exc:
            # The row is committed: record why it will never run instead of leaving it queued.
            if self.on_error is not None:
                self.on_error(inspection_id, f"{ENQUEUE_FAILED}: {type(exc).__name__}: {exc}")
            raise


    def _declare(self) -> None:
        if not self._declared:  # once per process: the dead-letter queue must exist before any message
            from workers.app import declare_dead_letters

            with self.app.connection_for_write() as conn:
                declare_dead_letters(conn)
            self._declared = True

    def send_bank(self, bank_id: int) -> None:
        self._declare()
        self.app.send_task(self.names["bank"], args=(bank_id,), queue=self.settings.queue_for("bank"))

    def send_job(self, job_id: str, kind: str) -> None:
        self._declare()
        self.app.send_task(self.names[kind], args=(job_id,), queue=self.settings.queue_for(kind))


class InlineDispatcher:
    """Runs the stages in this process (embedded default: no broker)."""

    def send(self, inspection_id: str, stages: list[str]) -> None:
        from workers import stages as stage_mod
        from workers.runtime import context

        ctx = context()
        for m in plan_messages(stages, lambda _stage: "inline"):
            if not stage_mod.execute(m.stage, inspection_id, ctx, m.finalize, m.with_stages):
                break


    def send_bank(self, bank_id: int) -> None:
        from workers.banks import build_bank, record_bank_failure
        from workers.runtime import context

        ctx = context()
        try:
            build_bank(bank_id, ctx)
        except Exception as exc:  # recorded on the bank row, like the queued task does
            record_bank_failure(ctx, bank_id, f"{type(exc).__name__}: {exc}")


    def send_job(self, job_id: str, kind: str) -> None:
        from workers.jobs import run_job_inline
        from workers.runtime import context

        run_job_inline(kind, job_id, context())


def make_dispatcher(settings: Settings, on_error=None) -> Dispatcher:
    return InlineDispatcher() if settings.embedded else QueueDispatcher(settings, on_error)
