"""dicomnode.ops.health: the status files of live processes, and `dicomnode status` reporting
the queue, the disk, the models and the audit trail."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread

from dicomnode.cli import cli
from dicomnode.network.scp import ReceiverPolicy
from dicomnode.ops.health import StatusWriter, new_process_status, queue_snapshot, read_status_files
from storage import Store
from tests.support.peers import write_config
from tests.support.synth import SMALL


def test_status_files_of_live_processes_only(tmp_path: Path) -> None:
    status = new_process_status("worker", ae_title="DICOMNODE")
    writer = StatusWriter(tmp_path, status, lambda st: setattr(st, "jobs_done", 7),
                          interval_s=0.1)
    writer.start()
    try:
        (found,) = read_status_files(tmp_path)
        assert found.role == "worker" and found.jobs_done == 7 and found.pid == os.getpid()
        dead = new_process_status("serve")
        dead.pid, dead.updated_at = 2**22 + 12345, time.time()  # no such process
        (tmp_path / "status" / "serve-dead.json").write_text(json.dumps(dead.__dict__))
        assert [p.role for p in read_status_files(tmp_path)] == ["worker"]
    finally:
        writer.stop()
    assert read_status_files(tmp_path) == []  # removed on stop; the dead one is ignored


@pytest.fixture(scope="module")
def image(synth_study) -> Path:
    return sorted(synth_study(**SMALL).glob("*/s2d/*.dcm"))[0]


def test_status_command_reports_queue_disk_model_and_audit(tmp_path: Path, image: Path) -> None:
    config = write_config(tmp_path / "node.toml", data_dir=tmp_path / "data", port=1,
                          peers=[], models={"dbt": "none", "ffdm": "none",
                                            "s2d": str(tmp_path / "missing.pt")})
    store = Store(f"sqlite:///{tmp_path / 'data' / 'dicomnode.db'}", tmp_path / "data" /
                  "archive")
    try:
        from dicomnode.network.scp import archive_instance

        archive_instance(store, image.read_bytes(), ReceiverPolicy("DICOMNODE"),
                         calling_ae="PACS")
        store.force_ready(str(dcmread(image, stop_before_pixels=True).StudyInstanceUID))
        store.audit("association", calling_ae="PACS", called_ae="DICOMNODE",
                    peer="127.0.0.1", count=1, status="released")
        snap = queue_snapshot(store)
    finally:
        store.close()
    assert snap.jobs == {"queued": 1} and snap.oldest_queued_job is not None
    runner = CliRunner()
    result = runner.invoke(cli, ["--config", str(config), "status", "--audit", "5"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "DOWN: nothing listens on 127.0.0.1:1" in out
    assert "queued 1" in out and f"job {snap.oldest_queued_job}, queued" in out
    assert "GiB free" in out and "s2d: " in out and "no such checkpoint file" in out
    assert "dbt: none -> off" in out and "device" in out
    assert "association  calling=PACS" in out and "count=1" in out
    result = runner.invoke(cli, ["--config", str(config), "status", "--json"])
    data = json.loads(result.output)
    assert data["node"]["up"] is False and data["jobs"] == {"queued": 1}
    assert data["oldest_queued_seconds"] >= 0 and data["disk_free_bytes"] > 0
