"""Stage bodies shared by the Celery tasks and the embedded in-process runner.

Each stage: inspection id in, one read, one compute, one idempotent write, id out. A stage
that cannot succeed raises ``StageFailed`` with an operator-readable reason; the caller
records it on the stage run and the inspection. Transient infrastructure errors propagate
so Celery can retry them.
"""

from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from common.images import ImageError, decode_image
from storage import keys, repo
from storage.objects import ObjectNotFound, ObjectStoreUnavailable
from storage.orm import InspectionStatus, StageStatus
from workers import scoring
from workers.runtime import StageContext, segment_engine

log = logging.getLogger(__name__)
TRANSIENT = (OperationalError, ObjectStoreUnavailable, ConnectionError, TimeoutError)
WORKER = socket.gethostname()
_io_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stage-io")


class StageFailed(Exception):
    """The stage cannot produce a result for this frame; the reason is recorded."""


@dataclass(frozen=True)
class SegmentInput:
    image_key: str
    category: str
    prompt_set_id: int
    prompt_set_version: int
    prompt: dict[str, Any]  # sha256, content, rvs_method, rvs_params
    score_norm: dict[str, Any] | None


def record_failure(ctx: StageContext, inspection_id: str, stage: str, reason: str) -> None:
    reason = reason[:2000]
    with ctx.sessions.begin() as s:
        if repo.get_inspection(s, inspection_id) is None:
            log.error("stage %s for unknown inspection %s: %s", stage, inspection_id, reason)
            return
        repo.upsert_stage_run(s, inspection_id, stage, status=StageStatus.failed, error=reason, worker=WORKER)
        repo.mark_inspection(s, inspection_id, InspectionStatus.failed, reason=f"{stage}: {reason}")


