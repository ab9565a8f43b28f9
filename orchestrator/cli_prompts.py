"""`inspect prompts`: versioned prompt sets per category; LLM-written FiLo descriptions as a job."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from orchestrator.cli import cli
from orchestrator.context import Orchestrator, open_orchestrator
from orchestrator.service import UnknownCategory, ensure_category
from prompts.filo import FILO_KIND, FILO_PIPELINE_KEY, with_filo_prompt_set
from storage import job_repo, repo
from storage.orm import Category, JobStatus, PromptSet

JOB_KIND = "describe"  # task "inspect.describe"; body workers.describe.run_describe


@cli.group("prompts")
def prompts_group() -> None:
    """Prompt sets: list, show, diff, activate; generate FiLo defect descriptions with an LLM."""


def _category(s, name: str) -> Category:
    cat = repo.get_category(s, name)
    if cat is None:
        raise click.ClickException(f"no category {name!r}")
    return cat


def _prompt_set(s, cat: Category, version: int) -> PromptSet:
    sets = repo.list_prompt_sets(s, cat)
    for ps in sets:
        if ps.version == version:
            return ps
    raise click.ClickException(f"category {cat.name!r} has no prompt set v{version} "
                               f"(versions: {[p.version for p in sets]})")


def _source(ps: PromptSet) -> str:
    prov = ps.provenance or {}
    if prov.get("backend"):
        return f"{prov['backend']}:{prov.get('model')}"
    return str(prov.get("source") or "-")


def _marks(cat: Category, ps: PromptSet) -> str:
    marks = []
    if cat.active_prompt_set_id == ps.id:
        marks.append("ACTIVE")
    if (cat.pipeline or {}).get(FILO_PIPELINE_KEY) == ps.id:
        marks.append("ACTIVE-FILO")
    return ",".join(marks)


@prompts_group.command("generate")
@click.option("--category", required=True)
@click.option("--llm", type=click.Choice(["openai", "local", "defaults"]), default="openai", show_default=True,
              help="openai: any OpenAI-compatible server (OPENAI_BASE_URL, OPENAI_API_KEY on the worker); "
                   "local: a transformers model directory; defaults: the reviewed built-in library.")
@click.option("--model", default=None, help="Model name (default: the worker's INSPECT_LLM_MODEL).")
@click.option("--local-path", default=None, help="Model directory on the worker (--llm local).")
@click.option("--notes", default="", help="Context for the LLM (material, known defect types).")
@click.option("--caption", "captions", multiple=True, help="A description of an example image (repeatable).")
@click.option("--temperature", type=float, default=None, help="Override the instruction's temperature.")
@click.option("--activate/--no-activate", default=False, show_default=True,
              help="Make the new set the category's FiLo descriptions.")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait with --wait.")
def prompts_generate(category, llm, model, local_path, notes, captions, temperature, activate, wait,
                     timeout) -> None:
    """Ask an LLM for fine-grained defect phrases -> a new prompt set version (kind filo)."""
    orch = open_orchestrator()
    params: dict[str, Any] = {"category": category, "llm": llm, "model": model, "local_path": local_path,
                              "notes": notes, "captions": list(captions), "temperature": temperature,
                              "activate": activate, "instruction_version": "v1"}
    with orch.sessions.begin() as s:
        try:
            ensure_category(s, category, orch.settings)
        except UnknownCategory as exc:
            raise click.ClickException(str(exc)) from exc
        job_id = job_repo.create_job(s, JOB_KIND, params).id
    click.echo(f"job {job_id}: describe {category} with {llm}", err=wait)
    try:
        orch.intake.dispatcher.send_job(job_id, JOB_KIND)
    except Exception as exc:  # the job row is committed: say why it will never run
        reason = f"could not enqueue: {type(exc).__name__}: {exc}"
        with orch.sessions.begin() as s:
            job_repo.finish_job(s, job_repo.get_job(s, job_id), error=reason)
        raise click.ClickException(reason) from exc
    if wait:
        _wait(orch, job_id, timeout)


def _wait(orch: Orchestrator, job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with orch.sessions() as s:
            job = job_repo.get_job(s, job_id)
            status, result, error = job.status, job.result, job.error
            phrases = []
            if status == JobStatus.done:
                ps = repo.get_prompt_set(s, result["prompt_set_id"])
                phrases = list(ps.content.get("phrases", [])) if ps else []
        if status in (JobStatus.done, JobStatus.failed) or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if status == JobStatus.failed:
        raise click.ClickException(f"job {job_id} failed: {error}")
    if status != JobStatus.done:
        click.echo(f"job {job_id} still {status.value} after {timeout:.0f}s", err=True)
        sys.exit(3)
    active = " (active)" if result.get("activated") else ""
    click.echo(f"{result['category']}: prompt set v{result['version']}{active}, {len(phrases)} phrases")
    for p in phrases:
        click.echo(f"  {p}")


@prompts_group.command("list")
@click.option("--category", required=True)
def prompts_list(category) -> None:
    """Versions of a category's prompt sets, oldest first."""
    orch = open_orchestrator()
    with orch.sessions() as s:
        cat = _category(s, category)
        for ps in repo.list_prompt_sets(s, cat):
            click.echo(f"v{ps.version}\t{ps.kind}\t{ps.rvs_method}\t{_source(ps)}\t"
                       f"{ps.created_at:%Y-%m-%d %H:%M}\t{_marks(cat, ps)}".rstrip())


