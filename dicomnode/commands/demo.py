"""`dicomnode demo`: the README's main command. Starts the node on 127.0.0.1, sends it a
synthetic study over DICOM as a PACS would, waits for the SR, SEG and Parametric Maps, and
prints a summary per breast and the paths of PNG overlays."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from dicomnode.cli import load_cli_config
from dicomnode.commands.usage import OneLineCommand, OneLineUsageError


@click.command(cls=OneLineCommand)
@click.option("--out", "--workdir", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo-out"), show_default=True,
              help="Working folder: the study, the node's data and log, the received results, "
                   "the overlays (rewritten on each run).")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with dbt.pt, ffdm.pt and s2d.pt checkpoints (e.g. from `dicomnode "
                   "train`) to use instead of the built-in weights or the --config [model].")
@click.option("--seed", type=click.IntRange(min=0), default=1, show_default=True,
              help="Seed of the synthetic study (1: a right breast with a malignant and a "
                   "benign mass).")
@click.option("--modalities", default="dbt,ffdm,s2d", show_default=True,
              help="Comma-separated subset of dbt, ffdm, s2d to generate and send.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=900,
              show_default=True,
              help="Seconds to wait for the node to start, and for the results to come back.")
@click.pass_context
def demo(ctx: click.Context, out: Path, model_dir: Path | None, seed: int, modalities: str,
         timeout_s: float) -> None:
    """Run the node end to end on this machine with a synthetic study.

    Uses the built-in model weights, or --model-dir, or the [model] section of the global
    --config file (its [results] operating points too). Everything runs on 127.0.0.1 with
    free ports; nothing is left running afterwards."""
    from dicomnode.demo import DemoOptions, run_demo
    from dicomnode.synth import parse_modalities

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # progress lines say it all
        for name in ("dicomnode.synth", "matplotlib"):
            logging.getLogger(name).setLevel(logging.WARNING)

    try:
        wanted = parse_modalities(modalities)
    except ValueError as exc:
        raise OneLineUsageError(str(exc)) from None
    if not wanted:
        raise OneLineUsageError("--modalities must name at least one of dbt, ffdm, s2d")
    config = load_cli_config(ctx)
    options = DemoOptions(out=out, model=config.model, results=config.results,
                          model_dir=model_dir, seed=seed, modalities=wanted, timeout_s=timeout_s)
    report = run_demo(options, lambda line: click.echo(line))

    click.echo("")
    click.echo(f"Summary ({report.received} result objects received back over DICOM; "
               "probabilities and patches read from them):")
    for line in report.summary:
        click.echo(line)
    click.echo("")
    click.echo("PNG overlays (input, patch map, benign and malignant saliency):")
    for path in report.overlays:
        click.echo(f"  {path}")
    click.echo("")
    total = sum(seconds for _, seconds in report.stages)
    click.echo("Time by stage:")
    for name, seconds in report.stages:
        click.echo(f"  {name:<34} {seconds:6.1f} s")
        if name == "wait for results":
            for sub, sub_s in report.node_stages:
                click.echo(f"    node: {sub:<26} {sub_s:6.1f} s")
    click.echo(f"  {'total':<34} {total:6.1f} s")
