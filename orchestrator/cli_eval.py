"""`inspect eval`: measure a method on a dataset root (MVTec AD, VisA, MVTec LOCO, synthetic)."""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.cli import cli


@cli.command("eval")
@click.option("--method", type=click.Choice(["sdp", "patch-memory", "clip-lad"]), default="sdp", show_default=True)
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Dataset root folder.")
@click.option("--dataset", "kind", type=click.Choice(["mvtec", "visa", "loco"]), default=None,
              help="Folder layout (auto-detected when omitted).")
@click.option("--categories", default=None, help="Comma-separated subset (default: all).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval-out"), show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--shots", default="4", show_default=True, help="Normal images in the memory; clip-lad: list, 1,2,4.")
@click.option("--seed", default=0, show_default=True)
@click.option("--seeds", default=1, show_default=True, help="clip-lad: repetitions with different shots.")
@click.option("--subtypes", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="clip-lad: JSON {image path relative to root: sub-type} to split categories.")
@click.option("--limit", type=int, default=None, help="Test images per category (quick look).")
@click.option("--via-queue", is_flag=True, help="Submit every image through the deployed stages.")
@click.option("--compare", is_flag=True, help="Print the seeds' published numbers beside ours.")
def eval_cmd(method, root, kind, categories, out, batch_size, shots, seed, seeds, subtypes, limit, via_queue,
             compare) -> None:
    """Per-category pixel AUROC, F1-max, AP, AUPRO and image AUROC, F1-max, AP; curves and grids."""
    from evaluation.datasets import DatasetError  # torch-free until a model is needed
    from evaluation.report import HEADERS, _fmt, compare_lines, published
    from evaluation.runner import EvalConfig, run_eval

    cats = [c.strip() for c in categories.split(",")] if categories else None
    try:
        shot_list = [int(k) for k in shots.split(",")]
    except ValueError as exc:
        raise click.BadParameter(f"{shots!r}: use a number or a list such as 1,2,4") from exc
    if method == "clip-lad":
        _clip_lad(root, kind, cats, shot_list, seeds, out, subtypes, batch_size)
        return
    cfg = EvalConfig(method=method, root=root, out=out, kind=kind, categories=cats, batch_size=batch_size,
                     shots=shot_list[0], seed=seed, via_queue=via_queue, limit=limit)
    try:
        res = run_eval(cfg)
    except (DatasetError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    keys = list(HEADERS)
    click.echo("category\t" + "\t".join(HEADERS[k] for k in keys))
    for cat, row in res.rows.items():
        click.echo(f"{cat}\t" + "\t".join(_fmt(row.get(k)) for k in keys))
    if compare:
        theirs = published(method, res.dataset)
        if not theirs:
            click.echo(f"no published numbers for {method} on {res.dataset}")
        for line in compare_lines(res.rows, theirs):
            click.echo(line)
    click.echo(f"wrote {out}/table.md, table.csv, curves_*.png, grid_*.png")


def _clip_lad(root, kind, cats, shots, seeds, out, subtypes, batch_size) -> None:
    import json

    from evaluation.datasets import DatasetError, open_dataset
    from evaluation.lad_eval import SPLITS, run_clip_lad

    try:
        ds = open_dataset(root, kind)
        mapping = json.loads(subtypes.read_text()) if subtypes else None
        rows = run_clip_lad(ds, cats or ds.categories(), shots, seeds, out, mapping, batch_size)
    except (DatasetError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("category\tshots\t" + "\t".join(f"AUROC {s}" for s in SPLITS))
    for name, r in rows.items():
        cat, k = name.split("|")
        cells = [f"{100 * r[f'{s}_mean']:.1f}±{100 * r[f'{s}_std']:.1f}" for s in SPLITS]
        click.echo(f"{cat}\t{k}\t" + "\t".join(cells))
    click.echo(f"wrote {out}/table.md, table.csv")
