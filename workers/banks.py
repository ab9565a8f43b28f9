"""Building a CLIP-LAD memory bank as a task: normal images in the object store -> bank tensors.

Spec (written by ``inspect bank build``): image keys of the k training shots and of the
validation normals, the vocabulary content, config overrides and whether to activate. The
result is one safetensors object (memory + Mahalanobis statistics) and the bank row's stats.
"""

from __future__ import annotations

import hashlib
import time

from common.images import ImageError, decode_image
from storage import bank_repo
from storage.orm import BankStatus
from workers.finalize import StageFailed
from workers.runtime import StageContext, lad_engine


def record_bank_failure(ctx: StageContext, bank_id: int, reason: str) -> None:
    with ctx.sessions.begin() as s:
        bank = bank_repo.get_bank(s, bank_id)
        if bank is not None and bank.status == BankStatus.building:
            bank_repo.finish_bank(s, bank, status=BankStatus.failed, error=reason[:2000])


def _images(ctx: StageContext, keys: list[str]) -> list:
    out = []
    for key in keys:
        try:
            out.append(decode_image(ctx.store.get_bytes(key), max_pixels=ctx.settings.max_image_pixels).rgb)
        except ImageError as exc:
            raise StageFailed(f"bank image {key} cannot be decoded: {exc}") from exc
    return out


def build_bank(bank_id: int, ctx: StageContext) -> int:
    from workers.lad_engine import bank_bytes, lad_config

    t0 = time.perf_counter()
    with ctx.sessions() as s:
        bank = bank_repo.get_bank(s, bank_id)
        if bank is None:
            raise StageFailed(f"no memory bank {bank_id}")
        if bank.status != BankStatus.building:
            return bank_id  # redelivered after completion
        spec = dict(bank.spec)
        content = bank.prompt_set.content if bank.prompt_set else spec["content"]
        where = f"{bank.category.name}/{bank.line.name if bank.line else 'all-lines'}/v{bank.version}"
    train, validation = _images(ctx, spec["train"]), _images(ctx, spec.get("validation", []))
    total = len(train) + len(validation)
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        with ctx.sessions.begin() as s:  # short transactions: `inspect bank build` polls this
            b = bank_repo.get_bank(s, bank_id)
            if b is not None:
                b.progress = min(done / max(total, 1), 1.0)

    lad = lad_engine(ctx)
    cfg = lad_config(content, spec.get("config"))
    memory, stats, summary = lad.build(train, validation, content, cfg, progress)
    clip = lad.clip
    meta = {"bank_id": bank_id, "where": where, "model": clip.arch, "weights": clip.weights_ref}
    data = bank_bytes(memory, stats, meta)
    sha = hashlib.sha256(data).hexdigest()
    key = f"banks/{where}/{sha}.safetensors"
    ctx.store.put_bytes(key, data, content_type="application/octet-stream")
    summary["build_seconds"] = round(time.perf_counter() - t0, 3)
    summary["bytes"] = len(data)
    with ctx.sessions.begin() as s:
        bank = bank_repo.get_bank(s, bank_id)
        bank_repo.finish_bank(s, bank, status=BankStatus.ready, progress=1.0, object_key=key, sha256=sha,
                              size_bytes=len(data), stats=summary, model_name=clip.arch,
                              weights_ref=clip.weights_ref, random_weights=clip.random_weights)
        if spec.get("activate", True):
            bank_repo.activate_bank(s, bank)
    return bank_id
