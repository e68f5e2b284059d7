"""Store behaviour when a study is processed more than once (issue 15, items 5 and 7): the
attempt count survives new instances, and deliveries of a node that died resume when it
restarts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from storage import JobState, Store
from storage.errors import LeaseLost
from storage.records import DeliveryState
from tests.support import storage as support
from tests.support.storage import at, instance_args

db_url, make_store, store = support.db_url, support.make_store, support.store  # fixtures


def test_attempts_survive_instances_that_keep_arriving(
        make_store: Callable[..., Store]) -> None:
    """Each new instance used to reset a failed job's attempts: a study whose job fails
    (e.g. on one bad image) ran again after every arrival, sending partial results each time."""
    store = make_store(job_max_attempts=2)
    store.store_instance(**instance_args(), now=at(0))
    [job_id] = store.mark_ready(idle_seconds=30, now=at(30))
    assert store.claim_job("w1", now=at(31)).attempts == 1
    assert store.fail_job(job_id, "w1", "cannot build the SEG", retry=True,
                          now=at(32)) is JobState.QUEUED
    store.store_instance(**instance_args(number=2), now=at(33))  # receiving again
    job = store.get_job(job_id)
    assert job.state is JobState.RECEIVING and job.attempts == 1
    assert store.mark_ready(idle_seconds=30, now=at(63)) == [job_id]
    assert store.claim_job("w1", now=at(64)).attempts == 2
    assert store.fail_job(job_id, "w1", "cannot build the SEG", retry=True,
                          now=at(65)) is JobState.FAILED
    for number in range(3, 8):  # the rest of the study trickles in
        store.store_instance(**instance_args(number=number), now=at(60 * number))
        assert store.mark_ready(idle_seconds=30, now=at(60 * number + 31)) == []
    job = store.get_job(job_id)
    assert job.state is JobState.FAILED and job.attempts == 2
    assert store.claim_job("w1", now=at(1000)) is None
    assert len(store.study_instances(instance_args()["study_uid"])) == 7  # all stored
    # an admin retry gives it fresh attempts
    assert store.retry_job(job_id, now=at(1001)).job_requeued
    assert store.claim_job("w1", now=at(1002)).attempts == 1


def test_a_completed_run_starts_the_next_one_afresh(make_store: Callable[..., Store]) -> None:
    store = make_store(job_max_attempts=2)
    store.store_instance(**instance_args(), now=at(0))
    job_id = store.force_ready(instance_args()["study_uid"], now=at(0))
    for round_ in range(4):  # the study grows during every run
        job = store.claim_job("w1", now=at(100 * round_ + 1))
        assert job is not None and job.attempts == 1
        store.store_instance(**instance_args(number=round_ + 2), now=at(100 * round_ + 2))
        assert store.complete_job(job_id, "w1", now=at(100 * round_ + 3)) is \
            JobState.RECEIVING
        assert store.mark_ready(idle_seconds=30, now=at(100 * round_ + 40)) == [job_id]
    store.claim_job("w1", now=at(500))
    assert store.complete_job(job_id, "w1", now=at(501)) is JobState.DONE
    store.store_instance(**instance_args(number=9), now=at(502))  # after done: afresh
    job = store.get_job(job_id)
    assert job.state is JobState.RECEIVING and job.attempts == 0


def _result(store: Store, number: int, kind: str, job_id: int | None = None):
    study_uid = instance_args()["study_uid"]
    return store.store_result(
        encoded=f"{kind} {number}".encode(), sop_instance_uid=f"{study_uid}.900.{number}",
        sop_class_uid=Comprehensive3DSRStorage, study_uid=study_uid,
        series_uid=f"{study_uid}.900", transfer_syntax=ExplicitVRLittleEndian, kind=kind,
        job_id=job_id, now=at(0))


def test_superseded_results_are_remembered_unsent_ones_cancelled_sent_ones_rejected(
        store: Store) -> None:
    study_uid = instance_args()["study_uid"]
    store.store_instance(**instance_args(), now=at(0))
    sr, cad, kept = (_result(store, n, k) for n, k in ((1, "sr"), (2, "cad-sr"), (3, "sr")))
    for result in (sr, cad, kept):
        store.enqueue_delivery(result.id, "PACS", now=at(1))
    store.enqueue_delivery(sr.id, "ARCHIVE", now=at(1))
    by_result = {}
    for task in store.claim_due_deliveries("s1", limit=10, now=at(2)):
        by_result[(task.sop_instance_uid, task.destination)] = task
    # delivered: sr to PACS; being sent: cad to PACS; tried and refused: sr to ARCHIVE
    # (an attempt counts as reached: its answer may have been lost)
    store.record_delivery_attempt(by_result[(sr.sop_instance_uid, "PACS")].id, "s1", ok=True,
                                  now=at(3))
    archive_task = by_result[(sr.sop_instance_uid, "ARCHIVE")]
    store.record_delivery_attempt(archive_task.id, "s1", ok=False, status="refused", now=at(3))

    stale = store.stale_results(study_uid, keep=[kept.sop_instance_uid])
    assert [(s.result.id, s.reached) for s in stale] == [
        (sr.id, ("ARCHIVE", "PACS")), (cad.id, ("PACS",))]
    note = _result(store, 4, "rejection")
    assert store.supersede_results([sr.id, cad.id], rejection_id=note.id, now=at(4)) == \
        ["ARCHIVE", "PACS"]
    assert store.supersede_results([sr.id, cad.id], rejection_id=note.id, now=at(5)) == \
        ["ARCHIVE", "PACS"]  # idempotent: no second delivery of the note
    kinds = {r.sop_instance_uid: r.kind for r in store.study_results(study_uid)}
    assert kinds == {sr.sop_instance_uid: "superseded:sr", cad.sop_instance_uid:
                     "superseded:cad-sr", kept.sop_instance_uid: "sr",
                     note.sop_instance_uid: "rejection"}
    deliveries = {(d.result_id, d.destination): d for d in store.list_deliveries()}
    assert deliveries[(cad.id, "PACS")].state is DeliveryState.CANCELLED  # was sending
    assert deliveries[(sr.id, "ARCHIVE")].state is DeliveryState.CANCELLED
    assert deliveries[(sr.id, "PACS")].state is DeliveryState.DONE
    assert {k[1] for k in deliveries if k[0] == note.id} == {"ARCHIVE", "PACS"}
    assert store.stale_results(study_uid, keep=[kept.sop_instance_uid]) == []
    with pytest.raises(LeaseLost):  # the sender of the cad finds it cancelled
        store.record_delivery_attempt(by_result[(cad.sop_instance_uid, "PACS")].id, "s1",
                                      ok=True, now=at(6))
    # nothing superseded goes out again, even after the leases ran out
    due = store.claim_due_deliveries("s2", limit=10, now=at(1000))
    assert {t.sop_instance_uid for t in due} == {note.sop_instance_uid, kept.sop_instance_uid}


def test_expired_leases_of_dead_workers_are_due_at_once(store: Store) -> None:
    store.store_instance(**instance_args(), now=at(0))
    job_id = store.force_ready(instance_args()["study_uid"], now=at(0))
    store.claim_job("dead", lease_seconds=300, now=at(1))
    result = _result(store, 1, "sr", job_id)
    store.enqueue_delivery(result.id, "PACS", now=at(1))
    [task] = store.claim_due_deliveries("dead", lease_seconds=120, now=at(2))
    store.claim_due_deliveries("alive", lease_seconds=120, now=at(2))
    assert store.lease_owners() == {"dead"}
    assert store.claim_due_deliveries("new", now=at(10)) == []
    assert store.expire_leases(["dead", "nobody"], now=at(10)) == (1, 1)
    [again] = store.claim_due_deliveries("new", now=at(11))
    assert again.id == task.id and again.attempts == 2
    job = store.claim_job("new", now=at(11))
    assert job is not None and job.id == job_id and job.attempts == 2
    assert store.expire_leases([], now=at(12)) == (0, 0)
