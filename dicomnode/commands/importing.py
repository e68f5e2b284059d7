"""`dicomnode import PATH...`: index DICOM files already on disk, as if a PACS sent them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from dicomnode.cli import load_cli_config
from dicomnode.errors import DicomnodeError


def _files(paths: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise DicomnodeError(f"{p} does not exist; name DICOM files or folders")
    return out


@click.command("import")
@click.argument("paths", nargs=-1, required=True)
@click.option("--ready", is_flag=True,
              help="Queue the imported studies for inference now (default: after the idle "
                   "time, as for received studies).")
@click.pass_context
def import_(ctx: click.Context, paths: tuple[str, ...], ready: bool) -> None:
    """Archive and index DICOM files (folders are walked); prints what happened to each."""
    from dicomnode.network.instance_checks import SOP_CLASS_NOT_SUPPORTED, StoreRefused
    from dicomnode.network.scp import archive_instance
    from dicomnode.wiring import open_store, policy_from_config, storage_errors

    config = load_cli_config(ctx)
    files = _files(paths)
    policy = policy_from_config(config)
    outcomes: Counter[str] = Counter()
    studies: set[str] = set()
    with storage_errors():
        store = open_store(config)
        try:
            for path in files:
                data = path.read_bytes()
                if data[128:132] != b"DICM":
                    outcomes["not DICOM"] += 1
                    continue
                try:
                    outcome, ds = archive_instance(store, data, policy, calling_ae=None)
                except StoreRefused as refused:
                    if refused.status == SOP_CLASS_NOT_SUPPORTED:  # e.g. a SEG beside images
                        outcomes["skipped (not a breast image)"] += 1
                        continue
                    outcomes["refused"] += 1
                    click.echo(f"refused {path}: 0x{refused.status:04X} {refused.comment}",
                               err=True)
                    continue
                outcomes[outcome] += 1
                studies.add(str(ds.StudyInstanceUID))
            if ready:
                for study_uid in sorted(studies):
                    store.force_ready(study_uid)
        finally:
            store.close()
    summary = ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items()))
    click.echo(f"{len(files)} files: {summary or 'nothing'}; {len(studies)} studies"
               + (" queued" if ready and studies else ""))
    if outcomes["refused"]:
        raise DicomnodeError(f"{outcomes['refused']} of {len(files)} files were refused (see "
                             "above); fix or remove them and import again")
