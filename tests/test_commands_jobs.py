"""`dicomnode jobs list|show|retry|cancel` and `dicomnode db upgrade|current` on SQLite and
PostgreSQL, through click's CliRunner with --config pointing at a TOML file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from dicomnode.cli import cli
from dicomnode.wiring import StorageFailure
from storage import Store, migrate
from storage.testing import scratch_schema
from tests.support import storage as support
from tests.support.storage import ENGINES, instance_args

db_url = support.db_url  # fixture: schema at head


def write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "dicomnode.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[database]\nurl = "{url}"\n')
    return path


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=True)


@pytest.fixture(params=ENGINES)
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema yet."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh' / 'dicomnode.db'}"
    else:
        with scratch_schema(os.environ["DICOMNODE_TEST_POSTGRES_URL"], "dicomnode_test") as url:
            yield url


def test_db_upgrade_creates_the_schema_once(fresh_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, fresh_url)
    first = run(config, "db", "upgrade")
    assert first.exit_code == 0, first.output
    head = migrate.head_revision()
    assert f"upgraded from empty to {head}" in first.output
    again = run(config, "db", "upgrade")
    assert again.exit_code == 0 and f"already at revision {head}" in again.output
    current = run(config, "db", "current")
    assert current.exit_code == 0 and f"revision {head}, head {head} (up to date)" \
        in current.output


def _populate(url: str, tmp_path: Path) -> tuple[int, int]:
    """A failed job whose result's delivery is dead, and a queued job; their ids."""
    with Store(url, tmp_path / "data" / "archive", delivery_max_attempts=1) as store:
        failed_args, queued_args = instance_args(study=1), instance_args(study=2)
        store.store_instance(**failed_args)
        store.store_instance(**queued_args)
        failed = store.force_ready(failed_args["study_uid"])
        queued = store.force_ready(queued_args["study_uid"])
        assert store.claim_job("w1").id == failed
        study = failed_args["study_uid"]
        result = store.store_result(encoded=b"SR", sop_instance_uid=f"{study}.9.1",
                                    sop_class_uid=Comprehensive3DSRStorage,
                                    study_uid=study, series_uid=f"{study}.9",
                                    transfer_syntax=ExplicitVRLittleEndian, kind="sr",
                                    job_id=failed)
        store.fail_job(failed, "w1", "CUDA out of memory\ntraceback...", retry=False)
        store.enqueue_delivery(result.id, "PACS")
        [task] = store.claim_due_deliveries("s1")
        store.record_delivery_attempt(task.id, "s1", ok=False, status=0xA700)
        return failed, queued


def test_jobs_list_show_retry_cancel(db_url: str, tmp_path: Path) -> None:
    failed, queued = _populate(db_url, tmp_path)
    config = write_config(tmp_path, db_url)

    listed = run(config, "jobs", "list")
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "ATTEMPTS", "STUDY"]
    assert {line.split()[1] for line in lines[1:]} == {"failed", "queued"}
    assert "CUDA out of memory" in listed.output and "traceback" not in listed.output

    only_failed = run(config, "jobs", "list", "--state", "failed")
    assert [line.split()[0] for line in only_failed.output.splitlines()[1:]] == [str(failed)]
    assert "no jobs in state done" in run(config, "jobs", "list", "--state", "done").output

    shown = run(config, "jobs", "show", str(failed))
    assert shown.exit_code == 0, shown.output
    assert instance_args(study=1)["study_uid"] in shown.output
    assert "failed" in shown.output and "1 in 1 series" in shown.output
    assert "PACS" in shown.output and "dead" in shown.output and "0xA700" in shown.output

    retried = run(config, "jobs", "retry", str(failed))
    assert retried.exit_code == 0, retried.output
    assert f"job {failed} queued again" in retried.output
    assert "1 dead-lettered deliveries due again" in retried.output

    cancelled = run(config, "jobs", "cancel", str(queued))
    assert cancelled.exit_code == 0 and f"job {queued}" in cancelled.output
    assert "cancelled" in run(config, "jobs", "show", str(queued)).output

    again = run(config, "jobs", "cancel", str(queued))
    assert isinstance(again.exception, StorageFailure) and again.exit_code == 1
    assert "already cancelled" in str(again.exception)
    missing = run(config, "jobs", "show", "999")
    assert isinstance(missing.exception, StorageFailure)
    assert "job 999 does not exist" in str(missing.exception)


def _dicomnode(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", "--config", str(config),
                           *args], capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line_with_exit_status(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'data' / 'dicomnode.db'}")
    missing = _dicomnode(config, "jobs", "show", "42")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "error: job 42 does not exist; `dicomnode jobs list` shows the jobs there are"]

    down = write_config(tmp_path, "postgresql+psycopg://u:pw@127.0.0.1:1/db")
    unreachable = _dicomnode(down, "jobs", "list")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("error: cannot connect to database")
    assert ":pw@" not in unreachable.stderr

    bad = write_config(tmp_path, "nonsense")
    assert _dicomnode(bad, "db", "upgrade").returncode == 2
