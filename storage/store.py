"""The store: archive + index + job and delivery queues behind one object.

Every method is one short transaction, so any number of processes (SQLite on one machine)
or machines (PostgreSQL) can share a store. Times are timezone-aware UTC; methods take an
optional ``now`` so that callers and tests control the clock.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, NoReturn, cast

from sqlalchemy import (
    CursorResult,
    Engine,
    Result,
    and_,
    case,
    delete,
    func,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage import tables as m
from storage.archive import Archive, TempFile
from storage.backoff import backoff_delay
from storage.engine import check_connection, create_storage_engine, unavailable
from storage.errors import (
    DatabaseBusy,
    DeliveryNotFound,
    InvalidState,
    InvalidUID,
    JobNotFound,
    LeaseLost,
    ResultNotFound,
    StudyNotFound,
)
from storage.migrate import check_schema
from storage.records import (
    REJECTION,
    SUPERSEDED,
    UNFINISHED_JOB_STATES,
    AuditRecord,
    CommitmentRecord,
    CommitmentReport,
    CommitmentState,
    DeliveryRecord,
    DeliveryState,
    DeliveryTask,
    DeliveryUpdate,
    InstanceRecord,
    Job,
    JobDetail,
    JobState,
    ResendPolicy,
    ResultRecord,
    RetentionReport,
    RetryOutcome,
    StaleResult,
    StoredInstance,
    StoreOutcome,
)
from storage.uids import validate_uid

Encoded = (bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview] | BinaryIO
           | os.PathLike[str])
_MAX_ERROR = 4000
_WRITE_RETRIES = 3


def utcnow() -> datetime:
    return datetime.now(UTC)


def _audit_record(r: RowMapping) -> AuditRecord:
    return AuditRecord(r["at"], r["event"], r["calling_ae"], r["called_ae"], r["peer"],
                       r["study_uid"], r["sop_instance_uid"], r["count"], r["status"],
                       r["detail"])


def _at(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now


def _clip(value: str | None, width: int) -> str | None:
    return None if value is None else (value.strip()[:width] or None)


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched (its Result is a CursorResult)."""
    return cast(CursorResult[Any], result).rowcount or 0


