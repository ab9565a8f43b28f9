"""Stages in-process against real PostgreSQL and a real S3 server (tiny random model)."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image

from common.settings import get_settings, reset_settings
from orchestrator.context import open_orchestrator
from storage import repo
from storage.orm import InspectionStatus, StageStatus
from workers import runtime, stages
from workers.imaging import npy_to_map

pytestmark = pytest.mark.integration


def _png(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def orch(pg_module_url, s3_server, s3_credentials, monkeypatch):
    monkeypatch.setenv("INSPECT_DATABASE_URL", pg_module_url)
    monkeypatch.setenv("INSPECT_S3_ENDPOINT", s3_server)
    monkeypatch.setenv("INSPECT_S3_ACCESS_KEY", s3_credentials["access_key"])
    monkeypatch.setenv("INSPECT_S3_SECRET_KEY", s3_credentials["secret_key"])
    monkeypatch.setenv("INSPECT_S3_BUCKET", f"b-{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("INSPECT_S3_REGION", "us-east-1")
    monkeypatch.setenv("INSPECT_CLIP_MODEL", "inspect-tiny")
    monkeypatch.setenv("INSPECT_WEIGHTS", "random")
    reset_settings()
    runtime.reset_engine()
    yield open_orchestrator(get_settings())
    runtime.reset_engine()


def _cat() -> str:
    return f"pcb_{uuid.uuid4().hex[:8]}"


def test_frame_to_result_rows_and_objects(orch):
    cat = _cat()
    sub = orch.intake.submit(_png(0), line="3", category=cat, station="2", serial="SN-1")
    assert sub.created and sub.category_registered
    with orch.sessions() as s:
        insp = repo.get_inspection(s, sub.inspection_id)
        assert insp.status == InspectionStatus.done, insp.reason
        r = insp.result
        assert r.verdict.value in ("OK", "NG") and r.random_weights
        assert r.model_name == "inspect-tiny" and r.prompt_set_version == 1
        assert [st.stage for st in insp.stage_runs] == ["segment", "finalize"]
        assert all(st.status == StageStatus.done for st in insp.stage_runs)
        assert insp.line.name == "3" and insp.station == "2" and insp.serial == "SN-1"
    amap = npy_to_map(orch.store.get_bytes(r.anomaly_map_key))
    assert amap.dtype == np.float16 and amap.shape == (64, 64)
    overlay = Image.open(io.BytesIO(orch.store.get_bytes(r.overlay_key)))
    assert overlay.format == "PNG" and overlay.size == (96, 96)
    assert orch.store.exists(insp.image_key)


def test_resubmitted_frame_id_is_one_inspection(orch):
    cat = _cat()
    a = orch.intake.submit(_png(1), line="3", category=cat, frame_id=f"f-{cat}")
    b = orch.intake.submit(_png(1), line="3", category=cat, frame_id=f"f-{cat}")
    assert a.inspection_id == b.inspection_id and a.created and not b.created


def test_stages_are_idempotent_on_redelivery(orch):
    sub = orch.intake.submit(_png(2), line="3", category=_cat())
    ctx = runtime.context()
    with orch.sessions() as s:
        before = repo.get_inspection(s, sub.inspection_id).result.image_score
    assert stages.execute("segment", sub.inspection_id, ctx)
    assert stages.execute("finalize", sub.inspection_id, ctx)
    with orch.sessions() as s:
        insp = repo.get_inspection(s, sub.inspection_id)
        assert insp.result.image_score == before
        assert [st.attempts for st in insp.stage_runs] == [1, 1]


def test_threshold_is_data_changed_at_run_time(orch):
    cat = _cat()
    first = orch.intake.submit(_png(3), line="3", category=cat)
    with orch.sessions.begin() as s:
        score = repo.get_inspection(s, first.inspection_id).result.image_score
        repo.set_category_fields(s, repo.get_category(s, cat), threshold=score + 1.0)
    second = orch.intake.submit(_png(3), line="3", category=cat)
    with orch.sessions.begin() as s:
        assert repo.get_inspection(s, second.inspection_id).result.verdict.value == "OK"
        repo.set_category_fields(s, repo.get_category(s, cat), threshold=score - 1.0)
    third = orch.intake.submit(_png(3), line="3", category=cat)
    with orch.sessions() as s:
        assert repo.get_inspection(s, third.inspection_id).result.verdict.value == "NG"


def test_text_features_are_persisted_and_reused(orch, monkeypatch):
    cat = _cat()
    orch.intake.submit(_png(4), line="3", category=cat)
    keys = [k for k in _list_keys(orch.store) if k.startswith("text-features/")]
    assert len(keys) == 1
    runtime.reset_engine()  # a new worker process: must load, not recompute

    def boom(*a, **k):
        raise AssertionError("text features recomputed")

    monkeypatch.setattr("workers.engine.encode_text_features", boom)
    sub = orch.intake.submit(_png(5), line="3", category=cat)
    with orch.sessions() as s:
        assert repo.get_inspection(s, sub.inspection_id).status == InspectionStatus.done


def _list_keys(store) -> list[str]:
    objs = store._client.list_objects(bucket_name=store.bucket, recursive=True)
    return [o.object_name for o in objs]


def test_corrupt_stored_image_fails_with_reason(orch):
    sub = orch.intake.submit(_png(6), line="3", category=_cat())
    with orch.sessions.begin() as s:
        insp = repo.get_inspection(s, sub.inspection_id)
        key = insp.image_key
        insp.status = InspectionStatus.queued
        s.delete(insp.result)
        for st in list(insp.stage_runs):
            s.delete(st)
    orch.store.put_bytes(key, b"\x89PNG broken")
    ctx = runtime.context()
    assert not stages.execute("segment", sub.inspection_id, ctx)
    with orch.sessions() as s:
        insp = repo.get_inspection(s, sub.inspection_id)
        assert insp.status == InspectionStatus.failed
        assert insp.reason.startswith("segment: image cannot be decoded")
        assert insp.stage_runs[0].status == StageStatus.failed


def test_missing_weights_fail_every_frame_with_a_clear_message(orch, monkeypatch):
    monkeypatch.setenv("INSPECT_WEIGHTS", "no-such-weights")
    reset_settings()
    runtime.reset_engine()
    o = open_orchestrator(get_settings())
    sub = o.intake.submit(_png(7), line="3", category=_cat())
    with o.sessions() as s:
        insp = repo.get_inspection(s, sub.inspection_id)
        assert insp.status == InspectionStatus.failed
        assert "WeightsNotFound" in insp.reason and "INSPECT_WEIGHTS='no-such-weights'" in insp.reason
        assert insp.result is None
