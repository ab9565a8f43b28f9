"""Accepting frames: validate, store the image, record the inspection, commit, then dispatch.

No torch here: the orchestrator sends stages by name (or hands them to the in-process runner
of the embedded default).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass

from common.images import decode_image
from common.settings import Settings
from orchestrator.dispatch import ENQUEUE_FAILED, Dispatcher
from orchestrator.planner import plan_stages
from prompts import load_prompt_file
from storage import bank_repo, keys, repo
from storage.objects import ObjectStore
from storage.orm import Category, Inspection, InspectionStatus


class UnknownCategory(ValueError):
    pass


@dataclass(frozen=True)
class Submitted:
    inspection_id: str
    frame_id: str
    created: bool  # False: the frame id was seen before (idempotent resubmission)
    category_registered: bool  # True: first sight of the category, registered with defaults


@dataclass
class Intake:
    settings: Settings
    sessions: object  # sessionmaker[Session]
    store: ObjectStore
    dispatcher: Dispatcher

    def submit(
        self,
        data: bytes,
        *,
        line: str,
        category: str,
        station: str | None = None,
        serial: str | None = None,
        frame_id: str | None = None,
        source: str = "cli",
        strict: bool | None = None,
    ) -> Submitted:
        """Raises ImageError / UnknownCategory before anything is stored."""
        s = self.settings
        frame = decode_image(data, max_pixels=s.max_image_pixels, max_bytes=s.max_image_bytes)
        sha = hashlib.sha256(data).hexdigest()
        strict = s.strict_categories if strict is None else strict
        with self.sessions() as session:
            if strict and repo.get_category(session, category) is None:
                raise UnknownCategory(
                    f"category {category!r} is not registered (strict mode); "
                    f"register it with `inspect category add {category}`"
                )
        image_key = keys.image_key(sha, frame.ext)
        # Content-addressed: rewriting the same bytes is harmless and cheaper than asking first.
        self.store.put_bytes(image_key, data, content_type=frame.content_type)
        with self.sessions.begin() as session:
            cat, registered = ensure_category(session, category, s)
            insp, created = repo.create_inspection(
                session,
                frame_id=frame_id or str(uuid.uuid4()),
                line=repo.get_or_create_line(session, line),
                station=station,
                category=cat,
                serial=serial,
                image_key=image_key,
                image_sha256=sha,
                content_type=frame.content_type,
                width=frame.width,
                height=frame.height,
                source=source,
            )
            has_bank = bank_repo.active_bank(session, cat.id, insp.line_id) is not None
            stages = plan_stages(cat.pipeline, has_bank)
            resend = not created and repo.reopen_unsent(session, insp.id, ENQUEUE_FAILED)
            result = Submitted(insp.id, insp.frame_id, created, registered)
        if created or resend:  # only after commit: a worker must find the row
            self.dispatcher.send(result.inspection_id, stages)
        return result

    def wait(self, inspection_ids: list[str], timeout: float, poll: float = 0.1) -> dict[str, Inspection]:
        """Poll the database until every inspection is done or failed (or the timeout)."""
        deadline = time.monotonic() + timeout
        pending = set(inspection_ids)
        final: dict[str, Inspection] = {}
        while pending and time.monotonic() < deadline:
            with self.sessions() as session:
                for iid in list(pending):
                    insp = repo.get_inspection(session, iid)
                    if insp is not None and insp.status in (InspectionStatus.done, InspectionStatus.failed):
                        _ = insp.result, insp.category, insp.line  # load before the session closes
                        final[iid] = insp
                        pending.discard(iid)
            if pending:
                time.sleep(poll)
        return final


def ensure_category(session, name: str, settings: Settings) -> tuple[Category, bool]:
    """The category, registered with the default prompt set and threshold on first sight."""
    cat = repo.get_category(session, name)
    if cat is not None:
        return cat, False
    validate_category_name(name)
    return register_category(session, name, settings.default_threshold, auto=True), True


def register_category(session, name: str, threshold: float, *, auto: bool) -> Category:
    prompt = load_prompt_file()
    return repo.create_category(
        session,
        name,
        threshold=threshold,
        prompt_content=prompt["content"],
        rvs_method=prompt["rvs_method"],
        rvs_params=prompt["rvs_params"],
        provenance={"source": "default", "file": "prompts/sdp_default.json", "name": prompt["name"]},
        auto_registered=auto,
        pipeline={"stages": ["segment"]},
    )


def validate_category_name(name: str) -> None:
    """Category names go verbatim into prompts and SQL reports: keep them printable and short."""
    if not name or len(name) > 128 or not name.isprintable() or name.strip() != name:
        raise UnknownCategory(f"invalid category name {name!r}")
    if any(c in name for c in "{}\\\"'`;<>"):
        raise UnknownCategory(f"category name {name!r} contains characters not allowed in names")
