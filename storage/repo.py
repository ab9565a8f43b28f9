"""Every query the application runs. Functions take a Session and never commit: the caller
owns the transaction (tasks are sent only after the caller commits).

Inserts that can race between processes (frames redelivered by the broker, two workers on one
stage) run inside a SAVEPOINT: on a unique violation only the savepoint is rolled back and the
winner's row is returned, so the caller's transaction stays usable on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from storage.db import utcnow
from storage.orm import (
    Category,
    Inspection,
    InspectionStatus,
    Line,
    ModelWeights,
    PromptSet,
    Result,
    StageRun,
    StageStatus,
    Verdict,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_TERMINAL = {InspectionStatus.done, InspectionStatus.failed}
_RESULT_FIELDS = frozenset(c.key for c in Result.__table__.columns) - {"id", "inspection_id"}


def _insert_or_get(s: Session, obj: T, refetch: Callable[[], T | None]) -> tuple[T, bool]:
    """Insert ``obj`` in a savepoint; if a concurrent insert won, return the existing row."""
    try:
        with s.begin_nested():
            s.add(obj)
    except IntegrityError:
        existing = refetch()
        if existing is None:  # a different constraint failed (e.g. a foreign key)
            raise
        return existing, False
    return obj, True


# --- lines and categories ---------------------------------------------------------------


def get_or_create_line(s: Session, name: str) -> Line:
    def find() -> Line | None:
        return s.scalars(select(Line).where(Line.name == name)).one_or_none()

    return find() or _insert_or_get(s, Line(name=name), find)[0]


def get_category(s: Session, name: str) -> Category | None:
    return s.scalars(select(Category).where(Category.name == name)).one_or_none()


def list_categories(s: Session) -> list[Category]:
    return list(s.scalars(select(Category).order_by(Category.name)))


def _check_threshold(threshold: float) -> float:
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return float(threshold)


def create_category(
    s: Session,
    name: str,
    *,
    threshold: float,
    prompt_content: dict[str, Any],
    rvs_method: str,
    rvs_params: dict[str, Any],
    provenance: dict[str, Any],
    auto_registered: bool,
    pipeline: dict[str, Any] | None = None,
) -> Category:
    """A new category with prompt set version 1 active. A duplicate name raises
    ``IntegrityError`` with the caller's transaction still usable."""
    category = Category(
        name=name,
        threshold=_check_threshold(threshold),
        pipeline=pipeline or {},
        auto_registered=auto_registered,
    )
    with s.begin_nested():
        s.add(category)
    add_prompt_set(
        s,
        category,
        content=prompt_content,
        rvs_method=rvs_method,
        rvs_params=rvs_params,
        provenance=provenance,
        activate=True,
    )
    return category


def set_category_fields(
    s: Session,
    category: Category,
    *,
    threshold: float | None = None,
    active_prompt_version: int | None = None,
    score_norm: dict[str, Any] | None = None,
    pipeline: dict[str, Any] | None = None,
) -> Category:
    """Update the given fields; ``None`` leaves a field unchanged."""
    if threshold is not None:
        category.threshold = _check_threshold(threshold)
    if active_prompt_version is not None:
        prompt_set = s.scalars(
            select(PromptSet).where(
                PromptSet.category_id == category.id, PromptSet.version == active_prompt_version
            )
        ).one_or_none()
        if prompt_set is None:
            known = [p.version for p in list_prompt_sets(s, category)]
            raise ValueError(
                f"category {category.name!r} has no prompt set version {active_prompt_version}"
                f" (versions: {known})"
            )
        category.active_prompt_set = prompt_set
    if score_norm is not None:
        category.score_norm = score_norm
    if pipeline is not None:
        category.pipeline = pipeline
    s.flush()
    return category


# --- prompt sets -------------------------------------------------------------------------


def prompt_set_sha256(content: dict[str, Any], rvs_method: str, rvs_params: dict[str, Any]) -> str:
    """Hash of the canonical JSON of what determines the text features (not provenance)."""
    payload = {"content": content, "rvs_method": rvs_method, "rvs_params": rvs_params}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def add_prompt_set(
    s: Session,
    category: Category,
    *,
    content: dict[str, Any],
    rvs_method: str,
    rvs_params: dict[str, Any],
    provenance: dict[str, Any],
    kind: str = "sdp",
    activate: bool = False,
) -> PromptSet:
    """Append the next version for ``category``; the category row lock serialises writers."""
    s.flush()
    s.execute(select(Category.id).where(Category.id == category.id).with_for_update())
    latest = s.scalar(select(func.max(PromptSet.version)).where(PromptSet.category_id == category.id))
    prompt_set = PromptSet(
        category_id=category.id,
        version=(latest or 0) + 1,
        kind=kind,
        content=content,
        rvs_method=rvs_method,
        rvs_params=rvs_params,
        provenance=provenance,
        sha256=prompt_set_sha256(content, rvs_method, rvs_params),
    )
    s.add(prompt_set)
    s.flush()
    if activate:
        category.active_prompt_set = prompt_set
        s.flush()
    return prompt_set


