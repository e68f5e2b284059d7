"""Storage commitment records: requested per delivery, settled by N-EVENT-REPORT, and
retention never removes a study whose delivered results are not committed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydicom.uid import Comprehensive3DSRStorage

from storage import Store
from storage.records import CommitmentState
from tests.support import storage as support
from tests.support.storage import at, instance_args

db_url, make_store, store = support.db_url, support.make_store, support.store

SR = Comprehensive3DSRStorage


def _delivered(store: Store, study: int, destination: str = "PACS") -> tuple[int, int, str]:
    """A study with one result delivered to ``destination``: (job id, delivery id, result UID)."""
    args = instance_args(study=study)
    store.store_instance(**args, now=at(0))
    job_id = store.force_ready(args["study_uid"], now=at(1))
    store.claim_job("w1", now=at(2))
    sop = f"{args['study_uid']}.900.1"
    result = store.store_result(encoded=b"SR", sop_instance_uid=sop, sop_class_uid=SR,
                                study_uid=args["study_uid"], series_uid=f"{args['study_uid']}.900",
                                transfer_syntax=support.EXPLICIT_LE, kind="sr", job_id=job_id,
                                now=at(2))
    store.complete_job(job_id, "w1", now=at(3))
    delivery_id = store.enqueue_delivery(result.id, destination, now=at(3))
    [task] = store.claim_due_deliveries("w1", now=at(4))
    store.record_delivery_attempt(task.id, "w1", ok=True, status=0, now=at(5))
    return job_id, delivery_id, sop


def test_report_commits_and_fails_per_instance(store: Store) -> None:
    job1, d1, sop1 = _delivered(store, 1)
    job2, d2, sop2 = _delivered(store, 2)
    store.record_commitment_request([d1, d2], "2.25.1001", requested=True, now=at(6))
    assert {c.state for c in store.commitments()} == {CommitmentState.PENDING}

    report = store.record_commitment_report("2.25.1001", committed=[sop1],
                                            failed={sop2: "0x0110", "2.25.999": "0x0112"},
                                            reporter_ae="PACS", now=at(7))
    assert (report.committed, report.failed, report.unknown) == (1, 1, 1)
    [c1] = store.commitments(job_id=job1)
    [c2] = store.commitments(job_id=job2)
    assert (c1.state, c1.result_sop_instance_uid, c1.reported_at) == \
        (CommitmentState.COMMITTED, sop1, at(7))
    assert (c2.state, c2.failure) == (CommitmentState.FAILED, "0x0110")
    assert store.commitment_counts() == {"committed": 1, "failed": 1}
    events = [(a.event, a.sop_instance_uid, a.status) for a in store.audit_trail()
              if a.event.startswith("commitment")]
    assert ("commitment", sop1, "committed") in events
    assert ("commitment", sop2, "failed") in events
    assert ("commitment_unknown", None, "ignored") in events


def test_report_from_another_ae_or_transaction_changes_nothing(store: Store) -> None:
    _, d1, sop1 = _delivered(store, 1)
    store.record_commitment_request([d1], "2.25.2002", requested=True, now=at(6))
    assert store.record_commitment_report("2.25.2002", committed=[sop1], failed={},
                                          reporter_ae="INTRUDER", now=at(7)).committed == 0
    assert store.record_commitment_report("2.25.3003", committed=[sop1], failed={},
                                          reporter_ae="PACS", now=at(7)).committed == 0
    assert [c.state for c in store.commitments()] == [CommitmentState.PENDING]


def test_request_again_starts_a_new_transaction(store: Store) -> None:
    _, d1, sop1 = _delivered(store, 1)
    store.record_commitment_request([d1], "2.25.4004", requested=False, failure="0x0122",
                                    now=at(6))
    [c] = store.commitments()
    assert (c.state, c.failure) == (CommitmentState.FAILED, "0x0122")
    store.record_commitment_request([d1], "2.25.4005", requested=True, now=at(8))
    [c] = store.commitments()
    assert (c.state, c.transaction_uid, c.failure) == (CommitmentState.PENDING, "2.25.4005", None)


@pytest.mark.parametrize("outcome", ["pending", "failed", "committed"])
def test_retention_keeps_sources_until_results_are_committed(store: Store, outcome: str) -> None:
    _, d1, sop1 = _delivered(store, 1)
    _delivered(store, 2)  # commitment never requested: retention as before
    store.record_commitment_request([d1], "2.25.5005", requested=True, now=at(6))
    if outcome != "pending":
        store.record_commitment_report(
            "2.25.5005", committed=[sop1] if outcome == "committed" else [],
            failed={} if outcome == "committed" else {sop1: "0x0110"}, now=at(7))
    report = store.apply_retention(timedelta(days=1), now=at(86_400 * 3))
    kept = outcome != "committed"
    assert report.studies == (1 if kept else 2)
    remaining = {c.result_sop_instance_uid for c in store.commitments()}
    assert remaining == ({sop1} if kept else set())
    if kept:
        assert store.study_instances(instance_args(study=1)["study_uid"])


def test_resend_uncommitted_makes_deliveries_due_again(store: Store) -> None:
    job1, d1, sop1 = _delivered(store, 1)
    job2, d2, sop2 = _delivered(store, 2)
    store.record_commitment_request([d1, d2], "2.25.6006", requested=True, now=at(6))
    store.record_commitment_report("2.25.6006", committed=[sop2], failed={sop1: "0x0110"},
                                   now=at(7))
    assert store.resend_uncommitted(job2, now=at(8)) == 0  # committed: nothing to do
    assert store.resend_uncommitted(job1, now=at(8)) == 1
    [task] = store.claim_due_deliveries("w2", now=at(9))
    assert (task.id, task.sop_instance_uid) == (d1, sop1)
    assert any(a.event == "commitment_resend" for a in store.audit_trail())