@prompts_group.command("show")
@click.option("--category", required=True)
@click.option("--version", "version", type=int, required=True)
def prompts_show(category, version) -> None:
    """One prompt set as JSON (content, provenance, hash, active flags)."""
    orch = open_orchestrator()
    with orch.sessions() as s:
        cat = _category(s, category)
        ps = _prompt_set(s, cat, version)
        doc = {"id": ps.id, "category": cat.name, "version": ps.version, "kind": ps.kind,
               "rvs_method": ps.rvs_method, "rvs_params": ps.rvs_params, "content": ps.content,
               "provenance": ps.provenance, "sha256": ps.sha256, "created_at": ps.created_at,
               "active": cat.active_prompt_set_id == ps.id,
               "active_filo": (cat.pipeline or {}).get(FILO_PIPELINE_KEY) == ps.id}
    click.echo(json.dumps(doc, indent=2, default=str, ensure_ascii=False))


def _items(values: list[Any] | None) -> list[str]:
    return [x if isinstance(x, str) else json.dumps(x) for x in values or []]


def diff_content(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Added/removed items per list-valued key, then changed scalar keys (unified-style lines)."""
    out: list[str] = []
    for key in dict.fromkeys([*a, *b]):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if isinstance(va, list | None) and isinstance(vb, list | None):
            la, lb = _items(va), _items(vb)
            removed, added = [x for x in la if x not in lb], [x for x in lb if x not in la]
            out.append(f"@@ {key} @@")
            out += [f"-{x}" for x in removed] + [f"+{x}" for x in added]
            if not removed and not added:
                out.append(" (same items, different order)")
        else:
            out += [f"@@ {key} @@", f"-{json.dumps(va)}", f"+{json.dumps(vb)}"]
    return out


@prompts_group.command("diff")
@click.option("--category", required=True)
@click.argument("version_a", type=int)
@click.argument("version_b", type=int)
def prompts_diff(category, version_a, version_b) -> None:
    """What changed from VERSION_A to VERSION_B (phrases, states, templates, RVS settings)."""
    orch = open_orchestrator()
    with orch.sessions() as s:
        cat = _category(s, category)
        a, b = _prompt_set(s, cat, version_a), _prompt_set(s, cat, version_b)
        head = [f"--- {cat.name} v{a.version} ({a.kind}, {_source(a)})",
                f"+++ {cat.name} v{b.version} ({b.kind}, {_source(b)})"]
        lines = diff_content(a.content, b.content)
        lines += diff_content({"rvs_method": a.rvs_method, "rvs_params": a.rvs_params, "kind": a.kind},
                              {"rvs_method": b.rvs_method, "rvs_params": b.rvs_params, "kind": b.kind})
    if not lines:
        click.echo(f"v{version_a} and v{version_b} have the same content")
        return
    click.echo("\n".join(head + lines))


@prompts_group.command("activate")
@click.option("--category", required=True)
@click.option("--version", "version", type=int, required=True)
def prompts_activate(category, version) -> None:
    """Use a prompt set from the next frame on: kind filo as the FiLo descriptions, kind sdp as the states."""
    orch = open_orchestrator()
    with orch.sessions.begin() as s:
        cat = _category(s, category)
        ps = _prompt_set(s, cat, version)
        kind, ps_id = ps.kind, ps.id
        if kind == FILO_KIND:
            repo.set_category_fields(s, cat, pipeline=with_filo_prompt_set(cat.pipeline, ps_id))
        elif kind == "sdp":
            repo.set_category_fields(s, cat, active_prompt_version=version)
        else:
            raise click.ClickException(f"v{version} is a {kind!r} prompt set; it is used through its memory bank")
    what = "FiLo descriptions" if kind == FILO_KIND else "prompt set"
    click.echo(f"{category}: v{version} is the active {what}")
