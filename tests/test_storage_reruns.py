"""Store behaviour when a study is processed more than once (issue 15, items 5 and 7): the
attempt count survives new instances, and deliveries of a node that died resume when it
restarts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from storage import JobState, Store
from tests import storage_support as support
from tests.storage_support import T0, instance_args

db_url, make_store, store = support.db_url, support.make_store, support.store  # fixtures


def at(seconds: float):
    return T0 + timedelta(seconds=seconds)


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
