"""Store behaviour on SQLite and PostgreSQL: re-sends, study readiness, the job lifecycle,
deliveries with backoff and dead letters, retention and the audit trail."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from storage import JobState, Store, StoreOutcome
from storage.errors import InvalidState, InvalidUID, LeaseLost, StudyNotFound
from storage.records import DeliveryState
from tests.support import storage as support
from tests.support.storage import T0, archive_files, at, instance_args

db_url, make_store, store = support.db_url, support.make_store, support.store  # fixtures

SR = Comprehensive3DSRStorage


def test_store_instance_is_indexed_and_archived(store: Store, tmp_path: Path) -> None:
    args = instance_args()
    stored = store.store_instance(**args, now=T0)
    assert stored.outcome is StoreOutcome.STORED
    assert stored.path == tmp_path / "archive" / args["study_uid"] / args["series_uid"] / \
        f"{args['sop_instance_uid']}.dcm"
    assert stored.path.read_bytes() == args["encoded"]
    [record] = store.study_instances(args["study_uid"])
    assert (record.sop_instance_uid, record.size, record.sha256) == \
        (args["sop_instance_uid"], len(args["encoded"]), stored.sha256)
    assert (record.modality, record.laterality, record.view, record.calling_ae) == \
        ("MG", "L", "CC", "PACS")
    assert record.received_at == T0
    assert not list((tmp_path / "archive" / ".tmp").iterdir())


def test_file_objects_are_streamed(store: Store) -> None:
    payload = bytes(range(256)) * 9000  # > one 1 MiB chunk
    stored = store.store_instance(**{**instance_args(), "encoded": io.BytesIO(payload)})
    assert stored.size == len(payload) and stored.path.read_bytes() == payload


def test_buffers_are_written_in_order_and_hashed_as_one(store: Store) -> None:
    import hashlib

    meta, body = b"\0" * 128 + b"DICM", bytes(range(256)) * 40000  # body hashed in parallel
    stored = store.store_instance(**{**instance_args(), "encoded": [meta, memoryview(body)]})
    assert stored.path.read_bytes() == meta + body
    assert stored.size == len(meta) + len(body)
    assert stored.sha256 == hashlib.sha256(meta + body).hexdigest()
    # the same instance sent as one buffer is recognised as identical
    again = store.store_instance(**{**instance_args(), "encoded": meta + body})
    assert again.outcome is StoreOutcome.DUPLICATE


def test_a_received_file_is_taken_over_not_copied(store: Store, tmp_path: Path) -> None:
    import hashlib

    payload = bytes(range(256)) * 40000
    received = tmp_path / "received.dcm"  # as written by the network layer
    received.write_bytes(payload)
    inode = received.stat().st_ino
    stored = store.store_instance(**{**instance_args(), "encoded": received})
    assert not received.exists()
    assert stored.path.stat().st_ino == inode  # renamed into the archive, same file
    assert stored.sha256 == hashlib.sha256(payload).hexdigest() and stored.size == len(payload)


def test_identical_resend_is_not_stored_twice(store: Store, tmp_path: Path) -> None:
    first = store.store_instance(**instance_args(), now=at(0))
    again = store.store_instance(**instance_args(), now=at(5))
    assert again.outcome is StoreOutcome.DUPLICATE
    assert again.path == first.path
    assert archive_files(tmp_path / "archive") == [first.path]
    assert len(store.study_instances(instance_args()["study_uid"])) == 1
    assert not list((tmp_path / "archive" / ".tmp").iterdir())


def test_changed_resend_replaces_and_queues_study_again(store: Store, tmp_path: Path) -> None:
    study = instance_args()["study_uid"]
    store.store_instance(**instance_args(content=b"version one"), now=at(0))
    [job_id] = store.mark_ready(idle_seconds=30, now=at(31))
    job = store.claim_job("w1", now=at(32))
    assert job is not None and job.id == job_id
    assert store.complete_job(job.id, "w1", now=at(40)) is JobState.DONE

    replaced = store.store_instance(**instance_args(content=b"version two"), now=at(50))
    assert replaced.outcome is StoreOutcome.REPLACED
    assert archive_files(tmp_path / "archive") == [replaced.path]
    assert replaced.path.read_bytes() == b"version two"
    [record] = store.study_instances(study)
    assert record.path == replaced.path and record.sha256 == replaced.sha256
    assert store.get_job(job_id).state is JobState.RECEIVING
    assert store.mark_ready(idle_seconds=30, now=at(81)) == [job_id]

    # Back to the first content: a third file name, the second one removed.
    back = store.store_instance(**instance_args(content=b"version one"), now=at(90))
    assert back.outcome is StoreOutcome.REPLACED
    assert archive_files(tmp_path / "archive") == [back.path]


def test_keep_first_policy(make_store: Callable[..., Store]) -> None:
    store = make_store(on_resend="keep_first")
    first = store.store_instance(**instance_args(content=b"first"), now=at(0))
    [job_id] = store.mark_ready(idle_seconds=10, now=at(10))
    kept = store.store_instance(**instance_args(content=b"second"), now=at(20))
    assert kept.outcome is StoreOutcome.KEPT_FIRST
    assert (kept.path, kept.sha256, kept.size) == (first.path, first.sha256, first.size)
    assert first.path.read_bytes() == b"first"
    assert store.study_instances(instance_args()["study_uid"])[0].sha256 == first.sha256
    assert store.get_job(job_id).state is JobState.QUEUED


def test_study_ready_after_idle_time_per_calling_ae(store: Store) -> None:
    store.store_instance(**instance_args(study=1, calling_ae="SLOWPACS"), now=at(0))
    store.store_instance(**instance_args(study=2, calling_ae="PACS"), now=at(0))
    store.store_instance(**instance_args(study=2, number=2, calling_ae="PACS"), now=at(20))
    overrides = {"SLOWPACS": 120.0}
    assert store.mark_ready(idle_seconds=30, idle_seconds_by_ae=overrides, now=at(40)) == []
    [fast] = store.mark_ready(idle_seconds=30, idle_seconds_by_ae=overrides, now=at(50))
    assert store.get_job(fast).study_uid == instance_args(study=2)["study_uid"]
    assert store.mark_ready(idle_seconds=30, idle_seconds_by_ae=overrides, now=at(100)) == []
    [slow] = store.mark_ready(idle_seconds=30, idle_seconds_by_ae=overrides, now=at(120))
    assert store.get_job(slow).calling_ae == "SLOWPACS"


def test_held_study_waits_for_its_idle_time_after_the_last_hold(store: Store) -> None:
    held, queued_by_hand, other = (instance_args(study=n)["study_uid"] for n in (1, 2, 3))
    for n in (1, 2, 3):
        store.store_instance(**instance_args(study=n), now=at(0))
    store.force_ready(queued_by_hand, now=at(1))
    # An association still sending study 1 holds it at 25 s; study 3 was not named.
    assert store.hold_receiving([held, queued_by_hand, "1.2.3.999"], now=at(25)) == 1
    [first] = store.mark_ready(idle_seconds=30, now=at(40))
    assert store.get_job(first).study_uid == other
    assert store.get_job(store.claim_job("w1", now=at(41)).id).study_uid == queued_by_hand
    assert store.mark_ready(idle_seconds=30, now=at(54)) == []
    [late] = store.mark_ready(idle_seconds=30, now=at(55))
    assert store.get_job(late).study_uid == held
    assert store.hold_receiving([], now=at(60)) == 0


def test_force_ready_and_instances_arriving_while_running(store: Store) -> None:
    study = instance_args()["study_uid"]
    store.store_instance(**instance_args(), now=at(0))
    job_id = store.force_ready(study, now=at(1))
    assert store.get_job(job_id).state is JobState.QUEUED
    job = store.claim_job("w1", now=at(2))
    assert job is not None and job.attempts == 1
    store.store_instance(**instance_args(number=2), now=at(3))   # arrives mid-run
    assert store.get_job(job_id).rerun
    assert store.complete_job(job_id, "w1", now=at(4)) is JobState.RECEIVING
    assert store.mark_ready(idle_seconds=30, now=at(33)) == [job_id]
    with pytest.raises(StudyNotFound):
        store.force_ready("1.2.3.999")


def test_lease_renewal_expiry_and_takeover(store: Store) -> None:
    store.store_instance(**instance_args(), now=at(0))
    store.force_ready(instance_args()["study_uid"], now=at(0))
    job = store.claim_job("w1", lease_seconds=60, now=at(1))
    assert job is not None and job.lease_owner == "w1"
    assert store.claim_job("w2", now=at(30)) is None             # leased
    assert store.renew_lease(job.id, "w1", lease_seconds=60, now=at(50)) == at(110)
    assert store.claim_job("w2", now=at(100)) is None            # renewed
    taken = store.claim_job("w2", now=at(111))                   # w1 went silent
    assert taken is not None and taken.id == job.id and taken.attempts == 2
    with pytest.raises(LeaseLost):
        store.renew_lease(job.id, "w1", now=at(112))
    with pytest.raises(LeaseLost):
        store.complete_job(job.id, "w1", now=at(112))
    assert store.complete_job(job.id, "w2", now=at(113)) is JobState.DONE


def test_fail_retry_and_attempt_limit(make_store: Callable[..., Store]) -> None:
    store = make_store(job_max_attempts=2)
    store.store_instance(**instance_args(), now=at(0))
    job_id = store.force_ready(instance_args()["study_uid"], now=at(0))
    store.claim_job("w1", now=at(1))
    assert store.fail_job(job_id, "w1", "model crashed", retry=True, now=at(2)) is \
        JobState.QUEUED
    store.claim_job("w1", now=at(3))
    assert store.fail_job(job_id, "w1", "model crashed", retry=True, now=at(4)) is \
        JobState.FAILED
    assert store.claim_job("w1", now=at(5)) is None
    job = store.get_job(job_id)
    assert job.last_error == "model crashed" and job.attempts == 2
    # A worker that dies on the last attempt: the job fails instead of running forever.
    assert store.retry_job(job_id, now=at(6)).job_requeued
    store.claim_job("w1", lease_seconds=10, now=at(7))
    store.claim_job("w2", lease_seconds=10, now=at(18))
    assert store.claim_job("w3", now=at(40)) is None
    job = store.get_job(job_id)
    assert job.state is JobState.FAILED and "lease expired" in (job.last_error or "")


def test_cancel_and_admin_retry(store: Store) -> None:
    store.store_instance(**instance_args(), now=at(0))
    job_id = store.force_ready(instance_args()["study_uid"], now=at(0))
    store.claim_job("w1", now=at(1))
    assert store.cancel_job(job_id, now=at(2)).state is JobState.CANCELLED
    with pytest.raises(LeaseLost):
        store.renew_lease(job_id, "w1", now=at(3))
    with pytest.raises(InvalidState):
        store.cancel_job(job_id)
    store.store_instance(**instance_args(number=2), now=at(4))   # does not revive it
    assert store.get_job(job_id).state is JobState.CANCELLED
    outcome = store.retry_job(job_id, now=at(5))
    assert outcome.job_requeued and outcome.deliveries_requeued == 0
    assert store.get_job(job_id).state is JobState.QUEUED
    with pytest.raises(InvalidState):
        store.retry_job(job_id)


def _result(store: Store, job_id: int | None = None, number: int = 1):
    study_uid = instance_args()["study_uid"]
    return store.store_result(
        encoded=b"SR " + str(number).encode(), sop_instance_uid=f"{study_uid}.900.{number}",
        sop_class_uid=SR, study_uid=study_uid, series_uid=f"{study_uid}.900",
        transfer_syntax=ExplicitVRLittleEndian, kind="sr", job_id=job_id, now=at(0))


def test_deliveries_back_off_and_dead_letter(make_store: Callable[..., Store]) -> None:
    store = make_store(delivery_max_attempts=3, backoff_initial_s=10, backoff_max_s=15,
                       rng=random.Random(7))
    store.store_instance(**instance_args(), now=at(0))
    result = _result(store)
    delivery_id = store.enqueue_delivery(result.id, "PACS", now=at(0))
    assert store.enqueue_delivery(result.id, "PACS", now=at(0)) == delivery_id  # idempotent

    [task] = store.claim_due_deliveries("s1", now=at(0))
    assert (task.id, task.attempts, task.path) == (delivery_id, 1, result.path)
    assert store.claim_due_deliveries("s2", now=at(1)) == []     # leased
    first = store.record_delivery_attempt(task.id, "s1", ok=False, status=0xA700,
                                          error="out of resources", now=at(1))
    assert first.state is DeliveryState.PENDING
    assert at(1 + 5) <= first.next_attempt_at <= at(1 + 10)      # [base/2, base], base 10 s
    assert store.claim_due_deliveries("s1", now=first.next_attempt_at - timedelta(seconds=1)) \
        == []

    [task] = store.claim_due_deliveries("s1", now=first.next_attempt_at)
    second = store.record_delivery_attempt(task.id, "s1", ok=False, status="refused",
                                           now=first.next_attempt_at)
    delay = (second.next_attempt_at - first.next_attempt_at).total_seconds()
    assert 7.5 <= delay <= 15                                      # doubled, capped at 15

    [task] = store.claim_due_deliveries("s1", now=second.next_attempt_at)
    third = store.record_delivery_attempt(task.id, "s1", ok=False, status="refused",
                                          now=second.next_attempt_at)
    assert third.state is DeliveryState.DEAD and third.next_attempt_at is None
    assert store.claim_due_deliveries("s1", now=at(10_000)) == []

    assert store.retry_dead_letters(now=at(10_000)) == 1
    [task] = store.claim_due_deliveries("s1", now=at(10_000))
    done = store.record_delivery_attempt(task.id, "s1", ok=True, status=0, now=at(10_001))
    assert done.state is DeliveryState.DONE
    trail = [a for a in store.audit_trail() if a.event == "delivery"]
    assert [a.status for a in trail] == ["0xA700", "refused", "refused", "0x0000"]
    assert all(a.called_ae == "PACS" and a.sop_instance_uid == result.sop_instance_uid
               for a in trail)


def test_dead_sender_loses_delivery_lease_and_down_destination_does_not_block(
        make_store: Callable[..., Store]) -> None:
    store = make_store(backoff_initial_s=100)
    store.store_instance(**instance_args(), now=at(0))
    down = store.enqueue_delivery(_result(store, number=1).id, "DOWN", now=at(0))
    store.enqueue_delivery(_result(store, number=2).id, "UP", now=at(0))
    tasks = store.claim_due_deliveries("s1", limit=1, lease_seconds=30, now=at(0))
    assert [t.id for t in tasks] == [down]
    store.record_delivery_attempt(down, "s1", ok=False, status="timeout", now=at(1))
    [up] = store.claim_due_deliveries("s1", lease_seconds=30, now=at(2))
    assert up.destination == "UP"
    # s1 dies holding "UP": after its lease another sender gets it.
    assert store.claim_due_deliveries("s2", now=at(20)) == []
    [again] = store.claim_due_deliveries("s2", now=at(40))
    assert again.id == up.id and again.attempts == 2
    with pytest.raises(LeaseLost):
        store.record_delivery_attempt(up.id, "s1", ok=True, now=at(41))


def test_job_retry_revives_dead_deliveries(make_store: Callable[..., Store]) -> None:
    store = make_store(delivery_max_attempts=1)
    store.store_instance(**instance_args(), now=at(0))
    job_id = store.force_ready(instance_args()["study_uid"], now=at(0))
    store.claim_job("w1", now=at(0))
    result = _result(store, job_id=job_id)
    store.complete_job(job_id, "w1", now=at(1))
    store.enqueue_delivery(result.id, "PACS", now=at(1))
    [task] = store.claim_due_deliveries("s1", now=at(1))
    store.record_delivery_attempt(task.id, "s1", ok=False, status="refused", now=at(2))
    detail = store.job_detail(job_id)
    assert [d.state for d in detail.deliveries] == [DeliveryState.DEAD]
    outcome = store.retry_job(job_id, now=at(3))
    assert not outcome.job_requeued and outcome.deliveries_requeued == 1
    assert [t.id for t in store.claim_due_deliveries("s1", now=at(3))] == [task.id]


def test_results_are_idempotent(store: Store) -> None:
    store.store_instance(**instance_args(), now=at(0))
    first = _result(store)
    assert _result(store) == first
    assert store.study_results(instance_args()["study_uid"]) == [first]
    with pytest.raises(StudyNotFound):
        store.store_result(encoded=b"x", sop_instance_uid="1.2.3.4", sop_class_uid=SR,
                           study_uid="1.2.3", series_uid="1.2.3.9", transfer_syntax="1.2",
                           kind="sr")


def test_retention_keeps_unfinished_work(store: Store, tmp_path: Path) -> None:
    old_done = instance_args(study=1)
    old_queued = instance_args(study=2)
    recent = instance_args(study=3)
    store.store_instance(**old_done, now=at(0))
    store.store_instance(**old_queued, now=at(0))
    store.store_instance(**recent, now=at(86_400 * 9))
    job_id = store.force_ready(old_done["study_uid"], now=at(1))
    store.claim_job("w1", now=at(2))
    result = _result(store, job_id=job_id)   # result of study 1
    store.complete_job(job_id, "w1", now=at(3))
    store.force_ready(old_queued["study_uid"], now=at(4))
    store.audit("association", calling_ae="PACS", called_ae="DICOMNODE", peer="10.0.0.1",
                study_uid=old_done["study_uid"], count=1, status="0x0000", now=at(0))

    report = store.apply_retention(timedelta(days=7), now=at(86_400 * 10))
    assert (report.studies, report.instances, report.results) == (1, 1, 1)
    assert report.bytes_freed == len(old_done["encoded"]) + result.size
    assert not result.path.exists()
    remaining = {p.parent.parent.name for p in archive_files(tmp_path / "archive")}
    assert remaining == {old_queued["study_uid"], recent["study_uid"]}
    with pytest.raises(StudyNotFound):
        store.study_instances(old_done["study_uid"])
    assert report.study_uids == (old_done["study_uid"],)
    trail = store.audit_trail()   # the trail survives, and records what retention removed
    assert [(a.event, a.study_uid) for a in trail] == [
        ("association", old_done["study_uid"]), ("retention", old_done["study_uid"])]
    assert (trail[1].count, trail[1].at) == (1, at(86_400 * 10))
    assert store.queue_counts()["jobs"] == {"queued": 1, "receiving": 1}


def test_odd_descriptive_attributes_are_clipped_not_fatal(store: Store) -> None:
    args = {**instance_args(), "view": "cranio-caudal exaggerated laterally " * 4,
            "laterality": "LEFT BREAST ONLY!!", "calling_ae": " PACS "}
    store.store_instance(**args)
    [record] = store.study_instances(args["study_uid"])
    assert len(record.view or "") == 64 and len(record.laterality or "") == 16
    assert record.calling_ae == "PACS"


def test_config_glue_maps_fields_to_store_arguments(tmp_path: Path) -> None:
    from dicomnode.config import Config, PeerConfig
    from dicomnode.wiring import idle_seconds_by_ae, open_store, retention_age

    config = Config()
    config.node.data_dir = str(tmp_path / "data")
    config.storage.on_resend = "keep_first"
    config.storage.min_free_mb = 7
    config.delivery.max_attempts = 4
    config.peers = [PeerConfig("SLOW"), PeerConfig("FAST")]
    config.peers[0].idle_seconds = 90.0
    with open_store(config) as opened:
        assert opened.on_resend.value == "keep_first"
        assert opened.archive.min_free_bytes == 7 * 2**20
        assert opened.delivery_max_attempts == 4
        assert opened.archive.root == tmp_path / "data" / "archive"
    assert (tmp_path / "data" / "dicomnode.db").is_file()
    assert idle_seconds_by_ae(config) == {"SLOW": 90.0}
    assert retention_age(config) is None
    config.storage.retention_days = 30
    assert retention_age(config) == timedelta(days=30)


def test_a_staged_result_is_stored_without_a_copy_or_discarded(store: Store) -> None:
    """stage_result writes a result ahead of store_result (a worker's results thread):
    stored, the same file moves into the archive; discarded, nothing is left; refused by
    store_result, it is gone too."""
    store.store_instance(**instance_args(), now=at(0))
    study_uid = instance_args()["study_uid"]
    temp_area = store.archive.tmp_dir
    args = dict(sop_class_uid=SR, study_uid=study_uid, series_uid=f"{study_uid}.901",
                transfer_syntax=ExplicitVRLittleEndian, kind="sr", now=at(0))
    staged = store.stage_result([b"SR ", b"in parts"])
    assert staged.path.parent == temp_area and staged.path.read_bytes() == b"SR in parts"
    inode = staged.path.stat().st_ino
    result = store.store_result(encoded=staged, sop_instance_uid=f"{study_uid}.901.1", **args)
    assert result.path.read_bytes() == b"SR in parts" and result.path.stat().st_ino == inode
    assert result.sha256 == staged.sha256 and list(temp_area.iterdir()) == []

    dropped = store.stage_result(b"never stored")
    store.discard_staged(dropped)
    assert list(temp_area.iterdir()) == []

    refused = store.stage_result(b"SR of a study never received")
    with pytest.raises(StudyNotFound):
        store.store_result(encoded=refused, sop_instance_uid="1.2.3.4", **{
            **args, "study_uid": "1.2.3"})
    assert list(temp_area.iterdir()) == []
    badly_named = store.stage_result(b"SR under a malformed UID")
    with pytest.raises(InvalidUID):
        store.store_result(encoded=badly_named, sop_instance_uid="1.02.x", **args)
    assert list(temp_area.iterdir()) == []


def test_store_result_takes_a_file_written_elsewhere(store: Store, tmp_path: Path) -> None:
    """store_result accepts what store_instance does (Encoded), a path included: the file
    is taken over, not read as a byte stream."""
    store.store_instance(**instance_args(), now=at(0))
    study_uid = instance_args()["study_uid"]
    written = tmp_path / "elsewhere.dcm"
    written.write_bytes(b"SR from a file")
    result = store.store_result(
        encoded=written, sop_instance_uid=f"{study_uid}.900.1", sop_class_uid=SR,
        study_uid=study_uid, series_uid=f"{study_uid}.900",
        transfer_syntax=ExplicitVRLittleEndian, kind="sr", now=at(0))
    assert result.path.read_bytes() == b"SR from a file"
    assert result.size == len(b"SR from a file")
