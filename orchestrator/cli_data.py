"""``inspect data``: dataset utilities, e.g. synthetic defect data for tests, benchmarks and demos."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from orchestrator.cli import cli


@cli.group()
def data() -> None:
    """Datasets: synthetic defect data in MVTec AD / MVTec LOCO AD layouts."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset root; the category folder is written inside it.")
@click.option("--kind", required=True, type=click.Choice(["texture", "object", "logical"]),
              help="texture/object: MVTec AD layout; logical: MVTec LOCO AD layout.")
@click.option("--n", "n", required=True, type=click.IntRange(min=1),
              help="Test images per defect type (and of test/good).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--size", default=128, show_default=True, type=click.IntRange(min=64, max=4096),
              help="Image side in pixels.")
@click.option("--category", default=None, help="Category folder name [default: synth_<kind>].")
@click.option("--n-train", "n_train", default=None, type=click.IntRange(min=1),
              help="Good training images [default: max(n, 8)].")
def data_synth(out: Path, kind: str, n: int, seed: int, size: int, category: str | None,
               n_train: int | None) -> None:
    """Write seeded synthetic defect images with ground-truth masks."""
    # Imported here so the rest of the CLI keeps working where the evaluation package is absent.
    from evaluation import synth

    counts = synth.planned_counts(kind, n, n_train)
    with tqdm(total=sum(counts.values()), unit="img", desc=f"synth {kind}", file=sys.stderr) as bar:
        try:
            root = synth.generate(out, kind, n, seed=seed, size=size, category=category, n_train=n_train,
                                  on_image=lambda _path: bar.update())
        except (ValueError, FileExistsError) as exc:
            raise click.ClickException(str(exc)) from exc
    layout = "MVTec LOCO AD" if kind == "logical" else "MVTec AD"
    click.echo(f"wrote {root} ({layout} layout, kind={kind}, seed={seed}, {size}x{size} px)")
    for folder, count in counts.items():
        click.echo(f"  {folder}: {count}")
