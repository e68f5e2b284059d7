"""`dicomnode jobs list|show ID|retry ID|recommit ID|cancel ID`: the inference queue, for
admins."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING

import click

from dicomnode.cli import load_cli_config

if TYPE_CHECKING:
    from storage import Store

STATES = ("receiving", "queued", "running", "done", "failed", "cancelled")


@contextmanager
def _store(ctx: click.Context) -> Iterator[Store]:
    from dicomnode.wiring import open_store, storage_errors

    config = load_cli_config(ctx)
    with storage_errors():
        store = open_store(config)
        try:
            yield store
        finally:
            store.close()


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    line = text.splitlines()[0]
    return line if len(line) <= width else line[: width - 3] + "..."


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)


@click.group()
def jobs() -> None:
    """List, show, retry or cancel inference jobs (one per study)."""


@jobs.command("list")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only jobs in this state.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.pass_context
def list_jobs(ctx: click.Context, state: str | None, limit: int) -> None:
    """Jobs, most recently updated first."""
    with _store(ctx) as store:
        found = store.list_jobs(state=state, limit=limit)
    if not found:
        click.echo("no jobs" + (f" in state {state}" if state else ""))
        return
    rows = [["ID", "STATE", "ATTEMPTS", "STUDY", "FROM", "UPDATED", "LAST ERROR"]]
    rows += [[str(j.id), j.state.value, str(j.attempts), j.study_uid, j.calling_ae or "-",
              _when(j.finished_at or j.started_at or j.queued_at or j.last_instance_at),
              _short(j.last_error)] for j in found]
    click.echo(_table(rows))


@jobs.command("show")
@click.argument("job_id", type=int)
@click.pass_context
def show(ctx: click.Context, job_id: int) -> None:
    """One job: state, timings, lease, error, its study's results and their deliveries."""
    with _store(ctx) as store:
        detail = store.job_detail(job_id)
        commitments = store.commitments(job_id=job_id)
    j = detail.job
    fields = [
        ("job", str(j.id)), ("study", j.study_uid), ("state", j.state.value),
        ("attempts", str(j.attempts)), ("calling AE", j.calling_ae or "-"),
        ("instances", f"{detail.instance_count} in {detail.series_count} series"),
        ("last instance", _when(j.last_instance_at)), ("created", _when(j.created_at)),
        ("queued", _when(j.queued_at)), ("started", _when(j.started_at)),
        ("finished", _when(j.finished_at)),
        ("lease", f"{j.lease_owner} until {_when(j.lease_expires_at)}" if j.lease_owner else "-"),
        ("rerun pending", "yes" if j.rerun else "no"),
        ("last error", (j.last_error or "-").replace("\n", " | ")),
    ]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        click.echo(f"{key.ljust(width)}  {value}")
    if detail.results:
        click.echo("\nresults")
        click.echo(_table([["ID", "KIND", "SOP INSTANCE UID", "SIZE"]] + [
            [str(r.id), r.kind, r.sop_instance_uid, str(r.size)] for r in detail.results]))
    if detail.deliveries:
        click.echo("\ndeliveries")
        click.echo(_table([["ID", "DESTINATION", "STATE", "ATTEMPTS", "NEXT", "STATUS",
                            "LAST ERROR"]] + [
            [str(d.id), d.destination, d.state.value, str(d.attempts),
             _when(d.next_attempt_at), d.last_status or "-", _short(d.last_error, 40)]
            for d in detail.deliveries]))
    if commitments:
        click.echo("\nstorage commitment")
        click.echo(_table([["DELIVERY", "DESTINATION", "STATE", "REQUESTED", "REPORTED",
                            "FAILURE", "SOP INSTANCE UID"]] + [
            [str(c.delivery_id), c.destination, c.state.value, _when(c.requested_at),
             _when(c.reported_at), c.failure or "-", c.result_sop_instance_uid]
            for c in commitments]))


@jobs.command("retry")
@click.argument("job_id", type=int)
@click.pass_context
def retry(ctx: click.Context, job_id: int) -> None:
    """Queue a failed or cancelled job again, and retry its dead-lettered deliveries."""
    with _store(ctx) as store:
        outcome = store.retry_job(job_id)
    parts = []
    if outcome.job_requeued:
        parts.append(f"job {job_id} queued again")
    if outcome.deliveries_requeued:
        parts.append(f"{outcome.deliveries_requeued} dead-lettered deliveries due again")
    click.echo("; ".join(parts))


@jobs.command("recommit")
@click.argument("job_id", type=int)
@click.pass_context
def recommit(ctx: click.Context, job_id: int) -> None:
    """Send again the job's results whose storage commitment failed or never got a report,
    then ask the destination to commit them again (retention waits for them)."""
    with _store(ctx) as store:
        count = store.resend_uncommitted(job_id)
    click.echo(f"{count} results of job {job_id} due to be sent again" if count else
               f"job {job_id} has no uncommitted results")


@jobs.command("cancel")
@click.argument("job_id", type=int)
@click.pass_context
def cancel(ctx: click.Context, job_id: int) -> None:
    """Cancel a job: it will not run; a worker running it stops at its next lease renewal."""
    with _store(ctx) as store:
        job = store.cancel_job(job_id)
    click.echo(f"job {job.id} ({job.study_uid}) cancelled")
