"""Repository behaviour against real PostgreSQL (rolled back per test) and once on SQLite."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage import repo
from storage.db import ensure_schema, session_factory, session_scope
from storage.orm import (
    Category,
    Inspection,
    InspectionStatus,
    Line,
    Result,
    StageRun,
    StageStatus,
    Verdict,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
PROMPTS = {"normal_states": ["flawless"], "abnormal_states": ["cracked"], "templates": ["a {}"]}


def _category(s: Session, name: str = "bottle", threshold: float = 0.5) -> Category:
    return repo.create_category(
        s,
        name,
        threshold=threshold,
        prompt_content=PROMPTS,
        rvs_method="mean",
        rvs_params={},
        provenance={"source": "test"},
        auto_registered=False,
    )


def _inspect(s: Session, line: Line, category: Category, frame: str | None = None) -> tuple[Inspection, bool]:
    return repo.create_inspection(
        s,
        frame_id=frame or uuid.uuid4().hex,
        line=line,
        station="st1",
        category=category,
        serial="SN1",
        image_key="images/sha256/ab/ab.png",
        image_sha256="ab" * 32,
        content_type="image/png",
        width=64,
        height=48,
    )


def _result_fields(verdict: Verdict, score: float = 0.7) -> dict[str, object]:
    return {
        "image_score": score,
        "verdict": verdict,
        "threshold": 0.5,
        "scores": {"cls": score},
        "model_name": "ViT-B-16-plus-240",
        "weights_ref": "laion400m_e31",
    }


def _count(s: Session, model: type) -> int:
    return s.scalar(select(func.count()).select_from(model)) or 0


def test_create_inspection_is_idempotent_on_frame_id(pg_session: Session) -> None:
    line = repo.get_or_create_line(pg_session, "L1")
    assert repo.get_or_create_line(pg_session, "L1").id == line.id
    category = _category(pg_session)
    first, created = _inspect(pg_session, line, category, frame="frame-1")
    again, created_again = _inspect(pg_session, line, category, frame="frame-1")
    assert (created, created_again) == (True, False)
    assert again.id == first.id
    uuid.UUID(first.id)
    assert first.status == InspectionStatus.queued
    assert _count(pg_session, Inspection) == 1
    assert repo.get_inspection_by_frame(pg_session, "frame-1").id == first.id  # type: ignore[union-attr]
    assert repo.get_inspection(pg_session, first.id) is first


def _blocked_then_released(first: Session, second: Callable[[Session], T], factory: Any) -> T:
    """Run ``second`` in a new session while ``first`` holds uncommitted work, then commit
    ``first``; ``second`` must have been blocked until then. Returns what ``second`` returned."""
    out: list[T] = []

    def contender() -> None:
        with factory() as s:
            out.append(second(s))
            s.commit()  # its transaction survived the unique violation

    thread = threading.Thread(target=contender)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive(), "the second writer should wait on the first one's row"
    first.commit()
    thread.join(10)
    assert out, "the second writer failed"
    return out[0]


def test_concurrent_inserts_return_the_winner(pg_fresh_url: str) -> None:
    factory = session_factory(pg_fresh_url)
    with session_scope(pg_fresh_url) as s:
        line_id, category_id = repo.get_or_create_line(s, "L1").id, _category(s).id

    def submit(s: Session) -> tuple[Inspection, bool]:
        line, category = s.get(Line, line_id), s.get(Category, category_id)
        assert line is not None and category is not None
        return _inspect(s, line, category, frame="frame-1")

    def start_stage(s: Session) -> int:
        return repo.upsert_stage_run(s, iid, "segment", status=StageStatus.running).attempts

    with factory() as a:
        winner, created = submit(a)
        loser, created_b = _blocked_then_released(a, submit, factory)
    assert created and not created_b and loser.id == winner.id
    iid = winner.id
    with factory() as a:
        assert repo.upsert_stage_run(a, iid, "segment", status=StageStatus.running).attempts == 1
        assert _blocked_then_released(a, start_stage, factory) == 2
    with session_scope(pg_fresh_url) as s:
        assert _count(s, Inspection) == 1 and _count(s, StageRun) == 1


def test_prompt_set_versions_and_hash(pg_session: Session) -> None:
    category = _category(pg_session)
    v1 = category.active_prompt_set
    assert v1 is not None and v1.version == 1 and v1.kind == "sdp"
    reordered = dict(reversed(list(PROMPTS.items())))
    v2 = repo.add_prompt_set(
        pg_session,
        category,
        content=reordered,
        rvs_method="mean",
        rvs_params={},
        provenance={"source": "llm", "model": "x"},
    )
    assert v2.version == 2 and category.active_prompt_set_id == v1.id
    # The hash covers what determines text features: not key order, not provenance.
    assert v2.sha256 == v1.sha256
    v3 = repo.add_prompt_set(
        pg_session,
        category,
        content={**PROMPTS, "abnormal_states": ["cracked", "dented"]},
        rvs_method="sdp",
        rvs_params={"k": 2},
        provenance={},
        kind="sdp+",
        activate=True,
    )
    assert v3.version == 3 and v3.sha256 != v1.sha256
    assert category.active_prompt_set_id == v3.id
    assert [p.version for p in repo.list_prompt_sets(pg_session, category)] == [1, 2, 3]
    assert repo.get_prompt_set(pg_session, v2.id) is v2
    # Versions count per category.
    other = _category(pg_session, "screw")
    assert other.active_prompt_set is not None and other.active_prompt_set.version == 1
    assert [c.name for c in repo.list_categories(pg_session)] == ["bottle", "screw"]
    assert repo.get_category(pg_session, "screw") is other
    assert repo.get_category(pg_session, "nope") is None


def test_set_category_fields(pg_session: Session) -> None:
    category = _category(pg_session)
    repo.add_prompt_set(
        pg_session, category, content=PROMPTS, rvs_method="mean", rvs_params={}, provenance={}
    )
    repo.set_category_fields(
        pg_session,
        category,
        threshold=0.8,
        active_prompt_version=2,
        score_norm={"cls": [0.1, 0.9]},
        pipeline={"stages": ["segment"]},
    )
    pg_session.expire_all()
    fresh = repo.get_category(pg_session, "bottle")
    assert fresh is not None and fresh.threshold == 0.8
    assert fresh.active_prompt_set is not None and fresh.active_prompt_set.version == 2
    assert fresh.score_norm == {"cls": [0.1, 0.9]}
    assert fresh.pipeline == {"stages": ["segment"]}
    with pytest.raises(ValueError, match=r"no prompt set version 7 \(versions: \[1, 2\]\)"):
        repo.set_category_fields(pg_session, fresh, active_prompt_version=7)
    with pytest.raises(ValueError, match="finite"):
        repo.set_category_fields(pg_session, fresh, threshold=float("nan"))
    assert fresh.threshold == 0.8


def test_duplicate_category_leaves_transaction_usable(pg_session: Session) -> None:
    _category(pg_session)
    with pytest.raises(IntegrityError):
        _category(pg_session)
    assert [c.name for c in repo.list_categories(pg_session)] == ["bottle"]


def test_upsert_stage_run_is_keyed_and_counts_attempts(pg_session: Session) -> None:
    inspection, _ = _inspect(pg_session, repo.get_or_create_line(pg_session, "L1"), _category(pg_session))
    iid = inspection.id
    run = repo.upsert_stage_run(pg_session, iid, "segment", status=StageStatus.running, worker="w1")
    assert (run.attempts, run.status, run.finished_at) == (1, StageStatus.running, None)
    run = repo.upsert_stage_run(
        pg_session, iid, "segment", status=StageStatus.failed, error="CUDA OOM", duration_ms=5.0
    )
    assert run.error == "CUDA OOM" and run.finished_at is not None
    run = repo.upsert_stage_run(pg_session, iid, "segment", status=StageStatus.running, worker="w2")
    assert (run.attempts, run.error, run.finished_at, run.worker) == (2, None, None, "w2")
    run = repo.upsert_stage_run(
        pg_session, iid, "segment", status=StageStatus.done, duration_ms=12.5, output={"s": 0.3}
    )
    assert (run.attempts, run.status, run.output, run.duration_ms) == (
        2,
        StageStatus.done,
        {"s": 0.3},
        12.5,
    )
    assert run.finished_at is not None and run.finished_at >= run.started_at
    # A stage that starts directly in a terminal state still gets one row.
    repo.upsert_stage_run(pg_session, iid, "logical", status=StageStatus.done, output={})
    assert _count(pg_session, StageRun) == 2
    assert repo.get_stage_run(pg_session, iid, "segment") is run
    assert repo.get_stage_run(pg_session, iid, "localize") is None
    assert [r.stage for r in inspection.stage_runs] == ["segment", "logical"]


def test_upsert_result_inserts_then_updates(pg_session: Session) -> None:
    inspection, _ = _inspect(pg_session, repo.get_or_create_line(pg_session, "L1"), _category(pg_session))
    first = repo.upsert_result(pg_session, inspection.id, **_result_fields(Verdict.OK, 0.2))
    second = repo.upsert_result(
        pg_session, inspection.id, verdict=Verdict.NG, image_score=0.9, overlay_key="o.png"
    )
    assert second.id == first.id and _count(pg_session, Result) == 1
    assert (second.verdict, second.image_score, second.overlay_key) == (Verdict.NG, 0.9, "o.png")
    assert second.model_name == "ViT-B-16-plus-240"
    with pytest.raises(TypeError, match="bogus"):
        repo.upsert_result(pg_session, inspection.id, bogus=1)


def test_list_results_filters_and_order(pg_session: Session) -> None:
    l1, l2 = repo.get_or_create_line(pg_session, "L1"), repo.get_or_create_line(pg_session, "L2")
    bottle, screw = _category(pg_session), _category(pg_session, "screw")
    t0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    rows = [(l1, bottle, Verdict.OK), (l1, screw, Verdict.NG), (l2, bottle, None)]
    made = []
    for minute, (line, category, verdict) in enumerate(rows):
        inspection, _ = _inspect(pg_session, line, category)
        inspection.created_at = t0 + timedelta(minutes=minute)
        if verdict is None:
            repo.mark_inspection(pg_session, inspection.id, InspectionStatus.failed, "bad image")
        else:
            repo.upsert_result(pg_session, inspection.id, **_result_fields(verdict))
        made.append(inspection.id)
    pg_session.flush()

    def ids(**filters: object) -> list[str]:
        return [i.id for i, _ in repo.list_results(pg_session, **filters)]  # type: ignore[arg-type]

    assert ids() == made[::-1]
    everything = repo.list_results(pg_session)
    assert everything[0][1] is None and everything[0][0].reason == "bad image"
    assert everything[1][1] is not None and everything[1][1].verdict == Verdict.NG
    assert everything[0][0].line.name == "L2"
    assert ids(line="L1") == [made[1], made[0]]
    assert ids(category="bottle") == [made[2], made[0]]
    assert ids(verdict="NG") == [made[1]]
    assert ids(verdict="ok") == [made[0]]
    assert ids(since=t0 + timedelta(minutes=1)) == [made[2], made[1]]
    # A naive datetime is UTC; an aware one in another zone is converted.
    assert ids(since=datetime(2024, 5, 1, 8, 2)) == [made[2]]
    cest = timezone(timedelta(hours=2))
    assert ids(since=datetime(2024, 5, 1, 10, 1, tzinfo=cest)) == [made[2], made[1]]
    assert ids(line="L1", verdict="OK", limit=5) == [made[0]]
    assert ids(limit=1) == [made[2]]
    assert ids(line="nowhere") == []
    with pytest.raises(ValueError):
        ids(verdict="MAYBE")


def test_mark_inspection_terminal_states_are_sticky(pg_session: Session) -> None:
    line, category = repo.get_or_create_line(pg_session, "L1"), _category(pg_session)
    done, _ = _inspect(pg_session, line, category)
    repo.mark_inspection(pg_session, done.id, InspectionStatus.running)
    assert done.status == InspectionStatus.running and done.started_at is not None
    started = done.started_at
    repo.mark_inspection(pg_session, done.id, InspectionStatus.running)
    assert done.started_at == started
    repo.mark_inspection(pg_session, done.id, InspectionStatus.done)
    assert done.status == InspectionStatus.done and done.finished_at is not None
    finished = done.finished_at
    for later in (InspectionStatus.running, InspectionStatus.failed, InspectionStatus.queued):
        repo.mark_inspection(pg_session, done.id, later, "late")
    assert (done.status, done.finished_at, done.reason) == (InspectionStatus.done, finished, None)

    failed, _ = _inspect(pg_session, line, category)
    repo.mark_inspection(pg_session, failed.id, InspectionStatus.failed, "decode error")
    repo.mark_inspection(pg_session, failed.id, InspectionStatus.done)
    repo.mark_inspection(pg_session, failed.id, InspectionStatus.running)
    assert (failed.status, failed.reason) == (InspectionStatus.failed, "decode error")
    assert failed.started_at is not None and failed.finished_at is not None
    repo.mark_inspection(pg_session, str(uuid.uuid4()), InspectionStatus.done)  # unknown: no-op


def test_register_weights_upserts_by_name(pg_session: Session) -> None:
    big = 5 * 1024**3  # larger than a 32-bit integer
    first = repo.register_weights(
        pg_session,
        name="clip",
        arch="ViT-B-16",
        tag="v1",
        sha256="a" * 64,
        object_key="models/clip/a.safetensors",
        size_bytes=big,
    )
    second = repo.register_weights(
        pg_session,
        name="clip",
        arch="ViT-B-16",
        tag="v2",
        sha256="b" * 64,
        object_key="models/clip/b.safetensors",
        size_bytes=10,
    )
    repo.register_weights(
        pg_session,
        name="adapter",
        arch="sdp+",
        tag=None,
        sha256="c" * 64,
        object_key="k",
        size_bytes=big,
    )
    pg_session.expire_all()
    assert second.id == first.id
    fetched = repo.get_weights(pg_session, "clip")
    assert fetched is not None and (fetched.tag, fetched.size_bytes) == ("v2", 10)
    assert [w.name for w in repo.list_weights(pg_session)] == ["adapter", "clip"]
    assert repo.get_weights(pg_session, "adapter").size_bytes == big  # type: ignore[union-attr]
    assert repo.get_weights(pg_session, "missing") is None


def test_basic_flow_on_sqlite(sqlite_url: str) -> None:
    ensure_schema(sqlite_url)
    with session_scope(sqlite_url) as s:
        line, category = repo.get_or_create_line(s, "L1"), _category(s)
        inspection, created = _inspect(s, line, category, frame="f1")
        assert created and not _inspect(s, line, category, frame="f1")[1]
        repo.mark_inspection(s, inspection.id, InspectionStatus.running)
        repo.upsert_stage_run(s, inspection.id, "segment", status=StageStatus.running)
        repo.upsert_stage_run(s, inspection.id, "segment", status=StageStatus.running)
        repo.upsert_stage_run(s, inspection.id, "segment", status=StageStatus.done, output={})
        repo.upsert_result(s, inspection.id, **_result_fields(Verdict.NG))
        repo.mark_inspection(s, inspection.id, InspectionStatus.done)
        iid = inspection.id
    with pytest.raises(RuntimeError), session_scope(sqlite_url) as s:
        _inspect(s, repo.get_or_create_line(s, "L-rolled-back"), _category(s, "gone"))
        raise RuntimeError("boom")
    with session_scope(sqlite_url) as s:
        assert repo.get_category(s, "gone") is None
        [(found, result)] = repo.list_results(s, line="L1", verdict="NG")
        assert found.id == iid and result is not None
        assert found.status == InspectionStatus.done
        run = repo.get_stage_run(s, iid, "segment")
        assert run is not None and run.attempts == 2
        # Timestamps come back aware and in UTC on SQLite too.
        assert found.created_at.tzinfo is not None and found.finished_at is not None
        assert found.finished_at.utcoffset() == timedelta(0)
        assert repo.list_results(s, since=datetime.now(UTC) + timedelta(minutes=1)) == []
