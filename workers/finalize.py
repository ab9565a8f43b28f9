"""Finalize: the category's thresholds and combination rule turn stage outputs into a verdict.

Thresholds, score statistics and the combination rule are data on the category, read at
finalize time, so a change takes effect on the next frame without redeploying.
Category pipeline keys: ``stages`` (["segment"], ["segment", "logical"], ["logical"]),
``combine`` ("any": NG when any stage says NG, the default; or the name of the one stage that
decides), ``logical_threshold`` (on the fused Mahalanobis score; default 3.0, about the 99th
percentile of the distance of a 2-D Gaussian's samples from its mean).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from storage import repo
from storage.orm import Inspection, InspectionStatus, StageStatus
from workers import scoring
from workers.runtime import WORKER, StageContext

log = logging.getLogger(__name__)
DEFAULT_LOGICAL_THRESHOLD = 3.0


class StageFailed(Exception):
    """The stage cannot produce a result for this frame; the reason is recorded."""


def record_failure(ctx: StageContext, inspection_id: str, stage: str, reason: str) -> None:
    reason = reason[:2000]
    with ctx.sessions.begin() as s:
        if repo.get_inspection(s, inspection_id) is None:
            log.error("stage %s for unknown inspection %s: %s", stage, inspection_id, reason)
            return
        repo.upsert_stage_run(s, inspection_id, stage, status=StageStatus.failed, error=reason, worker=WORKER)
        repo.mark_inspection(s, inspection_id, InspectionStatus.failed, reason=f"{stage}: {reason}")
    from workers.events import publish_event  # the failure event, after its commit

    try:
        publish_event(ctx, inspection_id)
    except Exception:  # the failure is recorded; a broker outage must not hide it
        log.exception("failure event for %s not published", inspection_id)


def run_finalize(inspection_id: str, ctx: StageContext) -> str:
    """Verdict, result row, inspection done; one transaction, safe to repeat."""
    t0 = time.perf_counter()
    with ctx.sessions.begin() as s:
        insp = repo.get_inspection_for_stage(s, inspection_id)
        if insp is None:
            raise StageFailed(f"no inspection {inspection_id}")
        finalize_in(s, insp, t0)
        from workers.events import publish_in

        publish_in(ctx, s, insp)
    return inspection_id


def decide(outputs: dict[str, dict[str, Any]], category) -> dict[str, Any]:
    """Per-stage decisions and the combined verdict (pure; tested on its own)."""
    pipeline = category.pipeline or {}
    decisions: dict[str, str] = {}
    scores: dict[str, Any] = {}
    image_score = None
    if "segment" in outputs:
        seg = outputs["segment"]
        if seg.get("method") == "filo":  # FiLo's own score: (CLS term + map max) / 2
            image_score = float(seg["image_score"])
        else:
            image_score = scoring.image_score(seg["cls_prob"], seg["map_max"], category.score_norm)
        decisions["segment"] = scoring.verdict(image_score, category.threshold)
        scores.update(cls_prob=seg["cls_prob"], map_max=seg["map_max"], norm=category.score_norm)
    if "logical" in outputs:
        lad = outputs["logical"]
        thr = float(pipeline.get("logical_threshold", DEFAULT_LOGICAL_THRESHOLD))
        decisions["logical"] = scoring.verdict(lad["fused"], thr)
        scores.update(logical=lad["logical"], structural=lad["structural"], fused=lad["fused"],
                      logical_threshold=thr, histogram=lad.get("histogram"))
        if image_score is None:
            image_score = float(lad["fused"])
    if "localize" in outputs:
        loc = outputs["localize"]
        scores.update(phrases=loc.get("phrases", []), position=loc.get("position"))
    if not decisions:
        raise StageFailed("no stage produced an output to decide on")
    rule = pipeline.get("combine", "any")
    if rule == "any":
        verdict = "NG" if "NG" in decisions.values() else "OK"
    elif rule in decisions:
        verdict = decisions[rule]
    else:
        raise StageFailed(f"combine rule {rule!r} names a stage that did not run ({sorted(decisions)})")
    scores["decisions"] = decisions
    return {"image_score": image_score, "verdict": verdict, "scores": scores}


def finalize_in(s, insp: Inspection, t0: float) -> None:
    if insp.status in (InspectionStatus.done, InspectionStatus.failed):
        return
    outputs = {r.stage: r.output for r in insp.stage_runs if r.status == StageStatus.done and r.output}
    outputs.pop("finalize", None)
    cat = insp.category
    d = decide(outputs, cat)
    meta = outputs.get("segment") or outputs["logical"]
    lad = outputs.get("logical", {})
    repo.upsert_result(
        s, insp.id, image_score=d["image_score"], verdict=d["verdict"], threshold=cat.threshold,
        scores=d["scores"], model_name=meta["model_name"], weights_ref=meta["weights_ref"],
        random_weights=bool(meta["random_weights"]),
        prompt_set_id=outputs.get("segment", {}).get("prompt_set_id"),
        prompt_set_version=outputs.get("segment", {}).get("prompt_set_version"),
        anomaly_map_key=outputs.get("segment", {}).get("anomaly_map_key"),
        overlay_key=outputs.get("segment", {}).get("overlay_key"),
        bank_id=lad.get("bank_id"), bank_version=lad.get("bank_version"),
    )
    ms = (time.perf_counter() - t0) * 1000
    repo.upsert_stage_run(s, insp.id, "finalize", status=StageStatus.done, duration_ms=ms, worker=WORKER)
    repo.mark_inspection(s, insp.id, InspectionStatus.done, locked=insp)
