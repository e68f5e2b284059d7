"""From configuration to components: the one place a :class:`~dicomnode.config.Config` is
turned into what the node runs with.

- the :class:`storage.Store` (open_store, archive_dir, idle_seconds_by_ae, retention_age),
  and storage's named errors as a DicomnodeError (storage_errors), so that the CLI prints
  them as one `error: ...` line with the right exit status: storage/ knows nothing of
  dicomnode, so this module maps configuration fields onto the store's explicit arguments;
- the receiver's policy, wire limits, hold interval and TLS context (policy_from_config,
  limits_from_config, hold_interval, ssl_context_from_config; node_secret: the
  installation's patient-key salt);
- the result destinations (destinations_from_config, destination_for).

The components themselves (network/, pipeline/, ops/) take explicit arguments.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.errors import DicomnodeError

if TYPE_CHECKING:
    import ssl

    from dicomnode.config import Config, PeerConfig
    from dicomnode.network.guard import WireLimits
    from dicomnode.network.scp import ReceiverPolicy
    from dicomnode.network.scu import Destination
    from storage import Store


class StorageFailure(DicomnodeError):
    """A storage error, re-raised with the exit status storage chose (1, or 2 for config)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def storage_errors() -> Iterator[None]:
    """Turn storage.errors.StorageError into StorageFailure (for commands and the node)."""
    from storage import StorageError

    try:
        yield
    except StorageError as exc:
        raise StorageFailure(str(exc), getattr(exc, "exit_code", 1)) from None


def archive_dir(config: Config) -> Path:
    return config.data_path / "archive"


def open_store(config: Config, *, create_schema: bool | None = None) -> Store:
    """The store for this configuration; raises storage errors (wrap in storage_errors())."""
    from storage import Store

    return Store(
        config.database_url,
        archive_dir(config),
        on_resend=config.storage.on_resend,
        min_free_bytes=config.storage.min_free_mb * 2**20,
        job_max_attempts=config.storage.job_max_attempts,
        delivery_max_attempts=config.delivery.max_attempts,
        backoff_initial_s=config.delivery.backoff_initial_seconds,
        backoff_max_s=config.delivery.backoff_max_seconds,
        create_schema=create_schema,
    )


def idle_seconds_by_ae(config: Config) -> dict[str, float]:
    """Per-peer study idle times ([[peers]] idle_seconds) for Store.mark_ready."""
    return {peer.ae_title: float(peer.idle_seconds) for peer in config.peers
            if peer.idle_seconds is not None}


def retention_age(config: Config) -> timedelta | None:
    """storage.retention_days as the max_age of Store.apply_retention; None keeps all."""
    days = config.storage.retention_days
    return timedelta(days=days) if days > 0 else None


def node_secret(data_dir: Path) -> bytes:
    """A per-installation random salt, so patient keys cannot be reversed by guessing IDs."""
    path = data_dir / "node-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "xb") as fh:
                fh.write(secrets.token_bytes(32))
        except FileExistsError:
            pass  # another process created it first
    return path.read_bytes()


def policy_from_config(config: Config) -> ReceiverPolicy:
    from dicomnode.network.scp import AllowedPeer, ReceiverPolicy

    return ReceiverPolicy(
        ae_title=config.node.ae_title,
        allowed_peers=[AllowedPeer(p.ae_title, p.host) for p in config.peers],
        other_storage=config.node.other_storage,
        max_associations=config.node.max_associations,
        patient_key_salt=node_secret(config.data_path),
        accept_any_peer=config.node.accept_any_peer,
    )


def limits_from_config(config: Config) -> WireLimits:
    from dicomnode.network.guard import WireLimits

    node = config.node
    return WireLimits(
        request_seconds=node.association_request_seconds,
        max_pending=node.max_pending_connections,
        max_pending_per_address=node.max_pending_per_address,
        max_request_pdu=node.max_request_pdu_bytes, max_pdu=node.max_pdu_bytes,
        idle_seconds=node.association_idle_seconds)


def hold_interval(config: Config) -> float:
    """Seconds between holds of open associations' studies: a quarter of the shortest idle
    time, at most HOLD_SECONDS, so a hold always lands before the idle timer runs out."""
    from dicomnode.network.scp import HOLD_SECONDS

    idle = [config.node.idle_seconds, *(p.idle_seconds for p in config.peers
                                        if p.idle_seconds is not None)]
    return max(0.05, min(HOLD_SECONDS, min(idle) / 4))


def ssl_context_from_config(config: Config) -> ssl.SSLContext | None:
    from dicomnode.network.scp import server_ssl_context

    tls = config.node.tls
    return None if tls is None else server_ssl_context(tls, "[node.tls]")


def destinations_from_config(config: Config) -> dict[str, Destination]:
    """Result destinations by AE title: the configured peers that accept results."""
    return {p.ae_title: destination_for(p) for p in config.peers if p.send_results}


def destination_for(peer: PeerConfig) -> Destination:
    from dicomnode.dicomweb.client import StowTarget
    from dicomnode.network.scu import Destination

    stow = None
    if peer.dicomweb_url:
        stow = StowTarget(peer.dicomweb_url, token=peer.token, ca=peer.dicomweb_ca,
                          cert=peer.dicomweb_cert, key=peer.dicomweb_key)
    return Destination(peer.ae_title, peer.host, peer.port,
                       storage_commitment=peer.storage_commitment, stow=stow)
