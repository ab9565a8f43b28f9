"""Frame stage bodies shared by the Celery tasks and the embedded in-process runner.

A task runs one stage, or several stages that share a queue (segment + logical), for one
inspection: id in, one read, one compute (one backbone pass when stages share it), one
idempotent write, id out. A stage that cannot succeed raises ``StageFailed`` with an
operator-readable reason; the caller records it. Transient infrastructure errors propagate so
Celery can retry them.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from common.images import ImageError, decode_image
from storage import bank_repo, job_repo, keys, repo
from storage.objects import ObjectNotFound, ObjectStoreUnavailable
from storage.orm import InspectionStatus, StageStatus
from workers.events import publish_after_commit, publish_in
from workers.finalize import StageFailed, finalize_in, record_failure, run_finalize
from workers.runtime import WORKER, StageContext, filo_head, grounding_model, lad_engine, segment_engine

log = logging.getLogger(__name__)
_io_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stage-io")
TRANSIENT = (OperationalError, ObjectStoreUnavailable, ConnectionError, TimeoutError, BrokerError)

__all__ = ["StageFailed", "record_failure", "run_stages", "execute", "STAGES"]


@dataclass(frozen=True)
class FrameInput:
    image_key: str
    category: str
    prompt_set_id: int
    prompt_set_version: int
    prompt: dict[str, Any]  # sha256, content, rvs_method, rvs_params
    score_norm: dict[str, Any] | None
    bank: dict[str, Any] | None  # id, version, object_key, content, config (logical stage)
    pipeline: dict[str, Any]
    phrases: list[str]  # FiLo defect phrases (localize caption, FiLo prompts)
    localize: dict[str, Any] | None  # output of a localize stage that already ran


def _relaxed_commit(s) -> None:
    """The 'running' marker need not wait for the WAL flush: if it is lost in a crash the
    redelivered task writes it again. Verdicts and failures keep synchronous commits."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SET LOCAL synchronous_commit TO OFF"))


def _bank_input(s, insp) -> dict[str, Any]:
    bank = bank_repo.active_bank(s, insp.category_id, insp.line_id)
    if bank is None:
        raise StageFailed(f"category {insp.category.name!r} has no active memory bank for line {insp.line.name}")
    ps = bank.prompt_set
    return {"id": bank.id, "version": bank.version, "object_key": bank.object_key,
            "content": ps.content if ps else bank.spec["content"], "config": bank.spec.get("config", {})}


def _start(ctx: StageContext, inspection_id: str, stages: list[str]) -> tuple[FrameInput, list[str]] | None:
    """Mark the stages running and read their input; None when nothing is left to do."""
    with ctx.sessions.begin() as s:
        _relaxed_commit(s)
        insp = repo.get_inspection_for_stage(s, inspection_id)
        if insp is None:
            raise StageFailed(f"no inspection {inspection_id}")
        if insp.status in (InspectionStatus.done, InspectionStatus.failed):
            return None  # a redelivered message after the terminal write
        done = {r.stage for r in insp.stage_runs if r.status == StageStatus.done}
        pending = [st for st in stages if st not in done]
        cat = insp.category
        ps = cat.active_prompt_set
        if ps is None:
            raise StageFailed(f"category {cat.name!r} has no active prompt set")
        bank = _bank_input(s, insp) if "logical" in pending else None
        pipeline = dict(cat.pipeline or {})
        phrases = _phrases(s, cat, pipeline)
        localize = next((r.output for r in insp.stage_runs if r.stage == "localize" and r.status == StageStatus.done),
                        None)
        repo.mark_inspection(s, inspection_id, InspectionStatus.running, locked=insp)
        for st in pending:
            repo.upsert_stage_run(s, inspection_id, st, status=StageStatus.running, worker=WORKER)
        prompt = {"sha256": ps.sha256, "content": ps.content, "rvs_method": ps.rvs_method,
                  "rvs_params": ps.rvs_params or {}}
        inp = FrameInput(insp.image_key, cat.name, ps.id, ps.version, prompt, cat.score_norm, bank, pipeline,
                         phrases, localize)
        return inp, pending


