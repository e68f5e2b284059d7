"""`dicomnode bench ...`: each benchmark prints a table and can write JSON (CLI.md)."""

from __future__ import annotations

import click

json_option = click.option("--json", "json_path", type=click.Path(dir_okay=False),
                           default=None, help="Also write the results as JSON to this file.")


@click.group()
def bench() -> None:
    """Benchmarks; each reports ratios against a baseline measured in the same run."""


def emit(report, json_path: str | None) -> None:
    click.echo(report.render())
    if json_path:
        report.write_json(json_path)
        click.echo(f"wrote {json_path}")
