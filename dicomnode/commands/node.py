"""`dicomnode serve | worker | run`: the receiver, the inference worker, or both."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import click

from dicomnode.cli import load_cli_config
from dicomnode.ops.logs import kv

log = logging.getLogger("dicomnode.node")


def _port_option(f):
    return click.option("--port", type=int, default=None,
                        help="Listen on this port (overrides [node] port).")(f)


class StopRequest:
    """SIGTERM/SIGINT recorded without a lock: the handler only appends to a list (atomic
    under the GIL) and the main thread polls it, so a signal landing while another's handler
    runs cannot deadlock the process (Event.set() in a handler could: its lock is not
    re-entrant). A second signal, once shutdown has begun, exits at once."""

    POLL_SECONDS = 0.2

    def __init__(self) -> None:
        self.signals: list[int] = []

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, _frame) -> None:
        if self.signals:
            # Only os.write here: logging takes locks the interrupted code may hold.
            name = signal.Signals(signum).name
            os.write(2, f"ts={time.strftime('%Y-%m-%dT%H:%M:%S')} level=warning "
                        f"logger={log.name} event=forced_exit signal={name} "
                        f"first={signal.Signals(self.signals[0]).name} detail=\"second "
                        f"signal: exiting now without a clean shutdown\"\n".encode())
            os._exit(128 + signum)
        self.signals.append(signum)

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    def wait(self) -> None:
        while not self.signals:
            time.sleep(self.POLL_SECONDS)
        log.info("event=signal %s", kv(signal=signal.Signals(self.signals[0]).name))


def _start_scp(config, store):
    from dicomnode.network.scp import StorageSCP
    from dicomnode.wiring import (
        hold_interval,
        limits_from_config,
        policy_from_config,
        ssl_context_from_config,
    )

    scp = StorageSCP(store, policy_from_config(config), config.node.host, config.node.port,
                     ssl_context_from_config(config), hold_seconds=hold_interval(config),
                     limits=limits_from_config(config),
                     incoming_dir=config.data_path / "incoming")
    scp.start()
    if config.node.accept_any_peer:
        log.warning("event=any_peer_accepted detail=\"[node] accept_any_peer = true: any calling "
                    "AE from any address may store here\"")
    elif not config.peers:
        log.warning("event=no_peers_configured detail=\"every association is refused until "
                    "[[peers]] are configured (or [node] accept_any_peer = true)\"")
    return scp


def _start_stow(config, store):
    """The STOW-RS endpoint ([dicomweb] listen), with the SCP's receiving policy."""
    from dicomnode.dicomweb.stow import StowServer
    from dicomnode.wiring import hold_interval, policy_from_config

    stow = StowServer.from_config(config, store, policy_from_config(config),
                                  hold_seconds=hold_interval(config))
    stow.start()
    return stow


def _ready_checks(config, store, scp, stow=None) -> dict[str, tuple[bool, str]]:
    """/health/ready: database answers, SCP listens (serve/run), disk above the watermark."""
    from dicomnode.ops.health import disk_free_bytes
    from dicomnode.wiring import archive_dir

    checks: dict[str, tuple[bool, str]] = {}
    try:
        store.queue_counts()
        checks["database"] = (True, "ok")
    except Exception as exc:
        checks["database"] = (False, f"{type(exc).__name__}: {exc}"[:200])
    if scp is not None:
        checks["scp"] = (scp.listening, f"{config.node.host}:{scp.port}")
        free = disk_free_bytes(archive_dir(config))
        watermark = config.storage.min_free_mb * 2**20
        ok = free is None or free >= watermark
        checks["disk"] = (ok, f"{(free or 0) // 2**20} MB free, watermark "
                              f"{config.storage.min_free_mb} MB")
    if stow is not None:
        checks["stow"] = (stow.listening, stow.url)
    return checks


