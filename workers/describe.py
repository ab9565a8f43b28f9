"""The describe stage (FiLo FG-Des): an LLM writes fine-grained defect phrases for one category,
stored as a new versioned prompt set of kind ``filo``.

Job params (written by ``inspect prompts generate``): category, llm ("openai" | "local" |
"defaults"), model, local_path, notes, captions, temperature, max_tokens, activate,
instruction_version. The LLM runs outside any transaction; the prompt set and the job's end are
written in one transaction, so a redelivered job either finds it done or starts over cleanly.
``LLMUnavailable`` propagates for the task to retry; any other LLM error fails the job.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from common.settings import Settings
from prompts.filo import FILO_KIND, filo_content, load_describe_instruction, with_filo_prompt_set
from storage import job_repo, repo
from storage.orm import Job, JobStatus
from workers.finalize import StageFailed
from workers.llm.base import LLMClient, LLMError, LLMUnavailable
from workers.llm.schema import check_defects
from workers.runtime import StageContext

log = logging.getLogger(__name__)
JOB_KIND = "describe"
BACKENDS = ("openai", "local", "defaults")
_TERMINAL = (JobStatus.done, JobStatus.failed)
_MAX_NOTES, _MAX_CAPTIONS, _MAX_CAPTION = 1000, 10, 300


def _setting(settings: Settings, name: str, default: Any = None) -> Any:
    """``settings.<name>`` when Settings declares it, else ``INSPECT_<NAME>`` from the environment."""
    value = getattr(settings, name, None)
    return value if value not in (None, "") else os.environ.get(f"INSPECT_{name.upper()}", default)


def make_client(params: dict[str, Any], settings: Settings) -> LLMClient:
    """The backend a job asks for; ``LLMError`` for an unknown one or missing model."""
    backend = params.get("llm") or "openai"
    if backend == "openai":
        from workers.llm.openai_http import OpenAIHTTPClient

        return OpenAIHTTPClient(
            params.get("model") or _setting(settings, "llm_model") or "",
            timeout=float(_setting(settings, "llm_timeout", 60.0)),
            retries=int(_setting(settings, "llm_retries", 2)),
        )
    if backend == "local":
        from workers.llm.local_hf import LocalHFClient

        path = params.get("local_path") or _setting(settings, "llm_local_path") or ""
        return LocalHFClient(path, device=settings.device, seed=int(params.get("seed", 0)))
    if backend == "defaults":
        from workers.llm.library import LibraryClient

        return LibraryClient(params["category"])
    raise LLMError(f"unknown LLM backend {backend!r} (choose from {', '.join(BACKENDS)})")


def object_name(category: str) -> str:
    """Readable object word for the LLM: "metal_nut" -> "metal nut", "pcb1" -> "pcb"."""
    name = " ".join(re.split(r"[_\s]+", category.strip()))
    return re.sub(r"(?<=[A-Za-z])\d+$", "", name) or name


def build_instruction(template: dict[str, Any], category: str, notes: str = "",
                      captions: list[str] | None = None) -> tuple[str, str]:
    """(system, user) with {category}, {object} and {notes} filled; other braces stay literal."""
    lines = [f"- {' '.join(notes.split())[:_MAX_NOTES]}"] if notes and notes.strip() else []
    lines += [f"- a photo shows: {' '.join(c.split())[:_MAX_CAPTION]}" for c in (captions or [])[:_MAX_CAPTIONS]
              if c and c.strip()]
    values = {"category": category, "object": object_name(category), "notes": "\n".join(lines) or "none"}

    def fill(text: str) -> str:  # one pass: text coming from notes is never substituted again
        return re.sub(r"\{(category|object|notes)\}", lambda m: values[m.group(1)], text)

    return fill(template["system"]), fill(template["user"])


def run_describe(job_id: str, ctx: StageContext) -> str:
    params = _start(ctx, job_id)
    if params is None:
        return job_id  # redelivered after the job ended
    category = params["category"]
    template = load_describe_instruction(params.get("instruction_version") or "v1")
    system, user = build_instruction(template, category, params.get("notes") or "", params.get("captions"))
    temperature = float(params["temperature"] if params.get("temperature") is not None else template["temperature"])
    max_tokens = int(params.get("max_tokens") or template["max_tokens"])
    backend = params.get("llm") or "openai"
    try:
        client = make_client(params, ctx.settings)
        raw = client.complete(system, user, temperature=temperature, max_tokens=max_tokens)
        checked = check_defects(raw)
    except LLMUnavailable:
        raise
    except LLMError as exc:
        raise StageFailed(f"{backend} LLM: {exc}") from exc
    provenance = {
        "source": "llm", "backend": client.name, "model": client.model,
        "base_url_host": getattr(client, "host", None), "local_path": getattr(client, "path", None),
        "instruction_version": template["version"],
        "instruction_sha256": hashlib.sha256(f"{system}\n\n{user}".encode()).hexdigest(),
        "parameters": {"temperature": temperature, "max_tokens": max_tokens, "notes": params.get("notes") or "",
                       "captions": list(params.get("captions") or [])},
        "raw_answer": raw[:8000], "dropped": [list(d) for d in checked.dropped],
        "time": datetime.now(UTC).isoformat(), "job_id": job_id,
    }
    with ctx.sessions.begin() as s:
        _store(s, job_id, category, checked.phrases, provenance, bool(params.get("activate")))
    return job_id


def _start(ctx: StageContext, job_id: str) -> dict[str, Any] | None:
    """Mark the job running (one more attempt) and return its params; None when already ended."""
    with ctx.sessions.begin() as s:
        job = job_repo.get_job(s, job_id)
        if job is None:
            raise StageFailed(f"no job {job_id}")
        if job.kind != JOB_KIND:
            raise StageFailed(f"job {job_id} is a {job.kind!r} job, not {JOB_KIND!r}")
        if job.status in _TERMINAL:
            return None
        params = dict(job.params or {})
        if not params.get("category"):
            raise StageFailed("job has no category")
        if repo.get_category(s, params["category"]) is None:
            raise StageFailed(f"no category {params['category']!r}")
        job_repo.start_job(s, job)
    return params


def _store(s: Session, job_id: str, category: str, phrases: list[str], provenance: dict[str, Any],
           activate: bool) -> None:
    job = s.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.status in _TERMINAL:
        return  # a concurrent delivery finished first: its prompt set stands, ours is not written
    cat = repo.get_category(s, category)
    if cat is None:
        raise StageFailed(f"category {category!r} was deleted while the LLM ran")
    ps = repo.add_prompt_set(s, cat, content=filo_content(phrases), rvs_method=FILO_KIND, rvs_params={},
                             provenance=provenance, kind=FILO_KIND, activate=False)
    if activate:  # the category's FiLo set lives in its pipeline; active_prompt_set stays the SDP one
        repo.set_category_fields(s, cat, pipeline=with_filo_prompt_set(cat.pipeline, ps.id))
    job_repo.finish_job(s, job, result={"prompt_set_id": ps.id, "version": ps.version, "category": category,
                                        "phrases": len(phrases), "activated": activate})
    log.info("describe %s: %s prompt set v%d (%d phrases)", job_id, category, ps.version, len(phrases))


def record_describe_failure(ctx: StageContext, job_id: str, reason: str) -> None:
    """Fail the job with its reason (no prompt set is written); an ended job is left as it is."""
    with ctx.sessions.begin() as s:
        job = job_repo.get_job(s, job_id)
        if job is None:
            log.error("describe for unknown job %s: %s", job_id, reason)
            return
        if job.status not in _TERMINAL:
            job_repo.finish_job(s, job, error=reason[:2000] or "failed")
