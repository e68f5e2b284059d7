"""Real OS processes against one store, on SQLite and PostgreSQL: concurrent claims, a worker
killed with SIGKILL mid-job, and writers killed in the middle of a write."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
import signal
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from storage import JobState, Store, StoreOutcome
from storage import tables as m
from storage.errors import LeaseLost
from storage.store import utcnow
from storage.testing import claim_worker, seed_queued_jobs
from tests.support import storage as support
from tests.support import storage_procs
from tests.support.storage import archive_files, instance_args

db_url, make_store, store = support.db_url, support.make_store, support.store  # fixtures

SPAWN = multiprocessing.get_context("spawn")


def _join(processes: list) -> None:
    for p in processes:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
            p.join()
            pytest.fail(f"worker process {p.pid} hung")


def test_four_workers_claim_200_jobs_exactly_once(db_url: str, store: Store,
                                                  tmp_path: Path) -> None:
    job_ids = seed_queued_jobs(store, 200)
    barrier, results = SPAWN.Barrier(4), SPAWN.Queue()
    workers = [SPAWN.Process(target=claim_worker, args=(db_url, str(tmp_path / "archive"),
                                                        f"worker-{i}", barrier, results))
               for i in range(4)]
    for w in workers:
        w.start()
    reports = [results.get(timeout=120) for _ in workers]
    _join(workers)
    assert all(w.exitcode == 0 for w in workers)

    processed = [job_id for _, done, _, _ in reports for job_id in done]
    assert len(processed) == len(set(processed)) == 200
    assert sorted(processed) == sorted(job_ids)
    assert sum(1 for _, done, _, _ in reports if done) >= 2, "claims were not concurrent"
    jobs = store.list_jobs(limit=500)
    assert {j.state for j in jobs} == {JobState.DONE}
    assert {j.attempts for j in jobs} == {1}
    owners = {job_id: worker for worker, done, _, _ in reports for job_id in done}
    assert len(set(owners.values())) == sum(1 for _, done, _, _ in reports if done)


def test_worker_killed_mid_job_loses_lease_to_another(db_url: str, store: Store,
                                                      tmp_path: Path) -> None:
    [job_id] = seed_queued_jobs(store, 1)
    claimed = SPAWN.Queue()
    victim = SPAWN.Process(target=storage_procs.hold_job,
                           args=(db_url, str(tmp_path / "archive"), "doomed", 2.0, claimed))
    victim.start()
    try:
        assert claimed.get(timeout=60) == job_id
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=30)
    assert victim.exitcode == -signal.SIGKILL
    assert store.get_job(job_id).lease_owner == "doomed"

    assert store.claim_job("rescuer") is None                   # lease still running
    later = utcnow() + timedelta(seconds=3)                      # past the 2 s lease
    job = store.claim_job("rescuer", now=later)
    assert job is not None and job.id == job_id and job.attempts == 2
    with pytest.raises(LeaseLost):
        store.complete_job(job_id, "doomed", now=later)
    assert store.complete_job(job_id, "rescuer", now=later) is JobState.DONE
    assert store.get_job(job_id).lease_owner is None


def _assert_index_matches_files(store: Store, archive: Path) -> dict[str, str]:
    """Every indexed instance has its complete file; return sop -> sha256."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(m.Instance.sop_instance_uid, m.Instance.path,
                                   m.Instance.size, m.Instance.sha256)).all()
    for sop, path, size, sha in rows:
        data = (archive / path).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha, sop
    return {sop: sha for sop, _, _, sha in rows}


def test_writer_killed_during_writes_never_leaves_a_half_indexed_file(
        db_url: str, store: Store, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    args = instance_args()
    payloads = [b"A" * (3 << 20), b"B" * (3 << 20) + b"!"]
    shas = {hashlib.sha256(p).hexdigest() for p in payloads}
    store.store_instance(**{**args, "encoded": payloads[0]})
    for delay in (0.4, 0.9):
        started = SPAWN.Queue()
        writer = SPAWN.Process(target=storage_procs.rewrite_forever,
                               args=(db_url, str(archive), args, payloads, started))
        writer.start()
        started.get(timeout=60)
        try:
            started.get(timeout=delay)
        except queue.Empty:
            pass
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=30)
        indexed = _assert_index_matches_files(store, archive)
        assert indexed[args["sop_instance_uid"]] in shas
    # Leftovers of the killed writes are temporary files or unindexed orphans; a later
    # store of the same instance sees a consistent state.
    store.archive.sweep_temp(older_than_s=0)
    again = store.store_instance(**{**args, "encoded": payloads[1]})
    assert again.outcome in (StoreOutcome.DUPLICATE, StoreOutcome.REPLACED)
    _assert_index_matches_files(store, archive)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacement"])
def test_death_between_rename_and_commit_keeps_old_state(
        db_url: str, store: Store, tmp_path: Path, existing: bool) -> None:
    archive = tmp_path / "archive"
    old = instance_args(content=b"old content")
    if existing:
        store.store_instance(**old)
    before = _assert_index_matches_files(store, archive)
    dying = SPAWN.Process(target=storage_procs.die_after_rename,
                          args=(db_url, str(archive), instance_args(content=b"new content")))
    dying.start()
    dying.join(timeout=60)
    assert dying.exitcode == 137
    assert _assert_index_matches_files(store, archive) == before   # old state, complete
    if existing:
        [record] = store.study_instances(old["study_uid"])
        assert record.path.read_bytes() == b"old content"
    # The renamed but unindexed file is an orphan; the resent instance is stored properly.
    stored = store.store_instance(**instance_args(content=b"new content"))
    assert stored.outcome is (StoreOutcome.REPLACED if existing else StoreOutcome.STORED)
    assert stored.path.read_bytes() == b"new content"
    assert stored.path in archive_files(archive)
