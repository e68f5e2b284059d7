"""`dicomnode synth OUT --studies N ...`: write synthetic breast screening studies."""

from __future__ import annotations

from pathlib import Path

import click

from dicomnode.commands.usage import OneLineCommand, OneLineUsageError
from dicomnode.errors import DicomnodeError


@click.command(cls=OneLineCommand)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--studies", type=int, required=True, help="Number of studies (patients) to write.")
@click.option("--size", default="small", show_default=True, metavar="small|full",
              help="small: small field of view for tests and CPU training; full: clinical size.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Same seed, same bytes and UIDs.")
@click.option("--transfer-syntax", default="explicit", show_default=True, metavar="explicit|j2k",
              help="Explicit VR Little Endian or JPEG 2000 lossless pixel data (SEG: explicit).")
@click.option("--modalities", default="dbt,ffdm,s2d", show_default=True,
              help="Comma-separated subset of dbt, ffdm, s2d.")
@click.option("--dbt-layout", default="enhanced", show_default=True,
              metavar="enhanced|single-frame",
              help="One multi-frame DBT object per view, or one file per slice.")
@click.option("--dbt-geometry", default="shared", show_default=True, metavar="shared|per-frame",
              help="Where DBT plane orientation and pixel measures go.")
@click.option("--families", default="powerlaw", show_default=True,
              help="Texture families to draw each study's from: a comma-separated subset of "
                   "powerlaw, ligament, lumpy, mixture, or 'all'; '-lumpy' is all but lumpy "
                   "(leave one family out). Recorded per image in labels.csv (family).")
@click.option("--variety/--no-variety", default=False, show_default=True,
              help="Vary lesions (margins, 3-30 mm masses, calcification morphologies, "
                   "contrasts) and acquisition (noise, blur, tone curve, bit depth, vendor "
                   "header style) per study; off: the original generator, byte for byte.")
def synth(out: Path, studies: int, size: str, seed: int, transfer_syntax: str, modalities: str,
          dbt_layout: str, dbt_geometry: str, families: str, variety: bool) -> None:
    """Write synthetic combo-exam studies (DBT, FFDM, synthetic 2D; 4 views each) to OUT,
    with OUT/labels.csv, OUT/findings.json and a ground-truth SEG per image."""
    from dicomnode.synth import SynthOptions, generate_studies, parse_families, parse_modalities

    try:
        options = SynthOptions(studies=studies, size=size, seed=seed,
                               transfer_syntax=transfer_syntax,
                               modalities=parse_modalities(modalities), dbt_layout=dbt_layout,
                               dbt_geometry=dbt_geometry, families=parse_families(families),
                               variety=variety)
    except ValueError as exc:
        raise OneLineUsageError(str(exc)) from None
    if out.exists() and not out.is_dir():
        raise OneLineUsageError(f"OUT {out} is a file; give a folder (it is created if missing)")
    try:
        records = generate_studies(out, options)
    except OSError as exc:
        raise DicomnodeError(f"cannot write under {out}: {exc.strerror or exc}; "
                             "choose a writable folder with free space") from exc
    images = sum(len(r.images) for r in records)
    click.echo(f"wrote {len(records)} studies, {images} images to {out} "
               f"(labels: {out / 'labels.csv'})")
