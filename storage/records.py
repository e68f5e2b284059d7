"""Plain values returned by :class:`storage.Store` (never live ORM objects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path


class ResendPolicy(StrEnum):
    """What to do when a SOP instance is received again with different content."""

    REPLACE = "replace"        # the newer replaces the older; the study is processed again
    KEEP_FIRST = "keep_first"  # the first copy stays; the new one is acknowledged, not stored


class StoreOutcome(StrEnum):
    STORED = "stored"          # new instance, durable and indexed
    DUPLICATE = "duplicate"    # same SOP Instance UID, same content: nothing written
    REPLACED = "replaced"      # same UID, different content, policy replace
    KEPT_FIRST = "kept_first"  # same UID, different content, policy keep_first


class JobState(StrEnum):
    RECEIVING = "receiving"    # instances still arriving
    QUEUED = "queued"          # ready for inference
    RUNNING = "running"        # leased by a worker
    DONE = "done"
    FAILED = "failed"          # out of attempts, or failed without retry
    CANCELLED = "cancelled"    # by an admin; new instances do not revive it


UNFINISHED_JOB_STATES = (JobState.RECEIVING, JobState.QUEUED, JobState.RUNNING)


class DeliveryState(StrEnum):
    PENDING = "pending"        # waiting for next_attempt_at
    SENDING = "sending"        # leased by a worker
    DONE = "done"
    DEAD = "dead"              # dead letter: out of attempts; an admin may retry it
    CANCELLED = "cancelled"


class CommitmentState(StrEnum):
    """Storage commitment of a delivered result (requested only where the destination is
    configured for it). Anything but COMMITTED keeps the study from retention."""

    PENDING = "pending"        # N-ACTION accepted; waiting for the N-EVENT-REPORT
    COMMITTED = "committed"    # the destination reported it holds the instance
    FAILED = "failed"          # reported failed, or the N-ACTION itself failed


@dataclass(frozen=True)
class CommitmentRecord:
    delivery_id: int
    result_sop_instance_uid: str
    destination: str
    transaction_uid: str
    state: CommitmentState
    requested_at: datetime
    reported_at: datetime | None
    failure: str | None


@dataclass(frozen=True)
class CommitmentReport:
    """What one N-EVENT-REPORT changed."""

    transaction_uid: str
    committed: int
    failed: int
    unknown: int               # SOP instances the report names that the transaction lacks


@dataclass(frozen=True)
class StoredInstance:
    outcome: StoreOutcome
    sop_instance_uid: str
    path: Path                 # absolute path of the archived file now indexed
    size: int
    sha256: str


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size: int
    sha256: str
    calling_ae: str | None
    received_at: datetime
    modality: str | None
    laterality: str | None
    view: str | None
    number_of_frames: int | None


# A result the node no longer stands by (a later run of its study replaced it) keeps its
# row, file and deliveries, with its kind prefixed by this: what was sent stays known.
SUPERSEDED = "superseded:"
# The kind of an IOCM rejection note the node sent for superseded results: never superseded.
REJECTION = "rejection"


@dataclass(frozen=True)
class ResultRecord:
    id: int
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    kind: str
    path: Path
    size: int
    sha256: str
    job_id: int | None
    created_at: datetime

    @property
    def superseded(self) -> bool:
        return self.kind.startswith(SUPERSEDED)


@dataclass(frozen=True)
class StaleResult:
    """A result of an earlier run that the latest run did not produce again, and the
    destinations it may have reached (delivered, being sent, or tried)."""

    result: ResultRecord
    reached: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    state: JobState
    attempts: int
    calling_ae: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    rerun: bool
    last_instance_at: datetime
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    result_id: int
    result_sop_instance_uid: str
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime
    last_status: str | None
    last_error: str | None
    delivered_at: datetime | None


@dataclass(frozen=True)
class DeliveryTask:
    """A claimed delivery: send the file at ``path`` to ``destination``, then record it."""

    id: int
    destination: str
    attempts: int
    study_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    lease_expires_at: datetime


@dataclass(frozen=True)
class DeliveryUpdate:
    id: int
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None   # set when the delivery will be tried again


@dataclass(frozen=True)
class JobDetail:
    job: Job
    instance_count: int
    series_count: int
    results: list[ResultRecord] = field(default_factory=list)
    deliveries: list[DeliveryRecord] = field(default_factory=list)


@dataclass(frozen=True)
class RetryOutcome:
    job_requeued: bool
    deliveries_requeued: int


@dataclass(frozen=True)
class RetentionReport:
    studies: int
    instances: int
    results: int
    bytes_freed: int
    # The Study Instance UIDs removed (each also has a "retention" audit event).
    study_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditRecord:
    at: datetime
    event: str
    calling_ae: str | None
    called_ae: str | None
    peer: str | None
    study_uid: str | None
    sop_instance_uid: str | None
    count: int | None
    status: str | None
    detail: str | None
