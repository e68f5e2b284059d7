"""`dicomnode status`: is the node up, what is queued, what failed, disk, model, device.

Reads the configuration, the shared store and the status files that running node
processes write under <data_dir>/status/; probes the SCP port with a C-ECHO. Works on any
machine that shares the database (a worker host shows the queue; its own processes
appear when they share the data directory).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import datetime

import click

from dicomnode.cli import load_cli_config


def _echo_node(config) -> tuple[bool, str]:
    """Whether something listens on the configured port, and what a C-ECHO gets."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined] # generated

    host = "127.0.0.1" if config.node.host in ("0.0.0.0", "::", "") else config.node.host
    try:
        with socket.create_connection((host, config.node.port), timeout=3):
            pass
    except OSError as exc:
        return False, f"nothing listens on {host}:{config.node.port} ({exc.strerror or exc})"
    # Call as a configured peer where there is one: a node with an allow-list rejects others,
    # which still proves it is up.
    calling = config.peers[0].ae_title if config.peers else "DICOMNODE-STATUS"
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    assoc = ae.associate(host, config.node.port, ae_title=config.node.ae_title)
    if assoc.is_rejected:
        return True, (f"{config.node.ae_title} on {host}:{config.node.port} (association "
                      f"rejected for calling AE {calling}: the node is up, this host is not an "
                      "allowed peer)")
    if not assoc.is_established:
        return False, f"{host}:{config.node.port} accepts TCP but does not answer DICOM"
    try:
        rsp = assoc.send_c_echo()
        ok = rsp is not None and int(getattr(rsp, "Status", -1)) == 0
    finally:
        assoc.release()
    ms = 1000 * (time.perf_counter() - started)
    return ok, (f"{config.node.ae_title} on {host}:{config.node.port}, C-ECHO "
                f"{'ok' if ok else 'failed'} in {ms:.0f} ms")


def _probe_stow(config) -> tuple[bool, str] | None:
    """Whether the STOW-RS endpoint ([dicomweb] listen) accepts connections; None when off."""
    import socket

    from dicomnode.errors import ConfigError
    from dicomnode.ops.http import parse_listen

    if not config.dicomweb.listen:
        return None
    try:
        host, port = parse_listen(config.dicomweb.listen)
    except ConfigError as exc:
        return False, str(exc)
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    scheme = "https" if config.dicomweb.tls is not None else "http"
    try:
        with socket.create_connection((host, port), timeout=3):
            pass
    except OSError as exc:
        return False, f"nothing listens on {host}:{port} ({exc.strerror or exc})"
    return True, f"{scheme}://{host}:{port}/studies accepts connections"


def _model_lines(config, processes) -> tuple[list[str], str]:
    from dicomnode.pipeline.weights import ModelUnavailable, checkpoint_path

    lines = []
    for modality in ("dbt", "ffdm", "s2d"):
        spec = str(getattr(config.model, modality))
        try:
            path = checkpoint_path(modality, spec)
            state = "off" if path is None else f"{path} (found)"
        except ModelUnavailable as exc:
            state = f"UNAVAILABLE: {exc}"
        loaded = sorted({f"{p.role}:{p.pid}@{p.models_loaded[modality]}" for p in processes
                         if modality in p.models_loaded})
        lines.append(f"{modality}: {spec} -> {state}"
                     + (f"; loaded in {', '.join(loaded)}" if loaded else ""))
    try:
        from dicomnode.pipeline.weights import resolve_device

        device = f"{config.model.device} -> {resolve_device(config.model.device)}"
    except ModelUnavailable as exc:
        device = f"{config.model.device}: {exc}"
    except ImportError:
        device = f"{config.model.device} (torch is not installed)"
    used = sorted({p.device for p in processes if p.device})
    if used:
        device += f"; in use: {', '.join(used)}"
    return lines, device


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _states(counts: dict[str, int], order: tuple[str, ...]) -> str:
    names = [s for s in order if s in counts] + sorted(set(counts) - set(order))
    return ", ".join(f"{s} {counts[s]}" for s in names) or "none"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead.")