def list_prompt_sets(s: Session, category: Category) -> list[PromptSet]:
    stmt = select(PromptSet).where(PromptSet.category_id == category.id)
    return list(s.scalars(stmt.order_by(PromptSet.version)))


def get_prompt_set(s: Session, prompt_set_id: int) -> PromptSet | None:
    return s.get(PromptSet, prompt_set_id)


# --- inspections -------------------------------------------------------------------------


def get_inspection(s: Session, inspection_id: str) -> Inspection | None:
    return s.get(Inspection, inspection_id)


def get_inspection_for_stage(s: Session, inspection_id: str) -> Inspection | None:
    """The inspection locked for update, with its category, active prompt set and stage runs
    loaded in one round trip (the per-frame hot path of every stage)."""
    stmt = (
        select(Inspection)
        .where(Inspection.id == inspection_id)
        .options(
            joinedload(Inspection.category).joinedload(Category.active_prompt_set),
            joinedload(Inspection.stage_runs),
        )
        .with_for_update(of=Inspection)
        .execution_options(populate_existing=True)
    )
    return s.scalars(stmt).unique().one_or_none()


def get_inspection_by_frame(s: Session, frame_id: str) -> Inspection | None:
    return s.scalars(select(Inspection).where(Inspection.frame_id == frame_id)).one_or_none()


def create_inspection(
    s: Session,
    *,
    frame_id: str,
    line: Line,
    station: str | None,
    category: Category,
    serial: str | None,
    image_key: str,
    image_sha256: str,
    content_type: str,
    width: int,
    height: int,
    source: str = "cli",
) -> tuple[Inspection, bool]:
    """Record a frame once: ``(inspection, created)``; a known frame_id returns the first row."""
    existing = get_inspection_by_frame(s, frame_id)
    if existing is not None:
        return existing, False
    inspection = Inspection(
        id=str(uuid.uuid4()),
        frame_id=frame_id,
        line_id=line.id,
        station=station,
        category_id=category.id,
        serial=serial,
        source=source,
        image_key=image_key,
        image_sha256=image_sha256,
        content_type=content_type,
        width=width,
        height=height,
        status=InspectionStatus.queued,
    )
    return _insert_or_get(s, inspection, lambda: get_inspection_by_frame(s, frame_id))


def _locked(s: Session, model: type[T], *where: Any) -> T | None:
    """Fresh row under ``SELECT ... FOR UPDATE`` (a no-op on SQLite, which locks the file)."""
    stmt = select(model).where(*where).with_for_update()
    return s.scalars(stmt.execution_options(populate_existing=True)).one_or_none()


def mark_inspection(
    s: Session,
    inspection_id: str,
    status: InspectionStatus,
    reason: str | None = None,
    *,
    locked: Inspection | None = None,
) -> None:
    """Move an inspection forward. done and failed are final: later marks are ignored, so a
    redelivered or late stage can never reopen or flip a verdict. ``locked``: the row already
    read FOR UPDATE in this transaction (saves a round trip)."""
    inspection = locked if locked is not None else _locked(s, Inspection, Inspection.id == inspection_id)
    if inspection is None:
        log.warning("mark_inspection: unknown inspection %s", inspection_id)
        return
    current = inspection.status
    if current in _TERMINAL or current == status:
        return
    if status == InspectionStatus.queued:  # never backwards
        return
    now = utcnow()
    inspection.status = status
    if status == InspectionStatus.running:
        inspection.started_at = now
    else:
        inspection.started_at = inspection.started_at or now
        inspection.finished_at = now
    if reason is not None:
        inspection.reason = reason
    s.flush()


# --- stage runs --------------------------------------------------------------------------


def get_stage_run(s: Session, inspection_id: str, stage: str) -> StageRun | None:
    stmt = select(StageRun).where(StageRun.inspection_id == inspection_id, StageRun.stage == stage)
    return s.scalars(stmt).one_or_none()


