"""`dicomnode inspect PATH...`: one line per breast image found, as the loader sees it."""

from __future__ import annotations

from pathlib import Path

import click

from dicomnode.pipeline.images import ImageHeader, read_pixels, scan_images


def describe(header: ImageHeader) -> str:
    """The one-line summary of an image. Reads only headers, unless the laterality has to
    be inferred from the pixels."""
    laterality = header.laterality
    if laterality is None:
        laterality = read_pixels(header).laterality + " (from image)"
    depth, rows, cols = header.shape
    row_mm, col_mm = header.pixel_spacing
    return "  ".join([
        str(header.display_path),
        header.modality,
        laterality,
        header.view or "-",
        f"{depth}x{rows}x{cols}",
        f"{row_mm:g}x{col_mm:g}mm",
        header.transfer_syntax_name,
    ])


@click.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
def inspect(paths: tuple[Path, ...]) -> None:
    """Show what loads from DICOM files and folders (recursive).

    One line per image: path (the folder for a single-frame DBT series), modality,
    laterality, view, shape DxHxW, pixel spacing (row x col), transfer syntax.
    Non-image objects (SEG, SR, ...) and non-DICOM files in folders are skipped; an unusable
    image, or a file named here that is not DICOM, is an error (exit status 1).
    """
    headers = scan_images(paths)
    if not headers:
        click.echo("no breast images found", err=True)
    for header in headers:
        click.echo(describe(header))