@click.option("--audit", "audit", type=click.IntRange(min=0), default=0, metavar="N",
              help="Also print the last N audit events (associations, rejections, "
                   "deliveries).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, audit: int) -> None:
    """Node up, associations, queue depth, oldest waiting job, failed deliveries, disk,
    model and device."""
    from dicomnode.ops.health import (
        disk_free_bytes,
        last_audit,
        queue_snapshot,
        read_status_files,
        recent_audit,
    )
    from dicomnode.wiring import archive_dir, open_store, storage_errors

    config = load_cli_config(ctx)
    up, node_detail = _echo_node(config)
    stow = _probe_stow(config)
    processes = read_status_files(config.data_path)
    with storage_errors():
        store = open_store(config)
        try:
            snap = queue_snapshot(store)
            dead = store.list_deliveries(state="dead", limit=20)
            events = recent_audit(store, audit) if audit else []
            commitments = {str(k): int(v) for k, v in store.commitment_counts().items()}
            uncommitted = store.commitments(state="failed", limit=20)
            oldest_pending = store.commitments(state="pending", limit=1)
            runs = {a: last_audit(store, a) for a in ("retrieve", "export")}
        finally:
            store.close()
    free = disk_free_bytes(archive_dir(config))
    model_lines, device = _model_lines(config, processes)
    if as_json:
        click.echo(json.dumps({
            "node": {"up": up, "detail": node_detail},
            "stow": None if stow is None else {"up": stow[0], "detail": stow[1]},
            "processes": [asdict(p) for p in processes],
            "associations_open": sum(p.associations_open for p in processes),
            "jobs": snap.jobs, "deliveries": snap.deliveries,
            "oldest_queued_job": snap.oldest_queued_job,
            "oldest_queued_seconds": snap.oldest_queued_seconds,
            "dead_letters": [{"id": d.id, "destination": d.destination,
                              "sop_instance_uid": d.result_sop_instance_uid,
                              "status": d.last_status, "error": d.last_error} for d in dead],
            "commitments": commitments,
            "oldest_pending_commitment": (oldest_pending[0].requested_at.isoformat()
                                          if oldest_pending else None),
            "commitment_failures": [{"delivery_id": c.delivery_id, "destination": c.destination,
                                     "sop_instance_uid": c.result_sop_instance_uid,
                                     "failure": c.failure} for c in uncommitted],
            **{f"last_{a}": None if r is None else {"at": r.at.isoformat(), "status": r.status,
                                                     "studies": r.count, "detail": r.detail}
               for a, r in runs.items()},
            "disk_free_bytes": free, "min_free_mb": config.storage.min_free_mb,
            "model": model_lines, "device": device,
            "audit": [{**asdict(e), "at": e.at.isoformat()} for e in events],
        }, default=str))
        return
    rows = [("node", ("up: " if up else "DOWN: ") + node_detail)]
    if stow is not None:
        rows.append(("stow-rs", ("up: " if stow[0] else "DOWN: ") + stow[1]))
    if processes:
        for p in processes:
            parts = [f"{p.role} pid {p.pid} on {p.host}", f"updated {_ago(p.age_s)} ago"]
            if p.listen:
                parts.append(f"{p.associations_open} associations open, "
                             f"{p.instances_received} instances received")
            if p.stow_listen:
                parts.append(f"STOW-RS {p.stow_listen}: {p.stow_requests} requests, "
                             f"{p.stow_instances_received} instances stored")
            if p.role != "serve":
                parts.append(f"{p.jobs_done} jobs done, {p.jobs_failed} failed, "
                             f"{p.deliveries_sent} results sent")
            if p.http:
                parts.append(f"http {p.http}")
            rows.append(("process", "; ".join(parts)))
    else:
        rows.append(("process", f"no running node process writes to {config.data_path}"))
    rows.append(("jobs", _states(snap.jobs, ("receiving", "queued", "running", "done",
                                             "failed", "cancelled"))))
    if snap.oldest_queued_job is not None:
        rows.append(("oldest waiting", f"job {snap.oldest_queued_job}, queued "
                     f"{_ago(snap.oldest_queued_seconds)} ago"))
    else:
        rows.append(("oldest waiting", "no job is waiting for a worker"))
    pending = snap.deliveries.get("pending", 0)
    rows.append(("deliveries", _states(snap.deliveries, ("pending", "sending", "done", "dead",
                                                         "cancelled"))
                 + (f" ({pending} waiting or backing off)" if pending else "")))
    for d in dead:
        rows.append(("dead letter", f"delivery {d.id} to {d.destination}: "
                     f"{d.last_status or '-'} {(d.last_error or '')[:80]}"))
    if dead:
        rows.append(("", "resend with `dicomnode jobs retry JOB_ID` (`jobs show` names them)"))
    if commitments:
        rows.append(("commitment", _states(commitments, ("pending", "committed", "failed"))
                     + (" (pending/failed keep their sources from retention)"
                        if set(commitments) - {"committed"} else "")))
    if oldest_pending:
        from storage import utcnow

        age = (utcnow() - oldest_pending[0].requested_at).total_seconds()
        rows.append(("oldest pending", f"commitment asked {_ago(age)} ago of "
                     f"{oldest_pending[0].destination} (no report yet; `jobs recommit` "
                     "sends again)"))
    for c in uncommitted:
        rows.append(("not committed", f"delivery {c.delivery_id} to {c.destination}: "
                     f"{c.failure or '-'} (`jobs recommit` sends again)"))
    for activity, record in runs.items():
        rows.append((f"last {activity}", "never" if record is None else
                     f"{_when(record.at)}: {record.status or '-'}; {record.detail or ''}"))
    low = free is not None and free < config.storage.min_free_mb * 2**20
    rows.append(("disk", ("-" if free is None else f"{free / 2**30:.1f} GiB free")
                 + f" in {archive_dir(config)} (watermark {config.storage.min_free_mb} MB)"
                 + (": BELOW, new instances are refused (0xA700)" if low else "")))
    rows += [("model", line) for line in model_lines]
    rows.append(("device", device))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}")
    if audit:
        click.echo("\naudit")
        for e in events:
            fields = [_when(e.at), e.event, f"calling={e.calling_ae or '-'}",
                      f"called={e.called_ae or '-'}", f"peer={e.peer or '-'}"]
            fields += [f"{k}={v}" for k, v in (("study", e.study_uid),
                                                ("sop", e.sop_instance_uid),
                                                ("count", e.count), ("status", e.status))
                       if v is not None]
            click.echo("  ".join(fields))


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S")