def _phrases(s, cat, pipeline: dict[str, Any]) -> list[str]:
    """The category's active FiLo descriptions, else the reviewed default library."""
    from prompts.filo import FILO_PIPELINE_KEY, load_filo_defaults

    ps_id = pipeline.get(FILO_PIPELINE_KEY)
    ps = repo.get_prompt_set(s, int(ps_id)) if ps_id else None
    if ps is not None and ps.content.get("phrases"):
        return list(ps.content["phrases"])
    return load_filo_defaults(cat.name)


def _frame(ctx: StageContext, inp: FrameInput):
    try:
        data = ctx.store.get_bytes(inp.image_key)
    except ObjectNotFound as exc:
        raise StageFailed(f"image object {inp.image_key} is missing") from exc
    try:
        return decode_image(data, max_pixels=ctx.settings.max_image_pixels)
    except ImageError as exc:
        raise StageFailed(f"image cannot be decoded: {exc}") from exc


def run_stages(inspection_id: str, ctx: StageContext, stages: list[str], finalize: bool = False) -> str:
    """Run frame stages in one process; segment and logical share one backbone pass."""
    t0 = time.perf_counter()
    started = _start(ctx, inspection_id, stages)
    if started is None:
        publish_after_commit(ctx, inspection_id)  # a redelivery after the verdict: make sure its event went out
        return inspection_id
    inp, pending = started
    outputs: dict[str, dict[str, Any]] = {}
    if pending:
        frame = _frame(ctx, inp)
        outputs = _compute(ctx, inspection_id, inp, pending, frame.rgb)
    ms = (time.perf_counter() - t0) * 1000
    with ctx.sessions.begin() as s:
        for st, out in outputs.items():
            if st == "localize":
                job_repo.replace_detections(s, inspection_id, out["detections"])
            repo.upsert_stage_run(s, inspection_id, st, status=StageStatus.done,
                                  duration_ms=out.pop("_ms", ms), output=out, worker=WORKER)
        if finalize:
            insp = repo.get_inspection_for_stage(s, inspection_id)
            finalize_in(s, insp, time.perf_counter())
            publish_in(ctx, s, insp)  # confirmed before the commit: a visible verdict has its event out
    return inspection_id


def _compute(ctx, inspection_id: str, inp: FrameInput, pending: list[str], rgb) -> dict[str, dict[str, Any]]:
    from workers.engine import FramePrediction, PromptSpec  # torch stays out of processes that never compute
    from workers.stages_filo import filo_segment, kept_boxes, localize_frame

    engine = segment_engine(ctx)
    outputs: dict[str, dict[str, Any]] = {}
    features = None
    localize = inp.localize
    if "localize" in pending:
        t = time.perf_counter()
        localize = localize_frame(grounding_model(ctx), rgb, inp.phrases)
        outputs["localize"] = localize | {"_ms": (time.perf_counter() - t) * 1000}
    if "segment" in pending:
        t = time.perf_counter()
        method = inp.pipeline.get("segment_method", "sdp")
        t_model = time.perf_counter()
        extra: dict[str, Any] = {"method": method}
        if method == "filo":
            amap, cls_prob, map_max, filo_score, features = filo_segment(
                engine, filo_head(ctx), rgb, inp.category, inp.phrases, localize)
            pred = FramePrediction(amap, cls_prob, map_max)
            extra |= {"image_score": filo_score, "position": (localize or {}).get("position", "center")}
        elif method == "sdp":
            text_feats = engine.text_features(PromptSpec(class_name=inp.category, **inp.prompt), ctx.store)
            pred, features = engine.predict_with_features(rgb, text_feats, keep=("logical" in pending))
        else:
            raise StageFailed(f"unknown segment_method {method!r} (sdp or filo)")
        model_ms = (time.perf_counter() - t_model) * 1000
        map_key, overlay_key = _write_pictures(ctx, inspection_id, rgb, pred, inp, engine, kept_boxes(localize))
        outputs["segment"] = extra | {
            "cls_prob": pred.cls_prob, "map_max": pred.map_max, "anomaly_map_key": map_key,
            "overlay_key": overlay_key, "model_name": engine.clip.arch,
            "weights_ref": engine.clip.weights_ref, "random_weights": engine.clip.random_weights,
            "prompt_set_id": inp.prompt_set_id, "prompt_set_version": inp.prompt_set_version,
            "map_shape": list(pred.anomaly_map.shape), "model_ms": model_ms,
            "_ms": (time.perf_counter() - t) * 1000,
        }
    if "logical" in pending:
        t = time.perf_counter()
        outputs["logical"] = _logical(ctx, inp, rgb, features) | {
            "shared_backbone": features is not None, "model_name": engine.clip.arch,
            "weights_ref": engine.clip.weights_ref, "random_weights": engine.clip.random_weights,
            "_ms": (time.perf_counter() - t) * 1000,
        }
    return outputs