class Store:
    """Durable archive, index, job queue and delivery queue.

    Args:
        url: SQLAlchemy URL, ``sqlite:///PATH`` or ``postgresql+psycopg://...``.
        archive_dir: where instance and result files live.
        on_resend: :class:`ResendPolicy` for a SOP instance re-sent with different content.
        min_free_bytes: received instances are refused (:class:`InsufficientStorage`) when
            the archive's disk would drop below this.
        busy_timeout_s: how long SQLite waits for another writer before :class:`DatabaseBusy`.
        connect_timeout_s: PostgreSQL connect timeout.
        job_max_attempts: claims of a job (including ones whose worker died) before it fails.
        delivery_max_attempts: attempts before a delivery becomes a dead letter.
        backoff_initial_s, backoff_max_s: delivery retry delay (see :mod:`storage.backoff`).
        create_schema: create the schema in an empty database. ``None`` (default) means yes
            for SQLite and no for PostgreSQL (run ``dicomnode db upgrade`` there). A database
            at another revision is always refused with :class:`SchemaOutOfDate`.
        sqlite_synchronous: SQLite ``PRAGMA synchronous`` (FULL: a commit survives power loss).
        rng: random source for backoff jitter (tests pass a seeded one).
    """

    def __init__(self, url: str, archive_dir: str | os.PathLike[str], *,
                 on_resend: ResendPolicy | str = ResendPolicy.REPLACE,
                 min_free_bytes: int = 0,
                 busy_timeout_s: float = 30.0,
                 connect_timeout_s: float = 10.0,
                 job_max_attempts: int = 3,
                 delivery_max_attempts: int = 8,
                 backoff_initial_s: float = 5.0,
                 backoff_max_s: float = 600.0,
                 create_schema: bool | None = None,
                 sqlite_synchronous: str = "FULL",
                 rng: random.Random | None = None) -> None:
        self.on_resend = ResendPolicy(on_resend)
        if job_max_attempts < 1 or delivery_max_attempts < 1:
            raise ValueError("max attempts must be at least 1")
        self.job_max_attempts = job_max_attempts
        self.delivery_max_attempts = delivery_max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self.archive = Archive(archive_dir, min_free_bytes=min_free_bytes)
        self.engine: Engine = create_storage_engine(
            url, busy_timeout_s=busy_timeout_s, connect_timeout_s=connect_timeout_s,
            sqlite_synchronous=sqlite_synchronous)
        self._postgres = self.engine.dialect.name == "postgresql"
        try:
            check_connection(self.engine)
            if create_schema is None:
                create_schema = not self._postgres
            check_schema(self.engine, create_if_empty=create_schema)
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Temporary files of writers killed more than an hour ago (never indexed).
        self.archive.sweep_temp(older_than_s=3600)

    # -- plumbing ------------------------------------------------------------------------

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        """One transaction; database errors become named storage errors."""
        try:
            with self._sessions.begin() as session:
                yield session
        except DBAPIError as exc:
            if not isinstance(exc, OperationalError) and not exc.connection_invalidated:
                raise
            if "database is locked" in str(exc.orig):
                raise DatabaseBusy(
                    "the SQLite database stayed locked by another process for longer than the "
                    "busy timeout; stop stray dicomnode processes, or use PostgreSQL for many "
                    "workers") from None
            raise unavailable(self.engine.url, exc) from None

    def _insert(self, model: type[m.Base]) -> Any:
        return (pg_insert if self._postgres else sqlite_insert)(model)

    def _ensure(self, s: Session, model: type[m.Base], key: str, value: object,
                values: Mapping[str, object]) -> int:
        """The id of the row whose unique ``key`` is ``value``, inserting it if missing.

        INSERT ... ON CONFLICT DO NOTHING, so two writers creating the same study at once
        both succeed (PostgreSQL waits for the first to commit, then sees its row).
        """
        column = getattr(model, key)
        row_id = s.scalar(select(model.id).where(column == value))  # type: ignore[attr-defined]
        if row_id is None:
            s.execute(self._insert(model).values({key: value, **values})
                      .on_conflict_do_nothing(index_elements=[key]))
            row_id = s.scalar(select(model.id).where(column == value))  # type: ignore[attr-defined]
        assert row_id is not None
        return row_id

    # -- receiving -----------------------------------------------------------------------

    def store_instance(self, *, encoded: Encoded, sop_instance_uid: str, sop_class_uid: str,
                       study_uid: str, series_uid: str, transfer_syntax: str, patient_key: str,
                       calling_ae: str | None = None, modality: str | None = None,
                       laterality: str | None = None, view: str | None = None,
                       number_of_frames: int | None = None,
                       now: datetime | None = None) -> StoredInstance:
        """Archive and index a received instance; durable when this returns.

        ``encoded`` is the instance as the sender encoded it: bytes, a sequence of buffers
        written one after the other (e.g. file meta, then the received dataset), a binary
        file object, or the path of a complete file to take over (moved, not copied, when on
        the archive's file system; the caller no longer owns it).
        ``patient_key`` is an opaque key the caller derives (never a name or ID).
        Raises :class:`InvalidUID` before touching the disk, :class:`InsufficientStorage`
        below the free-space watermark or on a full disk (map to C-STORE 0xA700).
        """
        uids = {
            "SOP Instance UID": sop_instance_uid, "SOP Class UID": sop_class_uid,
            "Study Instance UID": study_uid, "Series Instance UID": series_uid,
            "Transfer Syntax UID": transfer_syntax,
        }
        for field, value in uids.items():
            validate_uid(value, field)
        if not patient_key or len(patient_key) > 128:
            raise ValueError("patient_key must be a non-empty opaque key of at most 128 chars")
        # Descriptive attributes come from senders: clip them to the column widths rather
        # than fail a store over an odd View or Laterality value.
        calling_ae = _clip(calling_ae, 16)
        modality, laterality, view = _clip(modality, 16), _clip(laterality, 16), _clip(view, 64)
        now = _at(now)
        base_path = Archive.relative_path(study_uid, series_uid, sop_instance_uid)
        temp = (self.archive.adopt_temp(encoded) if isinstance(encoded, os.PathLike)
                else self.archive.write_temp(encoded))
        committed = False
        try:
            for attempt in range(_WRITE_RETRIES):
                try:
                    outcome, path, old_path, size, sha256 = self._index_instance(
                        temp, base_path, now=now, sop_instance_uid=sop_instance_uid,
                        sop_class_uid=sop_class_uid, study_uid=study_uid, series_uid=series_uid,
                        transfer_syntax=transfer_syntax, patient_key=patient_key,
                        calling_ae=calling_ae, modality=modality, laterality=laterality,
                        view=view, number_of_frames=number_of_frames)
                    break
                except IntegrityError:
                    # Another writer indexed the same SOP instance first: decide again.
                    if attempt == _WRITE_RETRIES - 1:
                        raise
            committed = outcome in (StoreOutcome.STORED, StoreOutcome.REPLACED)
        finally:
            if not committed:
                self.archive.discard(temp)
        if old_path is not None and old_path != path:
            # After the commit: a crash before this line leaves only an unindexed old file.
            self.archive.remove(old_path)
        return StoredInstance(outcome, sop_instance_uid, self.archive.absolute(path), size,
                              sha256)

    def _index_instance(self, temp: TempFile, base_path: str, *, now: datetime,
                        sop_instance_uid: str, sop_class_uid: str, study_uid: str,
                        series_uid: str, transfer_syntax: str, patient_key: str,
                        calling_ae: str | None, modality: str | None, laterality: str | None,
                        view: str | None, number_of_frames: int | None,
                        ) -> tuple[StoreOutcome, str, str | None, int, str]:
        """Index the instance and move its file in, in one transaction: (outcome, path now
        indexed, path it replaced, size and sha256 of the indexed content)."""
        with self._tx() as s:
            existing = s.scalars(select(m.Instance).where(
                m.Instance.sop_instance_uid == sop_instance_uid).with_for_update()).first()
            if existing is not None and (existing.sha256 == temp.sha256
                                         or self.on_resend is ResendPolicy.KEEP_FIRST):
                outcome = (StoreOutcome.DUPLICATE if existing.sha256 == temp.sha256
                           else StoreOutcome.KEPT_FIRST)
                return outcome, existing.path, None, existing.size, existing.sha256

            patient_id = self._ensure(s, m.Patient, "key", patient_key, {"created_at": now})
            study_id = self._ensure(s, m.Study, "study_uid", study_uid, {
                "patient_id": patient_id, "first_received_at": now, "last_received_at": now})
            s.execute(update(m.Study).where(m.Study.id == study_id, m.Study.last_received_at < now)
                      .values(last_received_at=now))
            series_id = self._ensure(s, m.Series, "series_uid", series_uid,
                                     {"study_id": study_id, "modality": modality})
            values = dict(study_id=study_id, series_id=series_id, sop_class_uid=sop_class_uid,
                          transfer_syntax=transfer_syntax, size=temp.size, sha256=temp.sha256,
                          calling_ae=calling_ae, received_at=now, modality=modality,
                          laterality=laterality, view=view, number_of_frames=number_of_frames)
            if existing is None:
                path, old_path, outcome = base_path, None, StoreOutcome.STORED
                s.add(m.Instance(sop_instance_uid=sop_instance_uid, path=path, **values))
            else:
                # A replacement gets its own file name, so until this transaction commits the
                # indexed file is untouched: a crash leaves the old state, complete.
                old_path, outcome = existing.path, StoreOutcome.REPLACED
                path = base_path if existing.path != base_path else Archive.relative_path(
                    study_uid, series_uid, sop_instance_uid, version=temp.sha256[:16])
                for key, value in values.items():
                    setattr(existing, key, value)
                existing.path = path
            s.flush()  # a concurrent insert of the same UID fails here, before the rename
            self._touch_job(s, study_id, calling_ae, now)
            self.archive.commit(temp, path)
        return outcome, path, old_path, temp.size, temp.sha256

    def _touch_job(self, s: Session, study_id: int, calling_ae: str | None,
                   now: datetime) -> None:
        """New data for a study: (re)start its idle timer; a finished study is queued again.

        The attempt count survives new instances: only a job that completed starts afresh.
        A job queued after a failure keeps its attempts, and one that used them all stays
        failed until an admin retries it; otherwise a study whose instances keep arriving
        would run (and fail, and send partial results) without end."""
        s.execute(self._insert(m.Job).values(
            study_id=study_id, state=JobState.RECEIVING, calling_ae=calling_ae, attempts=0,
            rerun=False, last_instance_at=now, created_at=now, updated_at=now,
        ).on_conflict_do_nothing(index_elements=["study_id"]))
        exhausted = and_(m.Job.state == JobState.FAILED,
                         m.Job.attempts >= self.job_max_attempts)
        again = and_(m.Job.state.in_((JobState.QUEUED, JobState.DONE, JobState.FAILED)),
                     ~exhausted)
        s.execute(update(m.Job).where(m.Job.study_id == study_id).values(
            last_instance_at=now, calling_ae=calling_ae, updated_at=now,
            state=case((again, JobState.RECEIVING.value), else_=m.Job.state),
            attempts=case((m.Job.state == JobState.DONE, 0), else_=m.Job.attempts),
            rerun=case((m.Job.state == JobState.RUNNING, True), else_=m.Job.rerun),
        ))

    def store_result(self, *, encoded: Encoded | TempFile, sop_instance_uid: str,
                     sop_class_uid: str, study_uid: str, series_uid: str, transfer_syntax: str,
                     kind: str, job_id: int | None = None,
                     now: datetime | None = None) -> ResultRecord:
        """Archive and index a result object the node produced for ``study_uid``; `encoded`
        may be a file staged by :meth:`stage_result` (taken over, or dropped on failure).

        The watermark does not apply (the study was accepted; its results must not be lost),
        but a full disk still raises :class:`InsufficientStorage`. Storing the same result
        again is idempotent.
        """
        try:
            for field, value in (("SOP Instance UID", sop_instance_uid),
                                 ("SOP Class UID", sop_class_uid),
                                 ("Study Instance UID", study_uid),
                                 ("Series Instance UID", series_uid),
                                 ("Transfer Syntax UID", transfer_syntax)):
                validate_uid(value, field)
        except InvalidUID:
            if isinstance(encoded, TempFile):  # refused: a staged file is dropped here too
                self.archive.discard(encoded)
            raise
        now = _at(now)
        base_path = Archive.relative_path(study_uid, series_uid, sop_instance_uid)
        if isinstance(encoded, TempFile):  # staged (stage_result): taken over as it is
            temp = encoded
        elif isinstance(encoded, os.PathLike):
            temp = self.archive.adopt_temp(encoded)
        else:
            temp = self.archive.write_temp(encoded, watermark=False)
        committed, old_path, path = False, None, base_path
        try:
            with self._tx() as s:
                study_id = s.scalar(select(m.Study.id).where(m.Study.study_uid == study_uid))
                if study_id is None:
                    raise StudyNotFound(f"study {study_uid} is not in the index; store results "
                                        "only for received studies")
                row = s.scalars(select(m.Result).where(
                    m.Result.sop_instance_uid == sop_instance_uid).with_for_update()).first()
                if row is not None and row.sha256 == temp.sha256:
                    return self._result_record(row)
                if row is None:
                    row = m.Result(sop_instance_uid=sop_instance_uid, path=path)
                    s.add(row)
                else:
                    old_path = row.path
                    if row.path == base_path:
                        path = Archive.relative_path(study_uid, series_uid, sop_instance_uid,
                                                     version=temp.sha256[:16])
                row.study_id, row.series_uid, row.job_id = study_id, series_uid, job_id
                row.sop_class_uid, row.transfer_syntax, row.kind = (sop_class_uid,
                                                                    transfer_syntax, kind)
                row.size, row.sha256, row.path, row.created_at = (temp.size, temp.sha256, path,
                                                                  now)
                s.flush()
                self.archive.commit(temp, path)
                committed = True
                record = self._result_record(row)
        finally:
            if not committed:
                self.archive.discard(temp)
        if old_path is not None and old_path != path:
            self.archive.remove(old_path)
        return record

    def stage_result(self, encoded: bytes | Sequence[bytes]) -> TempFile:
        """Write a result's bytes ahead of storing it (a worker building results while its
        model runs): a fsynced, hashed temporary file in the archive, not indexed and not
        checked against the watermark (as store_result). ``store_result(encoded=staged)``
        takes it over without copying it again; :meth:`discard_staged` drops one that will
        not be stored. Touches no database: any thread may call it. A killed process's
        leftovers go with the temporary files swept at start."""
        return self.archive.write_temp(encoded, watermark=False)

    def discard_staged(self, staged: TempFile) -> None:
        self.archive.discard(staged)

    def _result_record(self, row: m.Result) -> ResultRecord:
        return ResultRecord(row.id, row.sop_instance_uid, row.series_uid, row.sop_class_uid,
                            row.transfer_syntax, row.kind, self.archive.absolute(row.path),
                            row.size, row.sha256, row.job_id, row.created_at)

    # -- superseded results ---------------------------------------------------------------

    @staticmethod
    def _reached(s: Session, result_ids: Sequence[int]) -> dict[int, list[str]]:
        """Per result, the destinations it may be at: delivered, being sent, or tried (an
        attempt whose answer was lost may have landed)."""
        rows = s.execute(select(m.Delivery.result_id, m.Delivery.destination).where(
            m.Delivery.result_id.in_(list(result_ids)),
            or_(m.Delivery.state.in_((DeliveryState.DONE, DeliveryState.SENDING)),
                m.Delivery.attempts > 0)).order_by(m.Delivery.destination)).all()
        reached: dict[int, list[str]] = {}
        for result_id, destination in rows:
            reached.setdefault(result_id, []).append(destination)
        return reached

    def stale_results(self, study_uid: str, keep: Iterable[str]) -> list[StaleResult]:
        """The study's results, other than ``keep`` (the SOP Instance UIDs the latest run
        produced), that are not superseded yet; rejection notes are never stale."""
        keep = set(keep)
        with self._tx() as s:
            rows = s.scalars(select(m.Result).join(m.Study, m.Study.id == m.Result.study_id)
                             .where(m.Study.study_uid == study_uid,
                                    m.Result.kind != REJECTION,
                                    m.Result.kind.not_like(SUPERSEDED + "%"))
                             .order_by(m.Result.id)).all()
            stale = [r for r in rows if r.sop_instance_uid not in keep]
            reached = self._reached(s, [r.id for r in stale]) if stale else {}
            return [StaleResult(self._result_record(r), tuple(reached.get(r.id, ())))
                    for r in stale]

    def supersede_results(self, result_ids: Sequence[int], *, rejection_id: int | None = None,
                          now: datetime | None = None) -> list[str]:
        """Mark results superseded and cancel their deliveries not done; with a rejection
        note (a stored result), queue it to every destination they may have reached.
        Idempotent. Returns those destinations (sorted): a caller that passed no note and
        gets some back must send one."""
        now = _at(now)
        ids = list(result_ids)
        if not ids:
            return []
        with self._tx() as s:
            rows = s.scalars(select(m.Result).where(m.Result.id.in_(ids))
                             .with_for_update()).all()
            for row in rows:
                if not row.kind.startswith(SUPERSEDED):
                    row.kind = (SUPERSEDED + row.kind)[:32]
            # Reached first: a delivery being sent is cancelled too (its sender gets LeaseLost,
            # and it is never sent again when its lease runs out), but may have landed.
            destinations = sorted({d for ds in self._reached(s, ids).values() for d in ds})
            s.execute(update(m.Delivery).where(
                m.Delivery.result_id.in_(ids),
                m.Delivery.state.in_((DeliveryState.PENDING, DeliveryState.DEAD,
                                      DeliveryState.SENDING)),
            ).values(state=DeliveryState.CANCELLED, lease_owner=None, lease_expires_at=None,
                     updated_at=now))
            if rejection_id is not None:
                if s.get(m.Result, rejection_id) is None:
                    raise ResultNotFound(f"result {rejection_id} does not exist")
                for destination in destinations:
                    s.execute(self._insert(m.Delivery).values(
                        result_id=rejection_id, destination=destination,
                        state=DeliveryState.PENDING, attempts=0, next_attempt_at=now,
                        created_at=now, updated_at=now,
                    ).on_conflict_do_nothing(index_elements=["result_id", "destination"]))
            return destinations

    # -- reading the index ---------------------------------------------------------------

    def study_instances(self, study_uid: str) -> list[InstanceRecord]:
        """The instances of a study, for a worker to load; raises :class:`StudyNotFound`."""
        with self._tx() as s:
            study_id = s.scalar(select(m.Study.id).where(m.Study.study_uid == study_uid))
            if study_id is None:
                raise StudyNotFound(f"study {study_uid} is not in the index")
            rows = s.execute(select(m.Instance, m.Series.series_uid)
                             .join(m.Series, m.Series.id == m.Instance.series_id)
                             .where(m.Instance.study_id == study_id)
                             .order_by(m.Series.series_uid, m.Instance.sop_instance_uid)).all()
            return [InstanceRecord(i.sop_instance_uid, series_uid, i.sop_class_uid,
                                   i.transfer_syntax, self.archive.absolute(i.path), i.size,
                                   i.sha256, i.calling_ae, i.received_at, i.modality,
                                   i.laterality, i.view, i.number_of_frames)
                    for i, series_uid in rows]

    def studies_of_instances(self, sop_instance_uids: Sequence[str]) -> dict[str, str]:
        """SOP Instance UID -> Study Instance UID for those of the UIDs that are indexed (a
        read-only query, 500 UIDs at a time)."""
        uids = list(sop_instance_uids)
        out: dict[str, str] = {}
        with Session(self.engine) as s:
            for i in range(0, len(uids), 500):
                chunk = uids[i:i + 500]
                rows = s.execute(select(m.Instance.sop_instance_uid, m.Study.study_uid)
                                 .join(m.Study, m.Study.id == m.Instance.study_id)
                                 .where(m.Instance.sop_instance_uid.in_(chunk))).all()
                out.update({sop: study for sop, study in rows})
        return out

    def study_job_id(self, study_uid: str) -> int | None:
        """The id of the study's job (every received study has one), or None."""
        with self._tx() as s:
            return s.scalar(select(m.Job.id).join(m.Study, m.Study.id == m.Job.study_id)
                            .where(m.Study.study_uid == study_uid))

    def study_results(self, study_uid: str) -> list[ResultRecord]:
        with self._tx() as s:
            rows = s.scalars(select(m.Result).join(m.Study, m.Study.id == m.Result.study_id)
                             .where(m.Study.study_uid == study_uid)
                             .order_by(m.Result.id)).all()
            return [self._result_record(r) for r in rows]

    # -- jobs ----------------------------------------------------------------------------

    def mark_ready(self, *, idle_seconds: float,
                   idle_seconds_by_ae: Mapping[str, float] | None = None,
                   now: datetime | None = None) -> list[int]:
        """Queue every receiving study idle for long enough; return the queued job ids.

        ``idle_seconds_by_ae`` overrides the idle time per calling AE title. Also fails
        running jobs whose lease expired on their last allowed attempt.
        """
        now = _at(now)
        overrides = dict(idle_seconds_by_ae or {})
        queued: list[int] = []
        with self._tx() as s:
            groups: list[tuple[Any, float]] = [(
                or_(m.Job.calling_ae.is_(None), m.Job.calling_ae.not_in(list(overrides)))
                if overrides else true(), idle_seconds)]
            groups += [(m.Job.calling_ae == ae, secs) for ae, secs in overrides.items()]
            for condition, seconds in groups:
                result = s.execute(
                    update(m.Job).where(
                        m.Job.state == JobState.RECEIVING, condition,
                        m.Job.last_instance_at <= now - timedelta(seconds=seconds))
                    .values(state=JobState.QUEUED, queued_at=now, updated_at=now)
                    .returning(m.Job.id))
                queued.extend(result.scalars())
        self.reap_expired(now=now)
        return sorted(queued)

    def hold_receiving(self, study_uids: Iterable[str], *, now: datetime | None = None
                       ) -> int:
        """An association that brought these studies is still open: restart their idle
        timers, so a study does not start mid-transfer of its next (large) instance. Only
        receiving studies: one already queued (`import --ready`) stays queued. Returns the
        number of jobs held."""
        uids = sorted(set(study_uids))
        if not uids:
            return 0
        now = _at(now)
        with self._tx() as s:
            result = s.execute(
                update(m.Job).where(
                    m.Job.state == JobState.RECEIVING,
                    m.Job.study_id.in_(select(m.Study.id).where(m.Study.study_uid.in_(uids))))
                .values(last_instance_at=now, updated_at=now)
                .execution_options(synchronize_session=False))
            return _rowcount(result)

    def force_ready(self, study_uid: str, *, now: datetime | None = None) -> int:
        """Queue a study now, whatever its state (a running job will run again); its job id."""
        now = _at(now)
        with self._tx() as s:
            job = s.scalars(select(m.Job).join(m.Study, m.Study.id == m.Job.study_id)
                            .where(m.Study.study_uid == study_uid).with_for_update()).first()
            if job is None:
                raise StudyNotFound(f"study {study_uid} has no job; it was never received")
            if job.state == JobState.RUNNING:
                job.rerun = True
            elif job.state != JobState.QUEUED:
                job.state, job.attempts, job.queued_at = JobState.QUEUED, 0, now
                job.last_error = None
            job.updated_at = now
            return job.id

    def claim_job(self, worker_id: str, *, lease_seconds: float = 300.0,
                  now: datetime | None = None) -> Job | None:
        """Take the oldest queued job (or one whose worker's lease expired), or None.

        One statement: UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING on
        PostgreSQL, so concurrent workers never wait for or take the same row; on SQLite the
        transaction is BEGIN IMMEDIATE, so claims are serialised. Each claim counts an attempt.
        """
        now = _at(now)
        # Two probes, each served by the (state, queued_at) index: an OR of both would scan
        # every finished job as the history grows.
        probes = (m.Job.state == JobState.QUEUED,
                  and_(m.Job.state == JobState.RUNNING, m.Job.lease_expires_at < now))
        with self._tx() as s:
            for probe in probes:
                pick = (select(m.Job.id)
                        .where(probe, m.Job.attempts < self.job_max_attempts)
                        .order_by(m.Job.queued_at, m.Job.id)
                        .limit(1)
                        .with_for_update(skip_locked=True)
                        .scalar_subquery())
                job_id = s.execute(
                    update(m.Job).where(m.Job.id == pick).values(
                        state=JobState.RUNNING, lease_owner=worker_id,
                        lease_expires_at=now + timedelta(seconds=lease_seconds),
                        attempts=m.Job.attempts + 1, rerun=False, started_at=now,
                        finished_at=None, updated_at=now)
                    .returning(m.Job.id)).scalar()
                if job_id is not None:
                    return self._job(s, job_id)
        self.reap_expired(now=now)
        return None

    def renew_lease(self, job_id: int, worker_id: str, *, lease_seconds: float = 300.0,
                    now: datetime | None = None) -> datetime:
        """Extend the lease; raises :class:`LeaseLost` when the worker no longer holds it."""
        now = _at(now)
        expires = now + timedelta(seconds=lease_seconds)
        with self._tx() as s:
            done = s.execute(update(m.Job).where(*self._held(job_id, worker_id))
                             .values(lease_expires_at=expires, updated_at=now)
                             .returning(m.Job.id)).scalar()
            if done is None:
                self._lease_lost(s, job_id, worker_id)
        return expires

    def complete_job(self, job_id: int, worker_id: str, *,
                     now: datetime | None = None) -> JobState:
        """Mark the job done (or receiving again when instances arrived while it ran)."""
        now = _at(now)
        with self._tx() as s:
            # A completed run uses up no attempt of the next one (the study grew meanwhile).
            state = s.execute(update(m.Job).where(*self._held(job_id, worker_id)).values(
                state=case((m.Job.rerun, JobState.RECEIVING.value), else_=JobState.DONE.value),
                attempts=case((m.Job.rerun, 0), else_=m.Job.attempts), rerun=False,
                lease_owner=None, lease_expires_at=None, finished_at=now,
                updated_at=now, last_error=None,
            ).returning(m.Job.state)).scalar()
            if state is None:
                self._lease_lost(s, job_id, worker_id)
            return JobState(state)

    def fail_job(self, job_id: int, worker_id: str, error: str, *, retry: bool,
                 now: datetime | None = None) -> JobState:
        """Record a failure; queue the job again when ``retry`` and attempts remain."""
        now = _at(now)
        with self._tx() as s:
            job = self._require_lease(s, job_id, worker_id)
            again = retry and job.attempts < self.job_max_attempts
            job.state = JobState.QUEUED if again else JobState.FAILED
            job.last_error = error[:_MAX_ERROR]
            job.lease_owner, job.lease_expires_at = None, None
            job.finished_at = None if again else now
            job.updated_at = now
            if again:
                job.queued_at = now
            return JobState(job.state)

    def reap_expired(self, *, now: datetime | None = None) -> int:
        """Fail running jobs whose lease expired on their last allowed attempt."""
        now = _at(now)
        with self._tx() as s:
            result = s.execute(update(m.Job).where(
                m.Job.state == JobState.RUNNING, m.Job.lease_expires_at < now,
                m.Job.attempts >= self.job_max_attempts,
            ).values(state=JobState.FAILED, lease_owner=None, lease_expires_at=None,
                     finished_at=now, updated_at=now,
                     last_error=f"lease expired on attempt {self.job_max_attempts} of "
                                f"{self.job_max_attempts}: the worker died or hung; see its "
                                "log, then `dicomnode jobs retry ID`"))
            return _rowcount(result)

    @staticmethod
    def _held(job_id: int, worker_id: str) -> tuple[Any, ...]:
        # An expired lease that nobody has taken over yet still counts: the work is valid.
        return (m.Job.id == job_id, m.Job.state == JobState.RUNNING,
                m.Job.lease_owner == worker_id)

    def _lease_lost(self, s: Session, job_id: int, worker_id: str) -> NoReturn:
        row = s.execute(select(m.Job.state, m.Job.lease_owner).where(m.Job.id == job_id)).first()
        if row is None:
            raise JobNotFound(f"job {job_id} does not exist")
        raise LeaseLost(f"worker {worker_id} no longer holds job {job_id} (state {row[0]}, "
                        f"owner {row[1]}); drop its work")

    def _require_lease(self, s: Session, job_id: int, worker_id: str) -> m.Job:
        job = s.scalars(select(m.Job).where(*self._held(job_id, worker_id))
                        .with_for_update()).first()
        if job is None:
            self._lease_lost(s, job_id, worker_id)
        return job

    def _job(self, s: Session, job_id: int) -> Job:
        row = s.execute(select(m.Job, m.Study.study_uid)
                        .join(m.Study, m.Study.id == m.Job.study_id)
                        .where(m.Job.id == job_id)).first()
        if row is None:
            raise JobNotFound(f"job {job_id} does not exist; `dicomnode jobs list` shows the "
                              "jobs there are")
        j, study_uid = row
        return Job(j.id, study_uid, JobState(j.state), j.attempts, j.calling_ae, j.lease_owner,
                   j.lease_expires_at, j.last_error, j.rerun, j.last_instance_at, j.created_at,
                   j.queued_at, j.started_at, j.finished_at)

    def get_job(self, job_id: int) -> Job:
        with self._tx() as s:
            return self._job(s, job_id)

    def list_jobs(self, *, state: JobState | str | None = None, limit: int = 100) -> list[Job]:
        """Most recently updated first."""
        with self._tx() as s:
            query = select(m.Job.id).order_by(m.Job.updated_at.desc(), m.Job.id.desc())
            if state is not None:
                query = query.where(m.Job.state == JobState(state))
            return [self._job(s, i) for i in s.scalars(query.limit(limit)).all()]

    def job_detail(self, job_id: int) -> JobDetail:
        with self._tx() as s:
            job = self._job(s, job_id)
            study_id = s.scalar(select(m.Job.study_id).where(m.Job.id == job_id))
            instances = s.scalar(select(func.count()).select_from(m.Instance)
                                 .where(m.Instance.study_id == study_id)) or 0
            series = s.scalar(select(func.count()).select_from(m.Series)
                              .where(m.Series.study_id == study_id)) or 0
            results = s.scalars(select(m.Result).where(m.Result.study_id == study_id)
                                .order_by(m.Result.id)).all()
            deliveries = self._deliveries(s, [r.id for r in results])
            return JobDetail(job, instances, series, [self._result_record(r) for r in results],
                             deliveries)

    @staticmethod
    def _job_for_update(s: Session, job_id: int) -> m.Job:
        job = s.scalars(select(m.Job).where(m.Job.id == job_id).with_for_update()).first()
        if job is None:
            raise JobNotFound(f"job {job_id} does not exist; `dicomnode jobs list` shows the "
                              "jobs there are")
        return job

    def retry_job(self, job_id: int, *, now: datetime | None = None) -> RetryOutcome:
        """Admin retry: a failed or cancelled job is queued again with fresh attempts, and the
        dead-lettered deliveries of the study's results are due again now."""
        now = _at(now)
        with self._tx() as s:
            job = self._job_for_update(s, job_id)
            requeue = job.state in (JobState.FAILED, JobState.CANCELLED)
            if requeue:
                job.state, job.attempts, job.queued_at = JobState.QUEUED, 0, now
                job.last_error, job.finished_at, job.updated_at = None, None, now
            result_ids = select(m.Result.id).where(m.Result.study_id == job.study_id)
            revived = _rowcount(s.execute(update(m.Delivery).where(
                m.Delivery.result_id.in_(result_ids), m.Delivery.state == DeliveryState.DEAD,
            ).values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=now,
                     updated_at=now)))
            if not requeue and not revived:
                raise InvalidState(f"job {job_id} is {job.state} and has no dead-lettered "
                                   "deliveries: nothing to retry (only failed or cancelled "
                                   "jobs are retried)")
            return RetryOutcome(requeue, revived)

    def cancel_job(self, job_id: int, *, now: datetime | None = None) -> Job:
        """Admin cancel: the job will not run (a running worker gets :class:`LeaseLost`) and
        its pending deliveries are cancelled. New instances do not revive it; retry does."""
        now = _at(now)
        with self._tx() as s:
            job = self._job_for_update(s, job_id)
            if job.state in (JobState.DONE, JobState.CANCELLED):
                raise InvalidState(f"job {job_id} is already {job.state}; nothing to cancel")
            job.state, job.lease_owner, job.lease_expires_at = JobState.CANCELLED, None, None
            job.finished_at = job.updated_at = now
            s.execute(update(m.Delivery).where(
                m.Delivery.result_id.in_(select(m.Result.id)
                                         .where(m.Result.study_id == job.study_id)),
                m.Delivery.state == DeliveryState.PENDING,
            ).values(state=DeliveryState.CANCELLED, updated_at=now))
            s.flush()
            return self._job(s, job_id)

    def oldest_queued_job(self) -> tuple[int, datetime | None] | None:
        """The queued job that has waited longest for a worker: (its id, when it was
        queued), or None when none is queued."""
        with self.engine.connect() as conn:
            row = conn.execute(select(m.Job.id, m.Job.queued_at)
                               .where(m.Job.state == JobState.QUEUED)
                               .order_by(m.Job.queued_at, m.Job.id).limit(1)).first()
        return None if row is None else (int(row[0]), row[1])

    def queue_counts(self) -> dict[str, dict[str, int]]:
        """{"jobs": {state: n}, "deliveries": {state: n}} for status displays and metrics."""
        with self._tx() as s:
            jobs = dict(s.execute(select(m.Job.state, func.count()).group_by(m.Job.state)).all())
            deliveries = dict(s.execute(select(m.Delivery.state, func.count())
                                        .group_by(m.Delivery.state)).all())
            return {"jobs": jobs, "deliveries": deliveries}

    # -- deliveries ----------------------------------------------------------------------

    def enqueue_delivery(self, result_id: int, destination: str, *,
                         now: datetime | None = None) -> int:
        """Queue a result for a destination AE (idempotent); the delivery id."""
        if not destination or len(destination) > 64:
            raise ValueError("destination must be a non-empty name of at most 64 characters")
        now = _at(now)
        with self._tx() as s:
            if s.get(m.Result, result_id) is None:
                raise ResultNotFound(f"result {result_id} does not exist")
            s.execute(self._insert(m.Delivery).values(
                result_id=result_id, destination=destination, state=DeliveryState.PENDING,
                attempts=0, next_attempt_at=now, created_at=now, updated_at=now,
            ).on_conflict_do_nothing(index_elements=["result_id", "destination"]))
            return s.scalars(select(m.Delivery.id).where(
                m.Delivery.result_id == result_id, m.Delivery.destination == destination)).one()

    def claim_due_deliveries(self, worker_id: str, *, limit: int = 10,
                             lease_seconds: float = 120.0,
                             now: datetime | None = None) -> list[DeliveryTask]:
        """Lease up to ``limit`` due deliveries (also ones whose sender died); counts an
        attempt each. Ordered by due time, so one destination that is down (its deliveries
        pushed into the future by backoff) never blocks the others."""
        now = _at(now)
        expires = now + timedelta(seconds=lease_seconds)
        probes = (and_(m.Delivery.state == DeliveryState.PENDING,
                       m.Delivery.next_attempt_at <= now),
                  and_(m.Delivery.state == DeliveryState.SENDING,
                       m.Delivery.lease_expires_at < now))
        ids: list[int] = []
        with self._tx() as s:
            for probe in probes:  # separate probes: each uses (state, next_attempt_at)
                if len(ids) >= limit:
                    break
                pick = (select(m.Delivery.id).where(probe)
                        .order_by(m.Delivery.next_attempt_at, m.Delivery.id)
                        .limit(limit - len(ids)).with_for_update(skip_locked=True))
                ids += s.execute(update(m.Delivery).where(m.Delivery.id.in_(pick)).values(
                    state=DeliveryState.SENDING, lease_owner=worker_id,
                    lease_expires_at=expires, attempts=m.Delivery.attempts + 1, updated_at=now,
                ).returning(m.Delivery.id)).scalars().all()
            if not ids:
                return []
            rows = s.execute(
                select(m.Delivery, m.Result, m.Study.study_uid)
                .join(m.Result, m.Result.id == m.Delivery.result_id)
                .join(m.Study, m.Study.id == m.Result.study_id)
                .where(m.Delivery.id.in_(ids))
                .order_by(m.Delivery.next_attempt_at, m.Delivery.id)).all()
            return [DeliveryTask(d.id, d.destination, d.attempts, study_uid, r.sop_instance_uid,
                                 r.sop_class_uid, r.transfer_syntax,
                                 self.archive.absolute(r.path), expires)
                    for d, r, study_uid in rows]

    def lease_owners(self) -> set[str]:
        """The workers holding a job or a delivery lease now (expired or not)."""
        with self._tx() as s:
            jobs = s.scalars(select(m.Job.lease_owner).distinct().where(
                m.Job.state == JobState.RUNNING, m.Job.lease_owner.is_not(None))).all()
            deliveries = s.scalars(select(m.Delivery.lease_owner).distinct().where(
                m.Delivery.state == DeliveryState.SENDING,
                m.Delivery.lease_owner.is_not(None))).all()
            return {o for o in (*jobs, *deliveries) if o}

    def expire_leases(self, owners: Iterable[str], *,
                      now: datetime | None = None) -> tuple[int, int]:
        """End the leases of workers known to be dead (a restarted node's previous
        incarnation): their jobs and deliveries are due now instead of when the lease would
        have run out. The attempts they used stay counted. (jobs, deliveries) released."""
        names = sorted(set(owners))
        if not names:
            return 0, 0
        past = _at(now) - timedelta(seconds=1)
        with self._tx() as s:
            jobs = _rowcount(s.execute(update(m.Job).where(
                m.Job.state == JobState.RUNNING, m.Job.lease_owner.in_(names))
                .values(lease_expires_at=past)))
            deliveries = _rowcount(s.execute(update(m.Delivery).where(
                m.Delivery.state == DeliveryState.SENDING, m.Delivery.lease_owner.in_(names))
                .values(lease_expires_at=past)))
        return jobs, deliveries

    def record_delivery_attempt(self, delivery_id: int, worker_id: str, *, ok: bool,
                                status: str | int | None = None, error: str | None = None,
                                now: datetime | None = None) -> DeliveryUpdate:
        """Record the outcome of a claimed delivery; on failure it backs off or dead-letters.

        ``status`` is what the destination answered (e.g. "0x0000", "0xA700", "refused");
        the attempt is also written to the audit trail.
        """
        now = _at(now)
        status_text = (f"0x{status:04X}" if isinstance(status, int) else status)
        with self._tx() as s:
            row = s.execute(
                select(m.Delivery, m.Result.sop_instance_uid, m.Study.study_uid)
                .join(m.Result, m.Result.id == m.Delivery.result_id)
                .join(m.Study, m.Study.id == m.Result.study_id)
                .where(m.Delivery.id == delivery_id).with_for_update(of=m.Delivery)).first()
            if row is None:
                raise DeliveryNotFound(f"delivery {delivery_id} does not exist")
            d, sop_uid, study_uid = row
            if d.state != DeliveryState.SENDING or d.lease_owner != worker_id:
                raise LeaseLost(f"worker {worker_id} no longer holds delivery {delivery_id} "
                                f"(state {d.state}); drop this attempt")
            d.last_status, d.last_error = status_text, (error or None) and error[:_MAX_ERROR]
            d.lease_owner, d.lease_expires_at, d.updated_at = None, None, now
            next_at: datetime | None = None
            if ok:
                d.state, d.delivered_at = DeliveryState.DONE, now
            elif d.attempts >= self.delivery_max_attempts:
                d.state = DeliveryState.DEAD
            else:
                d.state = DeliveryState.PENDING
                next_at = now + timedelta(seconds=backoff_delay(
                    d.attempts, initial_s=self.backoff_initial_s, max_s=self.backoff_max_s,
                    rng=self._rng))
                d.next_attempt_at = next_at
            s.add(m.AuditEvent(at=now, event="delivery", called_ae=d.destination[:16],
                               study_uid=study_uid, sop_instance_uid=sop_uid,
                               status=status_text or ("ok" if ok else "failed"),
                               detail=(error or None) and error[:_MAX_ERROR]))
            return DeliveryUpdate(d.id, DeliveryState(d.state), d.attempts, next_at)

    def retry_dead_letters(self, *, delivery_ids: Sequence[int] | None = None,
                           destination: str | None = None,
                           now: datetime | None = None) -> int:
        """Make dead-lettered deliveries due now with fresh attempts; how many."""
        now = _at(now)
        query = update(m.Delivery).where(m.Delivery.state == DeliveryState.DEAD)
        if delivery_ids is not None:
            query = query.where(m.Delivery.id.in_(list(delivery_ids)))
        if destination is not None:
            query = query.where(m.Delivery.destination == destination)
        with self._tx() as s:
            return _rowcount(s.execute(query.values(state=DeliveryState.PENDING, attempts=0,
                                                    next_attempt_at=now, updated_at=now)))

    def list_deliveries(self, *, state: DeliveryState | str | None = None,
                        limit: int = 100) -> list[DeliveryRecord]:
        """Newest first."""
        query = (select(m.Delivery, m.Result.sop_instance_uid)
                 .join(m.Result, m.Result.id == m.Delivery.result_id)
                 .order_by(m.Delivery.id.desc()).limit(limit))
        if state is not None:
            query = query.where(m.Delivery.state == DeliveryState(state))
        with self._tx() as s:
            return self._delivery_records(s, query)

    def _deliveries(self, s: Session, result_ids: Sequence[int]) -> list[DeliveryRecord]:
        if not result_ids:
            return []
        return self._delivery_records(s, select(m.Delivery, m.Result.sop_instance_uid)
                                      .join(m.Result, m.Result.id == m.Delivery.result_id)
                                      .where(m.Delivery.result_id.in_(list(result_ids)))
                                      .order_by(m.Delivery.id))

    @staticmethod
    def _delivery_records(s: Session, query: Any) -> list[DeliveryRecord]:
        return [DeliveryRecord(d.id, d.result_id, sop, d.destination, DeliveryState(d.state),
                               d.attempts, d.next_attempt_at, d.last_status, d.last_error,
                               d.delivered_at)
                for d, sop in s.execute(query).all()]

    # -- storage commitment --------------------------------------------------------------

    def record_commitment_request(self, delivery_ids: Sequence[int], transaction_uid: str, *,
                                  requested: bool, failure: str | None = None,
                                  now: datetime | None = None) -> None:
        """Storage commitment was asked for these deliveries' results in one N-ACTION
        (``requested``: the destination accepted it; else ``failure`` says why not). A
        delivery asked again (sent again) starts over with the new transaction."""
        validate_uid(transaction_uid, "Transaction UID")
        now = _at(now)
        state = CommitmentState.PENDING if requested else CommitmentState.FAILED
        failure = None if requested else (failure or "request failed")[:64]
        with self._tx() as s:
            for delivery_id in delivery_ids:
                values = dict(transaction_uid=transaction_uid, state=state, requested_at=now,
                              reported_at=None, failure=failure)
                s.execute(self._insert(m.Commitment).values(delivery_id=delivery_id, **values)
                          .on_conflict_do_update(index_elements=["delivery_id"], set_=values))
            s.add(m.AuditEvent(at=now, event="commitment_request", count=len(delivery_ids),
                               status="requested" if requested else "failed",
                               detail=f"transaction {transaction_uid}"
                               + (f": {failure}" if failure else "")))

    def record_commitment_report(self, transaction_uid: str, *, committed: Iterable[str],
                                 failed: Mapping[str, str], reporter_ae: str | None = None,
                                 now: datetime | None = None) -> CommitmentReport:
        """An N-EVENT-REPORT for ``transaction_uid``: the SOP Instance UIDs the destination
        committed, and those it failed with their Failure Reason. A report from an AE other
        than the delivery's destination, or for SOP instances outside the transaction,
        changes nothing (counted as unknown)."""
        now = _at(now)
        outcome = {**{uid: None for uid in committed}, **dict(failed)}
        done = bad = 0
        with self._tx() as s:
            rows = s.execute(
                select(m.Commitment, m.Delivery.destination, m.Result.sop_instance_uid,
                       m.Study.study_uid)
                .join(m.Delivery, m.Delivery.id == m.Commitment.delivery_id)
                .join(m.Result, m.Result.id == m.Delivery.result_id)
                .join(m.Study, m.Study.id == m.Result.study_id)
                .where(m.Commitment.transaction_uid == transaction_uid)
                .with_for_update(of=m.Commitment)).all()
            for c, destination, sop_uid, study_uid in rows:
                if sop_uid not in outcome:
                    continue
                if reporter_ae is not None and destination[:16] != reporter_ae:
                    continue
                reason = outcome.pop(sop_uid)
                c.reported_at = now
                if reason is None:
                    c.state, c.failure = CommitmentState.COMMITTED, None
                    done += 1
                else:
                    c.state, c.failure = CommitmentState.FAILED, str(reason)[:64]
                    bad += 1
                s.add(m.AuditEvent(at=now, event="commitment", calling_ae=reporter_ae,
                                   called_ae=destination[:16], study_uid=study_uid,
                                   sop_instance_uid=sop_uid,
                                   status=str(c.state), detail=c.failure))
            if outcome:
                s.add(m.AuditEvent(at=now, event="commitment_unknown", calling_ae=reporter_ae,
                                   count=len(outcome), status="ignored",
                                   detail=f"transaction {transaction_uid}"))
        return CommitmentReport(transaction_uid, done, bad, len(outcome))

    def resend_uncommitted(self, job_id: int, *, now: datetime | None = None) -> int:
        """Admin: the delivered results of the job's study whose commitment failed or never
        got a report are due again now (sent again, then commitment asked again); how many.
        """
        now = _at(now)
        with self._tx() as s:
            job = self._job_for_update(s, job_id)
            ids = s.scalars(
                select(m.Delivery.id)
                .join(m.Result, m.Result.id == m.Delivery.result_id)
                .join(m.Commitment, m.Commitment.delivery_id == m.Delivery.id)
                .where(m.Result.study_id == job.study_id,
                       m.Commitment.state != CommitmentState.COMMITTED,
                       m.Delivery.state.in_((DeliveryState.DONE, DeliveryState.DEAD)))).all()
            if not ids:
                return 0
            s.execute(update(m.Delivery).where(m.Delivery.id.in_(ids)).values(
                state=DeliveryState.PENDING, attempts=0, next_attempt_at=now, updated_at=now))
            s.add(m.AuditEvent(at=now, event="commitment_resend", count=len(ids),
                               status="queued", detail=f"job {job_id}"))
            return len(ids)

    def commitments(self, *, job_id: int | None = None, state: CommitmentState | str | None
                    = None, limit: int = 1000) -> list[CommitmentRecord]:
        """Commitment of delivered results, of one job's study or of all, oldest first."""
        query = (select(m.Commitment, m.Delivery.destination, m.Result.sop_instance_uid)
                 .join(m.Delivery, m.Delivery.id == m.Commitment.delivery_id)
                 .join(m.Result, m.Result.id == m.Delivery.result_id)
                 .order_by(m.Commitment.id).limit(limit))
        if job_id is not None:
            query = query.where(m.Result.study_id == select(m.Job.study_id)
                                .where(m.Job.id == job_id).scalar_subquery())
        if state is not None:
            query = query.where(m.Commitment.state == CommitmentState(state))
        with self._tx() as s:
            return [CommitmentRecord(c.delivery_id, sop, dest, c.transaction_uid,
                                     CommitmentState(c.state), c.requested_at, c.reported_at,
                                     c.failure)
                    for c, dest, sop in s.execute(query).all()]

    def commitment_counts(self) -> dict[str, int]:
        """{state: n} of storage commitments, for status displays and metrics."""
        with self._tx() as s:
            return dict(s.execute(select(m.Commitment.state, func.count())
                                  .group_by(m.Commitment.state)).all())

    # -- audit ---------------------------------------------------------------------------

    def audit(self, event: str, *, calling_ae: str | None = None, called_ae: str | None = None,
              peer: str | None = None, study_uid: str | None = None,
              sop_instance_uid: str | None = None, count: int | None = None,
              status: str | None = None, detail: str | None = None,
              now: datetime | None = None) -> None:
        """Append to the audit trail (e.g. event="association", count=instances received).

        Takes AE titles, addresses and UIDs only: never pass patient names or IDs.
        """
        with self._tx() as s:
            s.add(m.AuditEvent(at=_at(now), event=event[:32], calling_ae=calling_ae,
                               called_ae=called_ae, peer=peer, study_uid=study_uid,
                               sop_instance_uid=sop_instance_uid, count=count, status=status,
                               detail=detail and detail[:_MAX_ERROR]))

    def audit_trail(self, *, since: datetime | None = None,
                    limit: int = 1000) -> list[AuditRecord]:
        with self._tx() as s:
            query = select(m.AuditEvent).order_by(m.AuditEvent.at, m.AuditEvent.id)
            if since is not None:
                query = query.where(m.AuditEvent.at >= since)
            return [AuditRecord(a.at, a.event, a.calling_ae, a.called_ae, a.peer, a.study_uid,
                                a.sop_instance_uid, a.count, a.status, a.detail)
                    for a in s.scalars(query.limit(limit)).all()]

    def recent_audit(self, count: int) -> list[AuditRecord]:
        """The last ``count`` audit events, oldest first (audit_trail reads from the start)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(m.AuditEvent.__table__)
                                .order_by(m.AuditEvent.at.desc(), m.AuditEvent.id.desc())
                                .limit(count)).mappings().all()
        return [_audit_record(r) for r in reversed(rows)]

    def last_audit(self, event: str) -> AuditRecord | None:
        """The newest audit event of this kind (e.g. "retrieve", "export"), or None."""
        with self.engine.connect() as conn:
            r = conn.execute(select(m.AuditEvent.__table__).where(m.AuditEvent.event == event)
                             .order_by(m.AuditEvent.at.desc(), m.AuditEvent.id.desc())
                             .limit(1)).mappings().first()
        return None if r is None else _audit_record(r)

    # -- retention -----------------------------------------------------------------------

    def apply_retention(self, max_age: timedelta, *,
                        now: datetime | None = None) -> RetentionReport:
        """Delete studies (instances, results, their rows) last received before
        ``now - max_age``, except those whose job is unfinished, whose deliveries are
        pending, or whose delivered results are not committed (where commitment was
        requested). Rows go first, files after the commit: a crash leaves unindexed files,
        never an index entry without its file. Each study removed leaves a "retention" audit
        event (its UID, count = its instances) in the same transaction.

        Safe to run from several processes at once: a study is removed by one transaction
        (the others find it gone, or wait on its row lock), and files are removed only where
        no row refers to them any more."""
        now = _at(now)
        cutoff = now - max_age
        busy_jobs = select(m.Job.study_id).where(m.Job.state.in_(UNFINISHED_JOB_STATES))
        busy_deliveries = (select(m.Result.study_id)
                           .join(m.Delivery, m.Delivery.result_id == m.Result.id)
                           .where(m.Delivery.state.in_((DeliveryState.PENDING,
                                                        DeliveryState.SENDING))))
        # Where storage commitment was requested, a source stays until every result of its
        # study is committed (a failed commitment needs an admin: the PACS may not hold it).
        uncommitted = (select(m.Result.study_id)
                       .join(m.Delivery, m.Delivery.result_id == m.Result.id)
                       .join(m.Commitment, m.Commitment.delivery_id == m.Delivery.id)
                       .where(m.Commitment.state != CommitmentState.COMMITTED))
        with self._tx() as s:
            studies = s.execute(select(m.Study.id, m.Study.study_uid).where(
                m.Study.last_received_at < cutoff, m.Study.id.not_in(busy_jobs),
                m.Study.id.not_in(busy_deliveries),
                m.Study.id.not_in(uncommitted)).with_for_update()).all()
            if not studies:
                return RetentionReport(0, 0, 0, 0)
            study_ids = [study_id for study_id, _ in studies]
            per_study = dict(s.execute(
                select(m.Instance.study_id, func.count(m.Instance.id))
                .where(m.Instance.study_id.in_(study_ids)).group_by(m.Instance.study_id)).all())
            for study_id, study_uid in studies:
                s.add(m.AuditEvent(at=now, event="retention", study_uid=study_uid,
                                   count=per_study.get(study_id, 0),
                                   detail=f"last received before {cutoff.isoformat()}"))
            instance_paths = s.scalars(select(m.Instance.path)
                                       .where(m.Instance.study_id.in_(study_ids))).all()
            result_paths = s.scalars(select(m.Result.path)
                                     .where(m.Result.study_id.in_(study_ids))).all()
            result_ids = select(m.Result.id).where(m.Result.study_id.in_(study_ids))
            s.execute(delete(m.Commitment).where(m.Commitment.delivery_id.in_(
                select(m.Delivery.id).where(m.Delivery.result_id.in_(result_ids)))))
            s.execute(delete(m.Delivery).where(m.Delivery.result_id.in_(result_ids)))
            s.execute(delete(m.Result).where(m.Result.study_id.in_(study_ids)))
            s.execute(delete(m.Instance).where(m.Instance.study_id.in_(study_ids)))
            s.execute(delete(m.Series).where(m.Series.study_id.in_(study_ids)))
            s.execute(delete(m.Job).where(m.Job.study_id.in_(study_ids)))
            s.execute(delete(m.Study).where(m.Study.id.in_(study_ids)))
            s.execute(delete(m.Patient).where(m.Patient.id.not_in(select(m.Study.patient_id))))
        freed = sum(self.archive.remove(p)
                    for p in self._unindexed([*instance_paths, *result_paths]))
        return RetentionReport(len(study_ids), len(instance_paths), len(result_paths), freed,
                               tuple(uid for _, uid in studies))

    def _unindexed(self, paths: Sequence[str]) -> list[str]:
        """The paths no row refers to any more (an instance re-sent while retention ran
        was written to the same path and must keep its file)."""
        still: set[str] = set()
        with self._tx() as s:
            for i in range(0, len(paths), 500):
                chunk = list(paths[i:i + 500])
                still.update(s.scalars(select(m.Instance.path).where(m.Instance.path.in_(chunk))))
                still.update(s.scalars(select(m.Result.path).where(m.Result.path.in_(chunk))))
        return [p for p in paths if p not in still]

