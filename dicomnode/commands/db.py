"""`dicomnode db upgrade|current`: the database schema (Alembic migrations in storage/)."""

from __future__ import annotations

import click

from dicomnode.cli import load_cli_config

url_option = click.option("--url", default=None, metavar="URL",
                          help="Database URL (default: [database] url of the configuration).")


@click.group()
def db() -> None:
    """Database schema maintenance."""


@db.command("upgrade")
@url_option
@click.pass_context
def upgrade(ctx: click.Context, url: str | None) -> None:
    """Create or upgrade the schema to this version's head (safe to run again)."""
    from dicomnode.wiring import storage_errors
    from storage import mask_url
    from storage import upgrade as run_upgrade

    url = url or load_cli_config(ctx).database_url
    with storage_errors():
        before, after = run_upgrade(url)
    if before == after:
        click.echo(f"database {mask_url(url)} already at revision {after} (head)")
    else:
        click.echo(f"database {mask_url(url)} upgraded from {before or 'empty'} to {after}")


@db.command("current")
@url_option
@click.pass_context
def current(ctx: click.Context, url: str | None) -> None:
    """Show the schema revision of the database and this version's head."""
    from dicomnode.wiring import storage_errors
    from storage import (
        check_connection,
        create_storage_engine,
        current_revision,
        head_revision,
        mask_url,
    )

    url = url or load_cli_config(ctx).database_url
    with storage_errors():
        engine = create_storage_engine(url)
        try:
            check_connection(engine)
            revision = current_revision(engine)
        finally:
            engine.dispose()
    head = head_revision()
    state = "up to date" if revision == head else "run `dicomnode db upgrade`"
    click.echo(f"database {mask_url(url)}: revision {revision or 'none'}, head {head} ({state})")
