"""Open :class:`storage.Store` from a dicomnode :class:`~dicomnode.config.Config`.

storage/ knows nothing of dicomnode: this module maps configuration fields onto the store's
explicit constructor arguments, and storage's named errors onto a DicomnodeError so that the
CLI prints them as one `error: ...` line with the right exit status.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.errors import DicomnodeError

if TYPE_CHECKING:
    from dicomnode.config import Config
    from storage import Store


class StorageFailure(DicomnodeError):
    """A storage error, re-raised with the exit status storage chose (1, or 2 for config)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def storage_errors() -> Iterator[None]:
    """Turn storage.errors.StorageError into StorageFailure (for commands and the node)."""
    from storage.errors import StorageError

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
