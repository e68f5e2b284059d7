"""`dicomnode dicomweb ...`: bearer tokens for [[peers]] token_sha256, and STOW-RS by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group()
def dicomweb() -> None:
    """DICOMweb (STOW-RS) helpers."""


@dicomweb.command("hash-token")
@click.option("--new", "new", is_flag=True, help="Make a new random token and print both.")
def hash_token_command(new: bool) -> None:
    """Print the sha256 of a bearer token (read from stdin) for a peer's token_sha256.

    The configuration holds only the hash; give the token itself to the peer."""
    import secrets

    from dicomnode.dicomweb.stow import hash_token

    if new:
        token = secrets.token_urlsafe(32)
        click.echo(f"token        {token}")
        click.echo(f"token_sha256 {hash_token(token)}")
        return
    token = sys.stdin.readline().strip()
    if not token:
        raise click.UsageError("give the token on stdin (or --new)")
    click.echo(hash_token(token))


@dicomweb.command("stow")
@click.argument("url")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--token-env", default="DICOMNODE_STOW_TOKEN", show_default=True,
              help="Environment variable holding the bearer token (never a flag: flags show "
                   "in ps).")
@click.option("--study", default=None, help="POST to /studies/STUDY.")
def stow_command(url: str, files: tuple[str, ...], token_env: str, study: str | None) -> None:
    """STOW-RS FILES (or the .dcm files of folders) to the DICOMweb base URL."""
    import os

    from dicomnode.dicomweb.client import StowError, StowTarget, post_instances
    from dicomnode.errors import DicomnodeError

    paths: list[Path] = []
    for name in files:
        path = Path(name)
        paths += sorted(path.rglob("*.dcm")) if path.is_dir() else [path]
    try:
        rsp = post_instances(StowTarget(url, token=os.environ.get(token_env, "")), paths, study)
    except StowError as exc:
        raise DicomnodeError(str(exc)) from None
    click.echo(f"HTTP {rsp.status}: {len(rsp.stored)} stored, {len(rsp.failed)} failed"
               + (f" ({rsp.error})" if rsp.error else ""))
    for uid, reason in sorted(rsp.failed.items()):
        click.echo(f"failed {uid or '-'}: 0x{reason:04X}")
    if rsp.status != 200:
        raise SystemExit(1)
