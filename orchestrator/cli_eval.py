"""`inspect eval`: measure a method on a dataset root (MVTec AD, VisA, MVTec LOCO, synthetic)."""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.cli import cli


@cli.command("eval")
@click.option("--method", type=click.Choice(["sdp", "patch-memory"]), default="sdp", show_default=True)
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Dataset root folder.")
@click.option("--dataset", "kind", type=click.Choice(["mvtec", "visa", "loco"]), default=None,
              help="Folder layout (auto-detected when omitted).")
@click.option("--categories", default=None, help="Comma-separated subset (default: all).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval-out"), show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--shots", default=4, show_default=True, help="Normal images in the memory (few-shot).")
@click.option("--seed", default=0, show_default=True)
@click.option("--limit", type=int, default=None, help="Test images per category (quick look).")
@click.option("--via-queue", is_flag=True, help="Submit every image through the deployed stages.")
@click.option("--compare", is_flag=True, help="Print the seeds' published numbers beside ours.")
def eval_cmd(method, root, kind, categories, out, batch_size, shots, seed, limit, via_queue, compare) -> None:
    """Per-category pixel AUROC, F1-max, AP, AUPRO and image AUROC, F1-max, AP; curves and grids."""
    from evaluation.datasets import DatasetError  # torch-free until a model is needed
    from evaluation.report import HEADERS, _fmt, compare_lines, published
    from evaluation.runner import EvalConfig, run_eval

    cats = [c.strip() for c in categories.split(",")] if categories else None
    cfg = EvalConfig(method=method, root=root, out=out, kind=kind, categories=cats, batch_size=batch_size,
                     shots=shots, seed=seed, via_queue=via_queue, limit=limit)
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
