"""Per-process resources, created lazily on first use (never at import, never in a fork parent).

CUDA is not fork-safe and Celery's ``worker_process_init`` is killed after 4 s, so the model
loads inside the first task that needs it and stays for the life of the process.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from common.settings import Settings, get_settings
from storage import repo
from storage.db import ensure_schema, session_factory
from storage.objects import ObjectStore, open_store

log = logging.getLogger(__name__)
_lock = threading.Lock()
_engine = None
_lad = None
WORKER = socket.gethostname()
_migrated: set[str] = set()


@dataclass(frozen=True)
class StageContext:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore


def context() -> StageContext:
    s = get_settings()
    url = s.resolved_database_url
    if url.startswith("sqlite") and url not in _migrated:
        ensure_schema(url)  # the embedded default creates its own database on first use
        _migrated.add(url)
    return StageContext(s, session_factory(url), open_store(s))


def segment_engine(ctx: StageContext):  # -> workers.engine.SegmentEngine (torch import deferred)
    """The process's segment engine, built on first call."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = _build_engine(ctx)
        return _engine


def lad_engine(ctx: StageContext):  # -> workers.lad_engine.LADEngine, on the segment engine's CLIP
    global _lad
    seg = segment_engine(ctx)
    with _lock:
        if _lad is None or _lad.seg is not seg:
            from workers.lad_engine import LADEngine

            _lad = LADEngine(seg)
        return _lad


_grounding = None
_filo: dict[str, object] = {}


def grounding_model(ctx: StageContext):  # -> workers.grounding.GroundingModel
    """Grounding DINO for the localize stage, loaded once per process (never a random fallback)."""
    global _grounding
    with _lock:
        if _grounding is None:
            from workers.grounding import load_grounding
            from workers.weights import best_device

            source = _imported_folder(ctx, ctx.settings.grounding) or ctx.settings.grounding
            _grounding = load_grounding(source, best_device(ctx.settings.device))
        return _grounding


def filo_head(ctx: StageContext):  # -> workers.models.filo.FiLoHead | None
    """Trained FiLo head weights (file or imported name) sized for the worker's CLIP; None if unset."""
    name = ctx.settings.filo_weights
    if not name:
        return None
    seg = segment_engine(ctx)
    with _lock:
        if name not in _filo:
            from workers.models.filo import FiLoHead
            from workers.weights import state_dict_from_bytes

            imported = _imported_weights(ctx, name)
            data = imported[1] if imported else Path(name).read_bytes()
            head = FiLoHead.for_visual(seg.clip.model.visual)
            head.load_state_dict(state_dict_from_bytes(data))
            _filo[name] = head.to(seg.device).eval()
        return _filo[name]


def reset_engine() -> None:
    global _engine, _lad, _grounding
    with _lock:
        _engine = None
        _lad = None
        _grounding = None
        _filo.clear()


def _build_engine(ctx: StageContext):
    from workers.engine import SegmentEngine
    from workers.weights import best_device, load_clip

    s = ctx.settings
    device = best_device(s.device)
    imported = _imported_weights(ctx, s.weights)
    clip = load_clip(s.clip_model, s.weights, imported=imported, device=device)
    log.info("segment engine: %s weights=%s on %s", clip.arch, clip.weights_ref, device)
    return SegmentEngine(clip, device)


def _imported_weights(ctx: StageContext, name: str) -> tuple[str, bytes] | None:
    """Weights registered with ``inspect models import``, cached on local disk by sha256."""
    with ctx.sessions() as session:
        row = repo.get_weights(session, name)
        if row is None:
            return None
        sha, key = row.sha256, row.object_key
    cache = Path(ctx.settings.data_dir) / "weights-cache" / f"{sha}.safetensors"
    if cache.is_file():
        return sha, cache.read_bytes()
    data = ctx.store.get_bytes(key)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(cache)
    return sha, data


def _imported_folder(ctx: StageContext, name: str) -> str | None:
    """A folder imported with ``inspect models import-dir``, fetched once into the local cache."""
    import hashlib
    import json

    with ctx.sessions() as session:
        row = repo.get_weights(session, name)
        if row is None or row.arch != "grounding-dino":
            return None
        sha, prefix = row.sha256, row.object_key
    target = Path(ctx.settings.data_dir) / "weights-cache" / sha
    if (target / "manifest.json").is_file():
        return str(target)
    manifest = json.loads(ctx.store.get_bytes(f"{prefix}/manifest.json"))
    for rel, file_sha in manifest.items():
        data = ctx.store.get_bytes(f"{prefix}/{rel}")
        if hashlib.sha256(data).hexdigest() != file_sha:
            raise RuntimeError(f"imported {name}: {rel} fails its sha256 check")
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    (target / "manifest.json").write_text(json.dumps(manifest))  # written last: marks a complete copy
    return str(target)