def _logical(ctx, inp: FrameInput, rgb, features) -> dict[str, Any]:
    from workers.lad_engine import lad_config

    lad = lad_engine(ctx)
    b = inp.bank
    cfg = lad_config(b["content"], b["config"])
    bank = lad.bank(b["id"], lambda: ctx.store.get_bytes(b["object_key"]), cfg, b["content"])
    model = lad.model(cfg)
    feats = model.encode_from(features) if features is not None else lad.encode(model, [rgb])
    out = lad.score(bank, feats)[0]
    return out | {"bank_id": b["id"], "bank_version": b["version"]}


def _write_pictures(ctx, inspection_id, rgb, pred, inp: FrameInput, engine, boxes=()) -> tuple[str, str]:
    from workers.imaging import map_to_npy, render_overlay
    from workers.models.hqloc import draw_boxes

    map_key = keys.anomaly_map_key(inspection_id)
    overlay_key = keys.overlay_key(inspection_id)
    map_put = _io_pool.submit(
        ctx.store.put_bytes, map_key, map_to_npy(pred.anomaly_map), content_type="application/x-npy"
    )  # overlaps the upload with rendering the overlay
    rng = tuple(inp.score_norm["map"]) if inp.score_norm else None
    caption = f"{inp.category} cls={pred.cls_prob:.3f} max={pred.map_max:.3f}"
    if engine.clip.random_weights:
        caption += "\nRANDOM WEIGHTS"
    png = render_overlay(
        rgb, pred.anomaly_map, value_range=rng, max_side=ctx.settings.overlay_max_side, caption=caption,
        decorate=(lambda img: draw_boxes(img, boxes)) if boxes else None,
    )
    ctx.store.put_bytes(overlay_key, png, content_type="image/png")
    map_put.result()
    return map_key, overlay_key


def run_segment(inspection_id: str, ctx: StageContext, finalize: bool = False,
                with_stages: tuple[str, ...] = ()) -> str:
    """SDP (plus stages folded into the same task, e.g. logical) for one frame."""
    return run_stages(inspection_id, ctx, ["segment", *with_stages], finalize)


def run_logical(inspection_id: str, ctx: StageContext, finalize: bool = False,
                with_stages: tuple[str, ...] = ()) -> str:
    return run_stages(inspection_id, ctx, ["logical", *with_stages], finalize)


def _run_finalize(inspection_id: str, ctx: StageContext, finalize: bool = True,
                  with_stages: tuple[str, ...] = ()) -> str:
    return run_finalize(inspection_id, ctx)


def run_localize(inspection_id: str, ctx: StageContext, finalize: bool = False,
                 with_stages: tuple[str, ...] = ()) -> str:
    return run_stages(inspection_id, ctx, ["localize", *with_stages], finalize)


STAGES = {"localize": run_localize, "segment": run_segment, "logical": run_logical, "finalize": _run_finalize}


def execute(stage: str, inspection_id: str, ctx: StageContext, finalize: bool = False,
            with_stages: tuple[str, ...] = ()) -> bool:
    """Run one task's stages with failure recording (no retries); False when the chain must stop."""
    try:
        STAGES[stage](inspection_id, ctx, finalize=finalize, with_stages=tuple(with_stages))
    except StageFailed as exc:
        record_failure(ctx, inspection_id, stage, str(exc))
        return False
    except Exception as exc:  # a model or code error must not lose the frame
        log.exception("stage %s failed for %s", stage, inspection_id)
        record_failure(ctx, inspection_id, stage, f"{type(exc).__name__}: {exc}")
        return False
    return True
