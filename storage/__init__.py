"""Durable archive, index and job/delivery queue (SQLAlchemy): no DICOM networking, no model.

Entry point: :class:`Store`. This package's public API is what it exports here, and it is the
only way in for dicomnode (an import-linter contract in pyproject.toml, checked by
`make lint`): the store and its records (TempFile: a result staged before it is stored), the
named errors, the schema commands (upgrade, current_revision, head_revision) and the
database URL helpers, and, for tests and
benchmarks, the scratch-schema and seeded-queue helpers of :mod:`storage.testing`.
This package never imports ``dicomnode`` (the application maps its configuration onto
:class:`Store`'s explicit arguments).
"""

from storage import _logging  # noqa: F401  (must precede the first alembic import)
from storage.archive import TempFile
from storage.engine import check_connection, create_storage_engine, mask_url
from storage.errors import (
    DatabaseUnavailable,
    InsufficientStorage,
    InvalidState,
    InvalidUID,
    LeaseLost,
    SchemaOutOfDate,
    StorageError,
    StudyNotFound,
)
from storage.migrate import current_revision, head_revision, upgrade
from storage.records import (
    REJECTION,
    AuditRecord,
    DeliveryState,
    DeliveryTask,
    Job,
    JobState,
    ResendPolicy,
    RetentionReport,
    StoredInstance,
    StoreOutcome,
)
from storage.store import Store, utcnow
from storage.testing import claim_worker, scratch_schema, seed_queued_jobs
from storage.uids import is_valid_uid, validate_uid

__all__ = [
    "REJECTION", "AuditRecord", "DatabaseUnavailable", "DeliveryState", "DeliveryTask",
    "InsufficientStorage", "InvalidState", "InvalidUID", "Job", "JobState", "LeaseLost",
    "ResendPolicy", "RetentionReport", "SchemaOutOfDate", "StorageError", "Store",
    "StoreOutcome", "StoredInstance", "StudyNotFound", "TempFile", "check_connection",
    "claim_worker", "create_storage_engine", "current_revision", "head_revision",
    "is_valid_uid", "mask_url", "scratch_schema", "seed_queued_jobs", "upgrade", "utcnow",
    "validate_uid",
]
