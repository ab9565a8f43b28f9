"""The ``inspect`` command line: submit frames, follow jobs, read results, administer data."""

from __future__ import annotations

import glob
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from tqdm import tqdm

from common.images import ImageError, read_frame_file
from common.settings import reset_settings
from orchestrator.context import Orchestrator, open_orchestrator
from orchestrator.service import UnknownCategory
from storage import repo

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


@click.group()
@click.option("--weights", help="Override INSPECT_WEIGHTS for this run (e.g. 'random').")
@click.option("--model", "clip_model", help="Override INSPECT_CLIP_MODEL for this run.")
def cli(weights: str | None, clip_model: str | None) -> None:
    """Industrial visual inspection: CLIP-AD / FiLo / CLIP-LAD stages on a message queue."""
    if weights:
        os.environ["INSPECT_WEIGHTS"] = weights
    if clip_model:
        os.environ["INSPECT_CLIP_MODEL"] = clip_model
    reset_settings()


def expand_paths(args: tuple[str, ...]) -> tuple[list[Path], list[str]]:
    """Files, folders (recursively, image suffixes) and globs -> files; plus error messages."""
    files: list[Path] = []
    errors: list[str] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(f"{arg}: folder contains no image files")
            files.extend(found)
        elif p.exists():
            files.append(p)
        elif any(c in arg for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(arg, recursive=True) if Path(f).is_file())
            if not found:
                errors.append(f"{arg}: pattern matches no files")
            files.extend(found)
        else:
            errors.append(f"{arg}: no such file or folder")
    return files, errors


@cli.command()
@click.option("--line", required=True, help="Production line name or number.")
@click.option("--category", required=True, help="Product category (any name works zero-shot).")
@click.option("--station", default=None)
@click.option("--serial", default=None, help="Part serial number (single frame) for traceability.")
@click.option("--strict/--no-strict", default=None, help="Refuse categories not registered yet.")
@click.option("--wait", is_flag=True, help="Wait for verdicts and print them.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait with --wait.")
@click.argument("paths", nargs=-1, required=True)
def submit(line, category, station, serial, strict, wait, timeout, paths) -> None:
    """Submit frames (files, folders, globs); prints one job id per frame."""
    files, errors = expand_paths(paths)
    for e in errors:
        click.echo(f"error: {e}", err=True)
    orch = open_orchestrator()
    jobs: list[tuple[str, Path]] = []
    announced = False
    for path in tqdm(files, desc="submitting", unit="frame", disable=len(files) < 2, file=sys.stderr):
        try:
            data = read_frame_file(str(path), max_bytes=orch.settings.max_image_bytes)
            sub = orch.intake.submit(
                data, line=line, category=category, station=station, serial=serial, strict=strict
            )
        except (ImageError, UnknownCategory) as exc:
            msg = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
            errors.append(msg)
            click.echo(f"error: {msg}", err=True)
            continue
        if sub.category_registered and not announced:
            click.echo(
                f"note: category {category!r} was new; registered with the default prompt set "
                f"and threshold {orch.settings.default_threshold} (see `inspect category show`)",
                err=True,
            )
            announced = True
        jobs.append((sub.inspection_id, path))
        if not wait:
            click.echo(f"{sub.inspection_id}\t{path}")
    if wait and jobs:
        _print_waited(orch, jobs, timeout)
    if errors:
        sys.exit(2)


def _print_waited(orch: Orchestrator, jobs: list[tuple[str, Path]], timeout: float) -> None:
    final = orch.intake.wait([j for j, _ in jobs], timeout)
    late = False
    for job, path in jobs:
        insp = final.get(job)
        if insp is None:
            click.echo(f"{job}\tPENDING\t{path}\t(still running after {timeout:.0f}s)")
            late = True
        elif insp.result is None:
            click.echo(f"{job}\tFAILED\t{path}\t{insp.reason}")
        else:
            r = insp.result
            tag = "\t[random weights]" if r.random_weights else ""
            click.echo(
                f"{job}\t{r.verdict.value}\tscore={r.image_score:.4f}\t{path}\t"
                f"heatmap={orch.store.url(r.overlay_key)}{tag}"
            )
    if late:
        sys.exit(3)


@cli.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
def status(job: str, as_json: bool) -> None:
    """Status, stages and result of one job (inspection id or frame id)."""
    orch = open_orchestrator()
    with orch.sessions() as s:
        insp = repo.get_inspection(s, job) or repo.get_inspection_by_frame(s, job)
        if insp is None:
            raise click.ClickException(f"no job {job}")
        doc = inspection_doc(orch, insp)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    for k, v in doc.items():
        if k != "stages":
            click.echo(f"{k:>14}: {v}")
    for st in doc["stages"]:
        click.echo(f"{'stage':>14}: {st['stage']} {st['status']} {st['duration_ms'] or 0:.1f} ms "
                   f"{st['error'] or ''}".rstrip())


def inspection_doc(orch: Orchestrator, insp) -> dict:
    r = insp.result
    doc = {
        "job": insp.id, "frame_id": insp.frame_id, "status": insp.status.value,
        "reason": insp.reason, "line": insp.line.name, "station": insp.station,
        "category": insp.category.name, "serial": insp.serial, "created_at": insp.created_at,
        "finished_at": insp.finished_at,
        "stages": [
            {"stage": st.stage, "status": st.status.value, "duration_ms": st.duration_ms,
             "error": st.error, "attempts": st.attempts}
            for st in insp.stage_runs
        ],
    }
    if r is not None:
        doc.update(
            verdict=r.verdict.value, score=r.image_score, threshold=r.threshold,
            model=r.model_name, weights=r.weights_ref, random_weights=r.random_weights,
            prompt_set_version=r.prompt_set_version, heatmap=orch.store.url(r.overlay_key),
            anomaly_map=orch.store.url(r.anomaly_map_key),
        )
    return doc


def parse_since(value: str | None) -> datetime | None:
    """ISO time or a relative span such as 30m, 8h, 2d."""
    if not value:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(value[:-1]) * units[value[-1]])
    try:
        t = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: use ISO time or 30m / 8h / 2d") from exc
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@cli.command()
@click.option("--line", default=None)
@click.option("--category", default=None)
@click.option("--since", default=None, help="ISO time or 30m / 8h / 2d.")
@click.option("--verdict", type=click.Choice(["OK", "NG"]), default=None)
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def results(line, category, since, verdict, limit, as_json) -> None:
    """Recent inspections with verdicts, newest first."""
    orch = open_orchestrator()
    with orch.sessions() as s:
        rows = repo.list_results(s, line=line, category=category, since=parse_since(since),
                                 verdict=verdict, limit=limit)
        docs = [inspection_doc(orch, insp) for insp, _ in rows]
    if as_json:
        click.echo(json.dumps(docs, indent=2, default=str))
        return
    for d in docs:
        score = f"{d['score']:.4f}" if "score" in d else "-"
        click.echo(f"{d['created_at']:%Y-%m-%d %H:%M:%S}\tline={d['line']}\t{d['category']}\t"
                   f"{d.get('verdict', d['status'].upper())}\t{score}\t{d['job']}\t{d['serial'] or ''}")


def main() -> None:
    cli(prog_name="inspect")


# Command groups register themselves on ``cli``; imported last because they import ``cli``.
from orchestrator import cli_admin, cli_bank, cli_data, cli_eval, cli_mes, cli_prompts  # noqa: E402, F401
