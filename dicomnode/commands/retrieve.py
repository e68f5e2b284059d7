"""`dicomnode retrieve --labels FILE`: fetch the studies a CSV names from a PACS into the
archive (C-GET, C-MOVE or WADO-RS), for `dicomnode train`. Resumable; missing studies listed
and the exit status 1."""

from __future__ import annotations

from pathlib import Path

import click

from dicomnode.cli import load_cli_config


@click.command()
@click.option("--labels", "labels", required=True, type=click.Path(dir_okay=False),
              help="CSV naming the studies: a study_uid and/or accession_number column "
                   "(a training labels file will do).")
@click.option("--peer", default=None, metavar="AE",
              help="The [[peers]] ae_title to retrieve from (default: the one with "
                   "retrieve = true).")
@click.option("--method", type=click.Choice(["get", "move", "wado"]), default=None,
              help="C-GET, C-MOVE, or QIDO-RS + WADO-RS from the peer's dicomweb_url "
                   "(default: the peer's retrieve_method; unset: wado where the peer has a "
                   "dicomweb_url, else get).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write one CSV row per study: status, instances wanted/archived, detail.")
@click.option("--write-labels", "labels_out", type=click.Path(dir_okay=False), default=None,
              help="Write the rows of --labels whose study is complete in the archive, with "
                   "study_uid filled in (accession-keyed rows too): the labels for train.")
@click.pass_context
def retrieve(ctx: click.Context, labels: str, peer: str | None, method: str | None,
             report_path: str | None, labels_out: str | None) -> None:
    """Fetch studies by C-FIND then C-GET or C-MOVE, or (a DICOMweb peer) by QIDO-RS then
    WADO-RS with the peer's token and TLS settings; studies already complete in the archive
    are skipped, so a stopped run resumes. Prints a line per study. Exits 1 listing the
    studies that are missing at the PACS or did not arrive complete."""
    from dicomnode.errors import DicomnodeError
    from dicomnode.external import port_open
    from dicomnode.network.retrieve import (
        METHOD_NAMES,
        Retriever,
        read_study_keys,
        retrieve_peer,
        write_complete_labels,
    )
    from dicomnode.network.scp import StorageSCP
    from dicomnode.wiring import open_store, policy_from_config, storage_errors

    config = load_cli_config(ctx)
    keys = read_study_keys(labels)
    source = retrieve_peer(config, peer)
    policy = policy_from_config(config)

    def progress(n: int, total: int, o) -> None:
        what = {"complete": "already complete, skipped",
                "retrieved": f"retrieved, {o.archived} instances",
                "missing": "MISSING at the PACS",
                "incomplete": f"INCOMPLETE, {o.archived} of {o.wanted} instances",
                "error": "ERROR"}[o.status]
        detail = f" ({o.detail})" if o.detail and o.status != "missing" else ""
        click.echo(f"[{n}/{total}] {o.study_uid or o.key.text}: {what}{detail}")

    with storage_errors():
        store = open_store(config)
        scp = None
        try:
            retriever = Retriever(store, policy, source, config.node.ae_title, method=method,
                                  data_dir=config.data_path)
            where = (source.dicomweb_url if retriever.method == "wado"
                     else f"{source.host}:{source.port}")
            click.echo(f"{len(keys)} studies to retrieve from {source.ae_title} ({where}) "
                       f"by {METHOD_NAMES[retriever.method]}")
            if retriever.method == "move" and not port_open(config.node.port):
                # No node serving: receive the C-MOVE's C-STOREs here for the duration.
                scp = StorageSCP(store, policy, config.node.host, config.node.port)
                scp.start()
            try:
                report = retriever.retrieve(keys, progress)
            except DicomnodeError as exc:
                store.audit("retrieve", called_ae=source.ae_title[:16], status="error",
                            detail=str(exc))
                raise
            store.audit("retrieve", called_ae=source.ae_title[:16], peer=where[:200],
                        count=report.count("retrieved") + report.count("complete"),
                        status="problems" if report.problems else "ok",
                        detail=report.summary())
        finally:
            if scp is not None:
                scp.stop()
            store.close()
    if report_path:
        report.write_csv(Path(report_path))
    if labels_out:
        rows = write_complete_labels(labels, report, labels_out)
        click.echo(f"{rows} label rows of complete studies written to {labels_out}")
    click.echo(report.summary().replace("=", " ") + (f"; report in {report_path}"
                                                      if report_path else ""))
    if report.problems:
        lines = [f"  {o.study_uid or o.key.text} (line {o.key.line}): {o.status}"
                 + (f", {o.detail}" if o.detail else "") for o in report.problems]
        raise DicomnodeError(f"{len(report.problems)} of {len(report.outcomes)} studies were "
                             "not retrieved complete:\n" + "\n".join(lines)
                             + "\nrun again to resume; train uses only what is archived")
