"""Administrative commands: database, categories, model weights."""

from __future__ import annotations

import json
from pathlib import Path

import click

from common.settings import get_settings
from orchestrator.cli import cli
from orchestrator.context import open_orchestrator
from orchestrator.service import UnknownCategory, register_category, validate_category_name
from storage import keys, repo
from storage.db import ensure_schema


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Run Alembic migrations up to head on INSPECT_DATABASE_URL (or the embedded SQLite)."""
    ensure_schema(get_settings().resolved_database_url)
    click.echo("database is at head")


@cli.group()
def category() -> None:
    """Categories: thresholds, prompt sets, pipelines."""


@category.command("list")
def category_list() -> None:
    orch = open_orchestrator()
    with orch.sessions() as s:
        for c in repo.list_categories(s):
            ps = c.active_prompt_set
            click.echo(f"{c.name}\tthreshold={c.threshold}\tprompt_set=v{ps.version if ps else '-'}"
                       f"\t{'auto-registered' if c.auto_registered else 'registered'}")


@category.command("show")
@click.argument("name")
def category_show(name: str) -> None:
    orch = open_orchestrator()
    with orch.sessions() as s:
        c = _category(s, name)
        doc = {
            "name": c.name, "threshold": c.threshold, "score_norm": c.score_norm,
            "pipeline": c.pipeline, "auto_registered": c.auto_registered,
            "active_prompt_set": c.active_prompt_set.version if c.active_prompt_set else None,
            "prompt_sets": [
                {"version": p.version, "rvs_method": p.rvs_method, "rvs_params": p.rvs_params,
                 "sha256": p.sha256, "provenance": p.provenance,
                 "normal_states": len(p.content["normal_states"]),
                 "abnormal_states": len(p.content["abnormal_states"]),
                 "templates": len(p.content["templates"])}
                for p in repo.list_prompt_sets(s, c)
            ],
        }
    click.echo(json.dumps(doc, indent=2, default=str))


@category.command("add")
@click.argument("name")
@click.option("--threshold", type=float, default=None)
def category_add(name: str, threshold: float | None) -> None:
    """Register a category with the default prompt set (needed in strict mode)."""
    orch = open_orchestrator()
    with orch.sessions.begin() as s:
        if repo.get_category(s, name) is not None:
            raise click.ClickException(f"category {name!r} exists")
        try:
            validate_category_name(name)
        except UnknownCategory as exc:
            raise click.ClickException(str(exc)) from exc
        register_category(s, name, threshold if threshold is not None else orch.settings.default_threshold,
                          auto=False)
    click.echo(f"registered {name}")


@category.command("set")
@click.argument("name")
@click.option("--threshold", type=float, default=None, help="Verdict threshold (NG at or above).")
@click.option("--prompt-version", type=int, default=None, help="Activate this prompt-set version.")
@click.option("--rvs", type=click.Choice(["mean", "pca", "kde", "mean_shift", "dbscan"]), default=None,
              help="New prompt-set version with this RVS method (same sentences).")
@click.option("--rvs-params", default=None, help='JSON, e.g. \'{"eps": 1.5, "min_samples": 25}\'.')
@click.option("--score-norm", default=None, help='JSON {"cls": [lo, hi], "map": [lo, hi]} or "none".')
@click.option("--pipeline", "pipeline_json", default=None,
              help='JSON merged into the pipeline: stages, segment_method (sdp|filo), combine, logical_threshold.')
def category_set(name, threshold, prompt_version, rvs, rvs_params, score_norm, pipeline_json) -> None:
    """Change threshold, prompt set or score normalisation; takes effect on the next frame."""
    orch = open_orchestrator()
    with orch.sessions.begin() as s:
        c = _category(s, name)
        if rvs is not None or rvs_params is not None:
            base = c.active_prompt_set
            ps = repo.add_prompt_set(
                s, c, content=base.content, rvs_method=rvs or base.rvs_method,
                rvs_params=json.loads(rvs_params) if rvs_params else ({} if rvs else base.rvs_params),
                provenance={"source": "cli", "derived_from_version": base.version}, activate=True,
            )
            click.echo(f"prompt set v{ps.version} created and activated")
        norm = None
        if score_norm is not None:
            norm = {} if score_norm == "none" else json.loads(score_norm)
        pipeline = None
        if pipeline_json is not None:
            from orchestrator.planner import plan_stages

            pipeline = {**(c.pipeline or {}), **json.loads(pipeline_json)}
            try:
                plan_stages(pipeline)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from exc
        try:
            repo.set_category_fields(s, c, threshold=threshold, active_prompt_version=prompt_version,
                                     score_norm=norm, pipeline=pipeline)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"{c.name}: threshold={c.threshold} prompt_set=v{c.active_prompt_set.version}")


def _category(s, name: str):
    c = repo.get_category(s, name)
    if c is None:
        raise click.ClickException(f"no category {name!r}")
    return c


@cli.group()
def models() -> None:
    """Model weights registry (air-gapped sites import weights into object storage)."""


@models.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Registry name; set INSPECT_WEIGHTS to it.")
@click.option("--arch", default=None, help="open_clip architecture (default INSPECT_CLIP_MODEL).")
@click.option("--tag", default=None, help="Where the weights came from, e.g. laion400m_e31.")
def models_import(file: Path, name: str, arch: str | None, tag: str | None) -> None:
    """Validate weights against the architecture, store them as safetensors with their sha256."""
    from workers.weights import (  # torch is needed to read and check the checkpoint
        WeightsNotFound,
        build_model,
        sha256_bytes,
        state_dict_from_bytes,
        to_safetensors,
    )

    orch = open_orchestrator()
    arch = arch or orch.settings.clip_model
    try:
        state = state_dict_from_bytes(file.read_bytes())
        build_model(arch).load_state_dict(state, strict=True)
    except (WeightsNotFound, RuntimeError, ValueError) as exc:
        raise click.ClickException(f"{file} does not fit {arch}: {exc}") from exc
    data = to_safetensors(state)
    sha = sha256_bytes(data)
    key = keys.weights_key(name, sha)
    if not orch.store.exists(key):
        orch.store.put_bytes(key, data, content_type="application/octet-stream")
    with orch.sessions.begin() as s:
        repo.register_weights(s, name=name, arch=arch, tag=tag, sha256=sha, object_key=key,
                              size_bytes=len(data))
    click.echo(f"imported {name}: {arch} sha256={sha} key={key}")


@models.command("list")
def models_list() -> None:
    orch = open_orchestrator()
    with orch.sessions() as s:
        for w in repo.list_weights(s):
            click.echo(f"{w.name}\t{w.arch}\t{w.tag or '-'}\t{w.sha256[:16]}\t{w.size_bytes} B"
                       f"\t{w.object_key}")


@models.command("import-dir")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Registry name; set INSPECT_GROUNDING (or another setting) to it.")
@click.option("--kind", type=click.Choice(["grounding-dino"]), default="grounding-dino", show_default=True)
@click.option("--tag", default=None, help="Where the weights came from, e.g. IDEA-Research/grounding-dino-tiny.")
def models_import_dir(folder: Path, name: str, kind: str, tag: str | None) -> None:
    """Store a save_pretrained folder (config, weights, tokenizer) in the object store for air-gapped workers."""
    import hashlib

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not (folder / "config.json").is_file():
        raise click.ClickException(f"{folder} has no config.json: not a save_pretrained folder")
    manifest = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    sha = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    orch = open_orchestrator()
    prefix = f"models/{name}/{sha}"
    for rel in manifest:
        orch.store.put_bytes(f"{prefix}/{rel}", (folder / rel).read_bytes())
    orch.store.put_bytes(f"{prefix}/manifest.json", json.dumps(manifest, indent=1).encode())
    size = sum(p.stat().st_size for p in files)
    with orch.sessions.begin() as s:
        repo.register_weights(s, name=name, arch=kind, tag=tag, sha256=sha, object_key=prefix, size_bytes=size)
    click.echo(f"imported {name}: {kind}, {len(files)} files, {size} B, manifest sha256={sha}")


@cli.command("deadletters")
@click.option("--follow", is_flag=True, help="Keep draining every few seconds.")
def deadletters(follow: bool) -> None:
    """Turn task messages the queues gave up on into failed inspections, banks or jobs."""
    import time

    from kombu import Connection

    from orchestrator.deadletters import drain

    orch = open_orchestrator()
    if orch.settings.embedded:
        raise click.ClickException("no broker configured (INSPECT_BROKER_URL): nothing is dead-lettered")
    with Connection(orch.settings.broker_url) as conn:
        while True:
            for line in drain(orch, conn):
                click.echo(line)
            if not follow:
                break
            time.sleep(5)
