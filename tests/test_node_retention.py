"""[storage] retention_days applied by the running node: `dicomnode worker` removes an old
finished study at start (files, rows; logged, audited) and keeps a recent study and an old
one whose job is still running; the schedule's interval, errors and metrics; two processes
applying retention on one database at once remove each study once."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from dicomnode.config import Config, ConfigError, load_config, validate
from dicomnode.ops import prometheus as metrics
from dicomnode.ops.retention import RetentionSchedule
from dicomnode.wiring import open_store
from storage import Store
from storage.errors import StudyNotFound
from storage.store import utcnow
from tests.support.peers import node_process, wait_for
from tests.support.storage import archive_files, instance_args

OLD = timedelta(days=10)


def write_config(tmp_path: Path, *, retention_days: int) -> Path:
    path = tmp_path / "dicomnode.toml"
    path.write_text("\n".join([
        "[node]", f'data_dir = "{(tmp_path / "data").as_posix()}"',
        "idle_seconds = 3600", "",   # the recent study stays "receiving": no job to run
        "[storage]", "min_free_mb = 0", f"retention_days = {retention_days}", "",
        "[worker]", "poll_seconds = 0.2", "",
        "[model]", 'device = "cpu"', ""]))
    return path


def three_studies(store: Store) -> dict[str, dict]:
    """old_done: finished long ago; old_running: received long ago, its job still running
    (leased by a worker on another machine); recent: received now."""
    studies = {"old_done": instance_args(study=1), "old_running": instance_args(study=2),
               "recent": instance_args(study=3)}
    finished_long_ago(store, studies["old_done"])
    store.store_instance(**studies["old_running"], now=utcnow() - OLD)
    store.store_instance(**studies["recent"])
    store.force_ready(studies["old_running"]["study_uid"])
    claimed = store.claim_job("otherhost:4242:abcdef", lease_seconds=3600)
    assert claimed.study_uid == studies["old_running"]["study_uid"]
    return studies


def finished_long_ago(store: Store, args: dict) -> None:
    """Received OLD ago, its job done (a study without a job is still receiving: kept)."""
    at = utcnow() - OLD
    store.store_instance(**args, now=at)
    job = store.force_ready(args["study_uid"], now=at)
    assert store.claim_job("w-old", now=at).id == job
    store.complete_job(job, "w-old", now=at)


def remaining_studies(archive: Path) -> set[str]:
    return {p.parent.parent.name for p in archive_files(archive)}


def test_worker_process_applies_retention_at_start(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, retention_days=7)
    config = load_config(config_path)
    with open_store(config) as store:
        studies = three_studies(store)
    archive = tmp_path / "data" / "archive"
    assert len(remaining_studies(archive)) == 3
    log = tmp_path / "worker.log"
    with open_store(config) as store, node_process(config_path, "worker", log_path=log):
        wait_for(lambda: any(a.event == "retention" for a in store.audit_trail()), 90,
                 "retention at worker start")
        trail = [a for a in store.audit_trail() if a.event == "retention"]
        assert [(a.study_uid, a.count) for a in trail] == \
            [(studies["old_done"]["study_uid"], 1)]
        with pytest.raises(StudyNotFound):
            store.study_instances(studies["old_done"]["study_uid"])
        assert store.queue_counts()["jobs"] == {"running": 1, "receiving": 1}
        # the rows go first, in one transaction, the files after: look once it has finished
        wait_for(lambda: "event=retention_applied" in log.read_text(), 30, "retention log")
        assert remaining_studies(archive) == {studies["old_running"]["study_uid"],
                                              studies["recent"]["study_uid"]}
    text = log.read_text()
    assert f"event=retention_removed study_uid={studies['old_done']['study_uid']}" in text
    assert "studies=1 instances=1 results=0" in text


def test_worker_process_without_retention_keeps_everything(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, retention_days=0)
    config = load_config(config_path)
    with open_store(config) as store:
        three_studies(store)
    log = tmp_path / "worker.log"
    with node_process(config_path, "worker", log_path=log):
        wait_for(lambda: "event=worker_started" in log.read_text(), 90, "worker start")
    assert len(remaining_studies(tmp_path / "data" / "archive")) == 3
    assert "retention" not in log.read_text()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_schedule_runs_at_start_then_each_interval_and_counts(tmp_path: Path) -> None:
    config = Config()
    config.node.data_dir = str(tmp_path / "data")
    config.storage.retention_days = 7
    config.storage.retention_interval_minutes = 60
    clock = FakeClock()
    runs = metrics.RETENTION_RUNS.value(outcome="ok")
    removed = metrics.RETENTION_STUDIES.value()
    freed = metrics.RETENTION_BYTES.value()
    with open_store(config) as store:
        schedule = RetentionSchedule(config, store, clock=clock)
        old = instance_args(study=1)
        finished_long_ago(store, old)
        report = schedule.run_due()
        assert (report.studies, report.study_uids) == (1, (old["study_uid"],))
        finished_long_ago(store, instance_args(study=2))
        clock.now += 59 * 60
        assert schedule.run_due() is None          # not due yet: the study stays
        assert store.study_instances(instance_args(study=2)["study_uid"])
        clock.now += 61
        assert schedule.run_due().studies == 1
    assert metrics.RETENTION_RUNS.value(outcome="ok") == runs + 2
    assert metrics.RETENTION_STUDIES.value() == removed + 2
    assert metrics.RETENTION_BYTES.value() == freed + len(old["encoded"]) * 2
    assert "dicomnode_retention_studies_removed_total" in metrics.render()


def test_schedule_is_off_without_retention_days_and_survives_errors(tmp_path: Path) -> None:
    config = Config()
    config.node.data_dir = str(tmp_path / "data")
    with open_store(config) as store:
        assert RetentionSchedule(config, store).run_due() is None

    class Broken:
        def apply_retention(self, max_age):
            raise RuntimeError("database went away")

    config.storage.retention_days = 1
    clock = FakeClock()
    errors = metrics.RETENTION_RUNS.value(outcome="error")
    schedule = RetentionSchedule(config, Broken(), clock=clock)
    assert schedule.run_due() is None
    assert metrics.RETENTION_RUNS.value(outcome="error") == errors + 1
    assert schedule.run_due() is None                # retried one interval later, not at once
    assert metrics.RETENTION_RUNS.value(outcome="error") == errors + 1
    clock.now += 3600
    schedule.run_due()
    assert metrics.RETENTION_RUNS.value(outcome="error") == errors + 2


@pytest.mark.parametrize("field,value", [("retention_days", -1),
                                         ("retention_interval_minutes", 0)])
def test_bad_retention_settings_are_refused(field: str, value: int) -> None:
    config = Config()
    setattr(config.storage, field, value)
    with pytest.raises(ConfigError, match="retention"):
        validate(config)


def test_two_processes_applying_retention_at_once_remove_each_study_once(
        tmp_path: Path) -> None:
    config = Config()
    config.node.data_dir = str(tmp_path / "data")
    config.storage.retention_days = 7
    with open_store(config) as store:
        for study in range(1, 6):
            for number in range(2, 4):
                store.store_instance(**instance_args(study=study, number=number),
                                     now=utcnow() - OLD)
            finished_long_ago(store, instance_args(study=study))
    reports, errors = [], []
    barrier = threading.Barrier(2)

    def apply() -> None:
        with open_store(config) as own:
            barrier.wait()
            try:
                reports.append(own.apply_retention(timedelta(days=7)))
            except Exception as exc:  # noqa: BLE001 - a busy database is an allowed outcome
                errors.append(exc)

    threads = [threading.Thread(target=apply) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with open_store(config) as store:
        trail = [a for a in store.audit_trail() if a.event == "retention"]
        assert sorted(a.study_uid for a in trail) == \
            sorted(instance_args(study=s)["study_uid"] for s in range(1, 6))
    assert sum(r.studies for r in reports) == 5
    assert sum(r.instances for r in reports) == 15
    assert all(type(e).__name__ == "DatabaseBusy" for e in errors), errors
    assert not archive_files(tmp_path / "data" / "archive")
