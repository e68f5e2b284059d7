"""`dicomnode export --deidentify OUT --labels FILE`: a de-identified training set."""

from __future__ import annotations

from pathlib import Path

import click

from dicomnode.cli import load_cli_config


@click.command()
@click.option("--deidentify", "out", required=True, type=click.Path(file_okay=False),
              metavar="OUT",
              help="Folder to write the de-identified set to (new or empty). Only "
                   "de-identified exports exist.")
@click.option("--labels", "labels", required=True, type=click.Path(dir_okay=False),
              help="Training labels CSV naming the studies (study_uid or sop_instance_uid).")
@click.pass_context
def export(ctx: click.Context, out: str, labels: str) -> None:
    """Images, result objects and labels of the labelled studies, under the DICOM Basic
    Application Level Confidentiality Profile (PS3.15 Annex E) with Retain Longitudinal
    Temporal Information with Modified Dates and Clean Descriptors. Pseudonyms and UIDs
    are derived from a key kept in the node's data_dir (never in OUT), so they are the same
    for every study of a patient and in every export."""
    from dicomnode.errors import DicomnodeError
    from dicomnode.export.deidentify import node_key
    from dicomnode.export.training_set import export_deidentified
    from dicomnode.wiring import open_store, storage_errors

    config = load_cli_config(ctx)
    key = node_key(config.data_path)
    with storage_errors():
        store = open_store(config)
        try:
            try:
                report = export_deidentified(store, key, Path(labels), Path(out), click.echo)
            except DicomnodeError as exc:
                store.audit("export", status="error", detail=str(exc))
                raise
            problems = bool(report.missing or report.refused)
            store.audit("export", count=report.studies, status="problems" if problems else "ok",
                        detail=report.summary())
        finally:
            store.close()
    click.echo(f"{report.studies} studies, {report.images} images, {report.results} results, "
               f"{report.labels} label rows written to {out}"
               + (f"; label columns left out: {', '.join(report.dropped_columns)}"
                  if report.dropped_columns else ""))
    if report.missing or report.refused:
        lines = [f"  {uid}: not in the archive" for uid in report.missing]
        lines += [f"  {why}" for why in report.refused]
        raise DicomnodeError(f"{len(report.missing)} studies missing and "
                             f"{len(report.refused)} objects refused:\n" + "\n".join(lines))
