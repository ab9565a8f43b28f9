"""Sending stage chains after commit: by task name through the broker, or in-process.

The queue dispatcher never imports the stage code (or torch); it only names tasks. The inline
dispatcher is the embedded default: the same stage bodies, run one after another here.
"""

from __future__ import annotations

import logging
from typing import Protocol

from celery import chain

from common.settings import Settings
from orchestrator.planner import fold_finalize

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    def send(self, inspection_id: str, stages: list[str]) -> None: ...


class QueueDispatcher:
    def __init__(self, settings: Settings, on_error=None):
        from workers.app import TASK_NAMES, make_app  # Celery config only; no torch

        self.settings = settings
        self.app = make_app(settings)
        self.names = TASK_NAMES
        self.on_error = on_error

    def send(self, inspection_id: str, stages: list[str]) -> None:
        sigs = [
            self.app.signature(self.names[st], kwargs={"finalize": fin}, queue=self.settings.queue_for(st))
            for st, fin in fold_finalize(stages)
        ]
        sigs[0] = sigs[0].clone(args=(inspection_id,))
        try:
            chain(*sigs).apply_async()
        except Exception as exc:
            # The row is committed: record why it will never run instead of leaving it queued.
            if self.on_error is not None:
                self.on_error(inspection_id, f"could not enqueue: {type(exc).__name__}: {exc}")
            raise


class InlineDispatcher:
    """Runs the stages in this process (embedded default: no broker)."""

    def send(self, inspection_id: str, stages: list[str]) -> None:
        from workers import stages as stage_mod
        from workers.runtime import context

        ctx = context()
        for st, fin in fold_finalize(stages):
            if not stage_mod.execute(st, inspection_id, ctx, finalize=fin):
                break


def make_dispatcher(settings: Settings, on_error=None) -> Dispatcher:
    return InlineDispatcher() if settings.embedded else QueueDispatcher(settings, on_error)
