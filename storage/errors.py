"""Named errors of the storage layer.

Every message says what was wrong and what to do. ``exit_code`` follows the CLI convention
(1: the work failed, 2: a configuration error), so a command line can map these one to one
without storage knowing about it. The DICOM layer maps :class:`InsufficientStorage` to C-STORE
status 0xA700 (out of resources) and :class:`InvalidUID` to a 0xCxxx "cannot understand".
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error raised on purpose by :mod:`storage`."""

    exit_code = 1


class InvalidUID(StorageError, ValueError):
    """A value that should be a DICOM UID is not one; it never reaches the file system."""

    def __init__(self, field: str, value: object) -> None:
        self.field = field
        self.value = value
        super().__init__(
            f"{field} {value!r} is not a valid DICOM UID (digits in dot-separated components, "
            "no leading zeros, at most 64 characters); fix the sender or the object"
        )


class InvalidDatabaseURL(StorageError):
    """The database URL cannot be parsed or names an unsupported engine or driver."""

    exit_code = 2


class DatabaseUnavailable(StorageError):
    """The database cannot be reached or opened."""


class DatabaseBusy(StorageError):
    """SQLite stayed locked by another process for longer than the busy timeout."""


class SchemaOutOfDate(StorageError):
    """The database schema is missing, older or newer than this code expects."""


class InsufficientStorage(StorageError):
    """Not enough free disk for new data (below the watermark, or the disk filled up)."""

    def __init__(self, message: str, *, free_bytes: int | None = None,
                 required_bytes: int | None = None) -> None:
        self.free_bytes = free_bytes
        self.required_bytes = required_bytes
        super().__init__(message)


class ArchiveError(StorageError):
    """The archive directory cannot be written (permissions, missing mount, I/O error)."""


class NotFound(StorageError):
    """A job, study, result or delivery that does not exist was asked for."""


class JobNotFound(NotFound):
    pass


class StudyNotFound(NotFound):
    pass


class ResultNotFound(NotFound):
    pass


class DeliveryNotFound(NotFound):
    pass


class InvalidState(StorageError):
    """The requested transition does not apply to the object's current state."""


class LeaseLost(StorageError):
    """A worker acted on a job or delivery whose lease it no longer holds.

    Its lease expired (another worker took over) or an admin cancelled the job: the worker
    must stop working on it and must not write its results.
    """