def upsert_stage_run(
    s: Session,
    inspection_id: str,
    stage: str,
    *,
    status: StageStatus,
    duration_ms: float | None = None,
    error: str | None = None,
    output: dict[str, Any] | None = None,
    worker: str | None = None,
) -> StageRun:
    """One row per (inspection, stage). Writing ``running`` onto an existing row starts a new
    attempt (retry, redelivery after a lost worker, or re-run) and increments ``attempts``."""
    where = (StageRun.inspection_id == inspection_id, StageRun.stage == stage)
    run = _locked(s, StageRun, *where)
    if run is None:
        run, created = _insert_or_get(
            s,
            StageRun(
                inspection_id=inspection_id,
                stage=stage,
                status=status,
                attempts=1,
                started_at=utcnow(),
            ),
            lambda: _locked(s, StageRun, *where),
        )
        if created:
            _apply_stage_fields(run, status, duration_ms, error, output, worker)
            s.flush()
            return run
    if status == StageStatus.running:
        run.attempts += 1
        run.started_at = utcnow()
    _apply_stage_fields(run, status, duration_ms, error, output, worker)
    s.flush()
    return run


def _apply_stage_fields(
    run: StageRun,
    status: StageStatus,
    duration_ms: float | None,
    error: str | None,
    output: dict[str, Any] | None,
    worker: str | None,
) -> None:
    run.status = status
    if status == StageStatus.running:
        run.finished_at = None
        run.duration_ms = duration_ms
        run.error = error
    else:
        run.finished_at = utcnow()
        if duration_ms is not None:
            run.duration_ms = duration_ms
        run.error = error
    if output is not None:
        run.output = output
    if worker is not None:
        run.worker = worker


# --- results -----------------------------------------------------------------------------


def upsert_result(s: Session, inspection_id: str, **fields: Any) -> Result:
    """Insert or update the inspection's single result row with ``fields`` (column names)."""
    unknown = set(fields) - _RESULT_FIELDS
    if unknown:
        raise TypeError(f"upsert_result: unknown fields {sorted(unknown)}")

    def find() -> Result | None:
        return _locked(s, Result, Result.inspection_id == inspection_id)

    result = find()
    if result is None:
        result, created = _insert_or_get(s, Result(inspection_id=inspection_id, **fields), find)
        if created:
            s.flush()
            return result
    for name, value in fields.items():
        setattr(result, name, value)
    s.flush()
    return result


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def list_results(
    s: Session,
    *,
    line: str | None = None,
    category: str | None = None,
    since: datetime | None = None,
    verdict: str | None = None,
    limit: int = 100,
) -> list[tuple[Inspection, Result | None]]:
    """Newest inspections first, each with its result (None while pending or after failure).

    A naive ``since`` is taken as UTC. Line and category are loaded with the rows so callers
    can print them after the session closes.
    """
    stmt = (
        select(Inspection, Result)
        .outerjoin(Result, Result.inspection_id == Inspection.id)
        .options(joinedload(Inspection.line), joinedload(Inspection.category))
        .order_by(Inspection.created_at.desc(), Inspection.id.desc())
        .limit(limit)
    )
    if line is not None:
        stmt = stmt.where(Inspection.line.has(Line.name == line))
    if category is not None:
        stmt = stmt.where(Inspection.category.has(Category.name == category))
    if since is not None:
        stmt = stmt.where(Inspection.created_at >= _as_utc(since))
    if verdict is not None:
        stmt = stmt.where(Result.verdict == Verdict(verdict.upper()))
    return [(row[0], row[1]) for row in s.execute(stmt)]


# --- model registry ----------------------------------------------------------------------


def get_weights(s: Session, name: str) -> ModelWeights | None:
    return s.scalars(select(ModelWeights).where(ModelWeights.name == name)).one_or_none()


def list_weights(s: Session) -> list[ModelWeights]:
    return list(s.scalars(select(ModelWeights).order_by(ModelWeights.name)))


def register_weights(
    s: Session,
    *,
    name: str,
    arch: str,
    tag: str | None,
    sha256: str,
    object_key: str,
    size_bytes: int,
) -> ModelWeights:
    """Register or replace the weights known as ``name``."""
    values = {
        "arch": arch,
        "tag": tag,
        "sha256": sha256,
        "object_key": object_key,
        "size_bytes": size_bytes,
    }
    weights = get_weights(s, name)
    if weights is None:
        weights, created = _insert_or_get(s, ModelWeights(name=name, **values), lambda: get_weights(s, name))
        if created:
            s.flush()
            return weights
    for key, value in values.items():
        setattr(weights, key, value)
    s.flush()
    return weights


def reopen_unsent(s: Session, inspection_id: str, reason_prefix: str) -> bool:
    """Back to queued an inspection that failed only because its stages were never enqueued (the broker
    refused the send after the commit), so a resubmitted frame is sent again instead of staying failed."""
    insp = _locked(s, Inspection, Inspection.id == inspection_id)
    if insp is None or insp.status != InspectionStatus.failed or not (insp.reason or "").startswith(reason_prefix):
        return False
    if insp.stage_runs:  # a stage ran: this is a real failure, not a lost send
        return False
    insp.status, insp.reason, insp.finished_at = InspectionStatus.queued, None, None
    s.flush()
    return True