def _fill_status(status, config, scp, worker, stow=None) -> None:
    if stow is not None:
        status.stow_requests = stow.receiver.requests
        status.stow_instances_received = stow.receiver.instances_received
        status.stow_bytes_received = stow.receiver.bytes_received
    if scp is not None:
        receiver = scp.receiver
        status.associations_open = receiver.open_associations
        status.instances_received = receiver.instances_received
        status.bytes_received = receiver.bytes_received
    if worker is not None:
        status.jobs_done, status.jobs_failed = worker.jobs_done, worker.jobs_failed
        status.deliveries_sent = worker.deliverer.sent
        status.delivery_failures = worker.deliverer.failures
        status.models_loaded = worker.models.loaded_devices()
        if worker.models.resolved_device is not None:
            status.device = worker.models.resolved_device


def _run(ctx: click.Context, port: int | None, *, receive: bool, infer: bool) -> None:
    from dataclasses import asdict

    from dicomnode.ops import prometheus
    from dicomnode.ops.health import StatusWriter, new_process_status, queue_collector
    from dicomnode.wiring import open_store, storage_errors

    config = load_cli_config(ctx)
    if port is not None:
        config.node.port = port
    stop = StopRequest()
    stop.install()
    with storage_errors():
        store = open_store(config)
    scp = worker = worker_thread = http = status_writer = stow = None
    collectors = []
    try:
        if receive:
            scp = _start_scp(config, store)
            click.echo(f"listening as {config.node.ae_title} on {config.node.host}:{scp.port}",
                       err=True)
            receiver = scp.receiver

            def associations() -> None:
                prometheus.ASSOCIATIONS_OPEN.set(receiver.open_associations)
            collectors.append(associations)
            if config.dicomweb.listen:
                stow = _start_stow(config, store)
                click.echo(f"STOW-RS on {stow.url}/studies", err=True)
        if infer:
            from dicomnode.pipeline.worker import Worker

            worker = Worker(config, store)
            worker_thread = threading.Thread(target=worker.run_forever, name="worker",
                                             daemon=True)
            worker_thread.start()
        role = "run" if receive and infer else ("serve" if receive else "worker")
        status = new_process_status(
            role, ae_title=config.node.ae_title, http=config.http.listen,
            listen=f"{config.node.host}:{scp.port}" if scp is not None else "",
            stow_listen=stow.url if stow is not None else "")
        status_writer = StatusWriter(config.data_path, status,
                                     lambda st: _fill_status(st, config, scp, worker, stow))
        status_writer.start()
        collectors.append(queue_collector(store))
        for collect in collectors:
            prometheus.REGISTRY.add_collector(collect)
        if config.http.listen:
            from dicomnode.ops.http import HealthServer

            def current_status() -> dict:
                _fill_status(status, config, scp, worker, stow)
                return asdict(status)

            http = HealthServer(config.http.listen,
                                lambda: _ready_checks(config, store, scp, stow),
                                status=current_status)
            http.start()
            click.echo(f"health and metrics on {http.url}", err=True)
        stop.wait()
    finally:
        if http is not None:
            http.stop()
        for collect in collectors:
            prometheus.REGISTRY.remove_collector(collect)
        if worker is not None and worker_thread is not None:
            worker.stop()
            worker_thread.join(timeout=60)
        if stow is not None:
            stow.stop()
        if scp is not None:
            scp.stop()
        if status_writer is not None:
            status_writer.stop()
        store.close()


@click.command()
@_port_option
@click.pass_context
def serve(ctx: click.Context, port: int | None) -> None:
    """Receive studies over DICOM (Storage SCP) into the archive."""
    _run(ctx, port, receive=True, infer=False)


@click.command()
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run inference on ready studies and send the results."""
    _run(ctx, None, receive=False, infer=True)


@click.command()
@_port_option
@click.pass_context
def run(ctx: click.Context, port: int | None) -> None:
    """Receive, run inference and send results, in one process."""
    _run(ctx, port, receive=True, infer=True)
