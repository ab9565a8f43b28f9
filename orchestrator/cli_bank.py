"""`inspect bank`: CLIP-LAD memory banks, built as a task, versioned per (line, category)."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from common.images import ImageError, decode_image, read_frame_file
from orchestrator.cli import cli, expand_paths
from orchestrator.context import open_orchestrator
from orchestrator.service import ensure_category
from prompts import load_lad_vocabulary
from storage import bank_repo, keys, repo
from storage.orm import BankStatus


@cli.group()
def bank() -> None:
    """Memory banks for the logical stage (CLIP-LAD)."""


def _upload(orch, paths: list[Path], what: str) -> list[str]:
    """Validate and store images content-addressed; the task reads them by key."""
    out = []
    for p in tqdm(paths, desc=f"uploading {what}", unit="image", disable=len(paths) < 2, file=sys.stderr):
        try:
            data = read_frame_file(str(p), max_bytes=orch.settings.max_image_bytes)
            frame = decode_image(data, max_pixels=orch.settings.max_image_pixels)
        except ImageError as exc:
            raise click.ClickException(f"{p}: {exc}") from exc
        key = keys.image_key(hashlib.sha256(data).hexdigest(), frame.ext)
        orch.store.put_bytes(key, data, content_type=frame.content_type)
        out.append(key)
    return out


@bank.command("build")
@click.option("--category", required=True)
@click.option("--images", "images", multiple=True, required=True, help="Normal images (files, folders, globs).")
@click.option("--validation", multiple=True, help="Normal images for the Mahalanobis statistics.")
@click.option("--shots", type=int, default=None, help="Use k of the images (seeded choice).")
@click.option("--seed", default=0, show_default=True)
@click.option("--line", default=None, help="Bank for one line (default: every line).")
@click.option("--clusters", type=int, default=None, help="Override the vocabulary's k-means cluster count.")
@click.option("--activate/--no-activate", default=True, show_default=True)
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", default=3600.0, show_default=True)
def bank_build(category, images, validation, shots, seed, line, clusters, activate, wait, timeout) -> None:
    """Fit centroids, histogram and patch banks and Mahalanobis statistics on normal images."""
    train_paths, errors = expand_paths(images)
    val_paths, val_errors = expand_paths(validation) if validation else ([], [])
    if errors or val_errors:
        raise click.ClickException("; ".join(errors + val_errors))
    if shots is not None:
        if shots > len(train_paths):
            raise click.ClickException(f"{shots} shots asked, {len(train_paths)} images given")
        train_paths = sorted(random.Random(seed).sample(train_paths, shots))
    orch = open_orchestrator()
    vocab = load_lad_vocabulary(category)
    config = {"seed": seed} | ({"n_clusters": clusters} if clusters else {})
    spec = {"train": _upload(orch, train_paths, "shots"), "validation": _upload(orch, val_paths, "validation"),
            "shots": len(train_paths), "config": config, "activate": activate,
            "vocabulary_file": vocab["name"], "sources": [str(p) for p in train_paths]}
    with orch.sessions.begin() as s:
        cat, _ = ensure_category(s, category, orch.settings)
        ps = _vocabulary_prompt_set(s, cat, vocab)
        ln = repo.get_or_create_line(s, line) if line else None
        b = bank_repo.create_bank(s, category=cat, line=ln, spec=spec, prompt_set_id=ps.id)
        bank_id, version = b.id, b.version
    click.echo(f"bank {bank_id}: {category} {'line ' + line if line else 'all lines'} v{version}, "
               f"{len(train_paths)} shots, {len(val_paths)} validation images")
    orch.intake.dispatcher.send_bank(bank_id)
    if wait:
        _wait(orch, bank_id, timeout)


def _vocabulary_prompt_set(s, cat, vocab):
    """The vocabulary as a versioned prompt set (kind clip-lad); reused when unchanged."""
    sha = repo.prompt_set_sha256(vocab["content"], "clip-lad", {})
    for ps in repo.list_prompt_sets(s, cat):
        if ps.kind == "clip-lad" and ps.sha256 == sha:
            return ps
    return repo.add_prompt_set(s, cat, content=vocab["content"], rvs_method="clip-lad", rvs_params={},
                               provenance={"source": "prompts/clip_lad", "name": vocab["name"]},
                               kind="clip-lad", activate=False)


def _wait(orch, bank_id: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with tqdm(total=100, desc="building bank", unit="%", file=sys.stderr) as bar:
        while time.monotonic() < deadline:
            with orch.sessions() as s:
                b = bank_repo.get_bank(s, bank_id)
                status, progress, error, stats = b.status, b.progress, b.error, b.stats
            bar.update(int(progress * 100) - bar.n)
            if status != BankStatus.building:
                break
            time.sleep(0.25)
    if status == BankStatus.failed:
        raise click.ClickException(f"bank {bank_id} failed: {error}")
    if status == BankStatus.building:
        raise click.ClickException(f"bank {bank_id} still building after {timeout:.0f}s")
    click.echo(f"bank {bank_id} ready: {json.dumps(stats)}")


@bank.command("list")
@click.option("--category", default=None)
def bank_list(category) -> None:
    orch = open_orchestrator()
    with orch.sessions() as s:
        cat = repo.get_category(s, category) if category else None
        if category and cat is None:
            raise click.ClickException(f"no category {category!r}")
        for b in bank_repo.list_banks(s, cat):
            line = b.line.name if b.line else "*"
            click.echo(f"{b.id}\t{b.category.name}\tline={line}\tv{b.version}\t{b.status.value}"
                       f"\t{'ACTIVE' if b.active else ''}\tshots={b.spec.get('shots')}"
                       f"\t{'[random weights]' if b.random_weights else ''}".rstrip())


@bank.command("show")
@click.argument("bank_id", type=int)
def bank_show(bank_id: int) -> None:
    orch = open_orchestrator()
    with orch.sessions() as s:
        b = bank_repo.get_bank(s, bank_id)
        if b is None:
            raise click.ClickException(f"no bank {bank_id}")
        doc = {"id": b.id, "category": b.category.name, "line": b.line.name if b.line else None,
               "version": b.version, "status": b.status.value, "active": b.active, "error": b.error,
               "object_key": b.object_key, "sha256": b.sha256, "bytes": b.size_bytes, "stats": b.stats,
               "model": b.model_name, "weights": b.weights_ref, "random_weights": b.random_weights,
               "prompt_set_version": b.prompt_set.version if b.prompt_set else None,
               "shots": b.spec.get("shots"), "sources": b.spec.get("sources")}
    click.echo(json.dumps(doc, indent=2, default=str))


@bank.command("activate")
@click.argument("bank_id", type=int)
def bank_activate(bank_id: int) -> None:
    """Use this bank for its (line, category) from the next frame on."""
    orch = open_orchestrator()
    with orch.sessions.begin() as s:
        b = bank_repo.get_bank(s, bank_id)
        if b is None:
            raise click.ClickException(f"no bank {bank_id}")
        try:
            bank_repo.activate_bank(s, b)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"bank {bank_id} is active")