def _relaxed_commit(s) -> None:
    """The 'running' marker need not wait for the WAL flush: if it is lost in a crash the
    redelivered task writes it again. Verdicts and failures keep synchronous commits."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SET LOCAL synchronous_commit TO OFF"))


def _start(ctx: StageContext, inspection_id: str, stage: str) -> SegmentInput | None:
    """Mark the stage running and read its input; None when there is nothing left to do."""
    with ctx.sessions.begin() as s:
        _relaxed_commit(s)
        insp = repo.get_inspection_for_stage(s, inspection_id)
        if insp is None:
            raise StageFailed(f"no inspection {inspection_id}")
        if insp.status in (InspectionStatus.done, InspectionStatus.failed):
            return None  # a redelivered message after the terminal write
        run = next((r for r in insp.stage_runs if r.stage == stage), None)
        if run is not None and run.status == StageStatus.done:
            return None
        cat = insp.category
        ps = cat.active_prompt_set
        if ps is None:
            raise StageFailed(f"category {cat.name!r} has no active prompt set")
        repo.mark_inspection(s, inspection_id, InspectionStatus.running, locked=insp)
        repo.upsert_stage_run(s, inspection_id, stage, status=StageStatus.running, worker=WORKER)
        prompt = {
            "sha256": ps.sha256,
            "content": ps.content,
            "rvs_method": ps.rvs_method,
            "rvs_params": ps.rvs_params or {},
        }
        return SegmentInput(insp.image_key, cat.name, ps.id, ps.version, prompt, cat.score_norm)


def run_segment(inspection_id: str, ctx: StageContext, finalize: bool = False) -> str:
    """SDP anomaly map and score terms for one frame; map and overlay go to the object store.

    With ``finalize`` the verdict is written in the same transaction as the stage output,
    saving a broker round trip and a commit per frame when segment is the last stage.
    """
    t0 = time.perf_counter()
    inp = _start(ctx, inspection_id, "segment")
    if inp is None:
        return inspection_id
    try:
        data = ctx.store.get_bytes(inp.image_key)
    except ObjectNotFound as exc:
        raise StageFailed(f"image object {inp.image_key} is missing") from exc
    try:
        frame = decode_image(data, max_pixels=ctx.settings.max_image_pixels)
    except ImageError as exc:
        raise StageFailed(f"image cannot be decoded: {exc}") from exc

    from workers.engine import PromptSpec  # torch stays out of processes that never segment

    engine = segment_engine(ctx)
    spec = PromptSpec(class_name=inp.category, **inp.prompt)
    text = engine.text_features(spec, ctx.store)
    t_model = time.perf_counter()
    pred = engine.predict([frame.rgb], [text])[0]
    model_ms = (time.perf_counter() - t_model) * 1000
    map_key, overlay_key = _write_pictures(ctx, inspection_id, frame.rgb, pred, inp, engine)
    output = {
        "cls_prob": pred.cls_prob,
        "map_max": pred.map_max,
        "anomaly_map_key": map_key,
        "overlay_key": overlay_key,
        "model_name": engine.clip.arch,
        "weights_ref": engine.clip.weights_ref,
        "random_weights": engine.clip.random_weights,
        "prompt_set_id": inp.prompt_set_id,
        "prompt_set_version": inp.prompt_set_version,
        "map_shape": list(pred.anomaly_map.shape),
        "model_ms": model_ms,
    }
    ms = (time.perf_counter() - t0) * 1000
    with ctx.sessions.begin() as s:
        repo.upsert_stage_run(
            s, inspection_id, "segment", status=StageStatus.done, duration_ms=ms, output=output, worker=WORKER
        )
        if finalize:
            _finalize(s, repo.get_inspection_for_stage(s, inspection_id), output, time.perf_counter())
    return inspection_id


def _write_pictures(ctx, inspection_id, rgb, pred, inp: SegmentInput, engine) -> tuple[str, str]:
    from workers.imaging import map_to_npy, render_overlay

    map_key = keys.anomaly_map_key(inspection_id)
    overlay_key = keys.overlay_key(inspection_id)
    map_put = _io_pool.submit(
        ctx.store.put_bytes, map_key, map_to_npy(pred.anomaly_map), content_type="application/x-npy"
    )  # overlaps the upload with rendering the overlay
    rng = tuple(inp.score_norm["map"]) if inp.score_norm else None
    caption = f"{inp.category} cls={pred.cls_prob:.3f} max={pred.map_max:.3f}"
    if engine.clip.random_weights:
        caption += " RANDOM WEIGHTS"
    png = render_overlay(
        rgb, pred.anomaly_map, value_range=rng, max_side=ctx.settings.overlay_max_side, caption=caption
    )
    ctx.store.put_bytes(overlay_key, png, content_type="image/png")
    map_put.result()
    return map_key, overlay_key


def run_finalize(inspection_id: str, ctx: StageContext, finalize: bool = True) -> str:
    """Threshold -> verdict, result row, inspection done; one transaction, safe to repeat.

    ``finalize`` is accepted for a uniform stage signature; this stage always finalizes.
    """
    t0 = time.perf_counter()
    with ctx.sessions.begin() as s:
        insp = repo.get_inspection_for_stage(s, inspection_id)
        if insp is None:
            raise StageFailed(f"no inspection {inspection_id}")
        if insp.status in (InspectionStatus.done, InspectionStatus.failed):
            return inspection_id
        seg = next((r for r in insp.stage_runs if r.stage == "segment"), None)
        if seg is None or seg.status != StageStatus.done or not seg.output:
            raise StageFailed("segment stage has not produced an output")
        _finalize(s, insp, seg.output, t0)
    return inspection_id


def _finalize(s, insp, out: dict[str, Any], t0: float) -> None:
    """Verdict from the category's current threshold and score statistics (data, not code)."""
    inspection_id = insp.id
    if insp.status in (InspectionStatus.done, InspectionStatus.failed):
        return
    cat = insp.category
    score = scoring.image_score(out["cls_prob"], out["map_max"], cat.score_norm)
    repo.upsert_result(
        s,
        inspection_id,
        image_score=score,
        verdict=scoring.verdict(score, cat.threshold),
        threshold=cat.threshold,
        scores={"cls_prob": out["cls_prob"], "map_max": out["map_max"], "norm": cat.score_norm},
        model_name=out["model_name"],
        weights_ref=out["weights_ref"],
        random_weights=out["random_weights"],
        prompt_set_id=out["prompt_set_id"],
        prompt_set_version=out["prompt_set_version"],
        anomaly_map_key=out["anomaly_map_key"],
        overlay_key=out["overlay_key"],
    )
    ms = (time.perf_counter() - t0) * 1000
    repo.upsert_stage_run(
        s, inspection_id, "finalize", status=StageStatus.done, duration_ms=ms, worker=WORKER
    )
    repo.mark_inspection(s, inspection_id, InspectionStatus.done, locked=insp)


STAGES = {"segment": run_segment, "finalize": run_finalize}


def execute(stage: str, inspection_id: str, ctx: StageContext, finalize: bool = False) -> bool:
    """Run one stage with failure recording (no retries); False when the chain must stop."""
    try:
        STAGES[stage](inspection_id, ctx, finalize=finalize)
    except StageFailed as exc:
        record_failure(ctx, inspection_id, stage, str(exc))
        return False
    except Exception as exc:  # a model or code error must not lose the frame
        log.exception("stage %s failed for %s", stage, inspection_id)
        record_failure(ctx, inspection_id, stage, f"{type(exc).__name__}: {exc}")
        return False
    return True
