"""Durable archive, index and job/delivery queue (SQLAlchemy): no DICOM networking, no model.

Entry point: :class:`Store`. Errors: :mod:`storage.errors`. Schema: :mod:`storage.migrate`.
This package never imports ``dicomnode`` (the application maps its configuration onto
:class:`Store`'s explicit arguments).
"""

from storage import _logging  # noqa: F401  (must precede the first alembic import)
from storage.errors import (
    DatabaseUnavailable,
    InsufficientStorage,
    InvalidUID,
    LeaseLost,
    SchemaOutOfDate,
    StorageError,
)
from storage.records import (
    DeliveryState,
    DeliveryTask,
    Job,
    JobState,
    ResendPolicy,
    StoredInstance,
    StoreOutcome,
)
from storage.store import Store
from storage.uids import is_valid_uid, validate_uid

__all__ = [
    "DatabaseUnavailable", "DeliveryState", "DeliveryTask", "InsufficientStorage", "InvalidUID",
    "Job", "JobState", "LeaseLost", "ResendPolicy", "SchemaOutOfDate", "StorageError", "Store",
    "StoreOutcome", "StoredInstance", "is_valid_uid", "validate_uid",
]
