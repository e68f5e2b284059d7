"""Helpers for tests and benchmarks: scratch PostgreSQL schemas, seeded queues, and a
claim worker that runs in its own process (importable, so multiprocessing "spawn" works)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.engine import URL

from storage import tables as m
from storage.engine import create_storage_engine, url_with_search_path
from storage.records import JobState


@contextmanager
def scratch_schema(url: str | URL, prefix: str = "dicomnode_scratch") -> Iterator[str]:
    """Create a throwaway PostgreSQL schema, yield a URL scoped to it, drop it afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = create_storage_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield url_with_search_path(url, schema)
    finally:
        try:
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        finally:
            engine.dispose()


def synthetic_uid(*parts: int) -> str:
    """A valid UID under the '2.25' (UUID-derived) root, unique per ``parts``."""
    return "2.25." + ".".join(str(p) for p in parts)


def seed_queued_jobs(store: Any, count: int, *, now: datetime | None = None,
                     tag: int = 1) -> list[int]:
    """Insert ``count`` studies with queued jobs directly (no files); return the job ids.

    For queue tests and benchmarks, where going through store_instance would only add
    file-system time. ``tag`` keeps UIDs distinct between calls.
    """
    now = now or datetime.now(UTC)
    with store.engine.begin() as conn:
        patient_id = conn.execute(insert(m.Patient).values(
            key=f"seed-{tag}-{uuid.uuid4().hex}", created_at=now).returning(m.Patient.id)
        ).scalar_one()
        study_ids = conn.execute(
            insert(m.Study).returning(m.Study.id, sort_by_parameter_order=True),
            [{"study_uid": synthetic_uid(tag, i), "patient_id": patient_id,
              "first_received_at": now, "last_received_at": now}
             for i in range(count)]).scalars().all()
        return list(conn.execute(
            insert(m.Job).returning(m.Job.id, sort_by_parameter_order=True),
            [{"study_id": sid, "state": JobState.QUEUED, "attempts": 0, "rerun": False,
              "last_instance_at": now, "created_at": now, "updated_at": now, "queued_at": now}
             for sid in study_ids]).scalars().all())


def claim_worker(url: str, archive_dir: str, worker_id: str, barrier: Any, results: Any,
                 work_s: float = 0.0, lease_seconds: float = 60.0) -> None:
    """Claim and complete jobs until none is left; put (worker_id, ids, start, end) on
    ``results``. Waits on ``barrier`` after connecting, so workers start claiming together."""
    from storage.store import Store

    store = Store(url, archive_dir, create_schema=False)
    try:
        done: list[int] = []
        barrier.wait()
        start = time.time()
        while (job := store.claim_job(worker_id, lease_seconds=lease_seconds)) is not None:
            if work_s:
                time.sleep(work_s)
            store.complete_job(job.id, worker_id)
            done.append(job.id)
        results.put((worker_id, done, start, time.time()))
    finally:
        store.close()
