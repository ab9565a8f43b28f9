"""Wiring for one orchestrator process: settings, sessions, object store, dispatcher."""

from __future__ import annotations

from dataclasses import dataclass

from common.settings import Settings, get_settings
from orchestrator.dispatch import make_dispatcher
from orchestrator.service import Intake
from storage import repo
from storage.db import ensure_schema, session_factory
from storage.objects import ObjectStore, open_store
from storage.orm import InspectionStatus


@dataclass
class Orchestrator:
    settings: Settings
    sessions: object
    store: ObjectStore
    intake: Intake


def open_orchestrator(settings: Settings | None = None) -> Orchestrator:
    s = settings or get_settings()
    url = s.resolved_database_url
    if url.startswith("sqlite"):
        ensure_schema(url)  # the embedded default creates and upgrades its own database
    sessions = session_factory(url)
    store = open_store(s)

    def enqueue_failed(inspection_id: str, reason: str) -> None:
        with sessions.begin() as session:
            repo.mark_inspection(session, inspection_id, InspectionStatus.failed, reason=reason)

    intake = Intake(s, sessions, store, make_dispatcher(s, on_error=enqueue_failed))
    return Orchestrator(s, sessions, store, intake)
