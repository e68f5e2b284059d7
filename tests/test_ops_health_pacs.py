"""Storage commitment, retrieve and export in `dicomnode status` and the Prometheus
metrics (read from the store at scrape time, so the CLI commands' runs show too)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from dicomnode.cli import cli
from dicomnode.ops import prometheus as metrics
from dicomnode.ops.health import queue_collector
from storage import Store
from tests.support.peers import write_config
from tests.support.storage import instance_args

SR = Comprehensive3DSRStorage


def _store_with_activity(data: Path) -> None:
    store = Store(f"sqlite:///{data / 'dicomnode.db'}", data / "archive")
    try:
        deliveries = []
        for study in (1, 2, 3):
            args = instance_args(study=study)
            store.store_instance(**args)
            job = store.force_ready(args["study_uid"])
            store.claim_job("w")
            result = store.store_result(
                encoded=b"SR", sop_instance_uid=f"{args['study_uid']}.9", sop_class_uid=SR,
                study_uid=args["study_uid"], series_uid=f"{args['study_uid']}.8",
                transfer_syntax=ExplicitVRLittleEndian, kind="sr", job_id=job)
            store.complete_job(job, "w")
            deliveries.append((store.enqueue_delivery(result.id, "PACS"),
                               f"{args['study_uid']}.9"))
        store.record_commitment_request([d for d, _ in deliveries], "2.25.77", requested=True)
        store.record_commitment_report("2.25.77", committed=[deliveries[0][1]],
                                       failed={deliveries[1][1]: "0x0110"})
        store.audit("retrieve", called_ae="PACS", count=3, status="problems",
                    detail="retrieved=2 complete=1 missing=1 incomplete=0 error=0")
        store.audit("export", count=2, status="ok",
                    detail="exported=2 missing=0 images=8 results=4 refused=0")
    finally:
        store.close()


def test_status_and_metrics_show_commitment_retrieve_and_export(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _store_with_activity(data)
    config = write_config(tmp_path / "node.toml", data_dir=data, port=1, peers=[],
                          models={"dbt": "none", "ffdm": "none", "s2d": "none"})
    result = CliRunner().invoke(cli, ["--config", str(config), "status"])
    assert result.exit_code == 0, result.output
    assert "pending 1, committed 1, failed 1" in result.output
    assert "oldest pending" in result.output and "of PACS" in result.output
    assert "not committed" in result.output and "0x0110" in result.output
    assert "last retrieve" in result.output and "missing=1" in result.output
    assert "last export" in result.output and "exported=2" in result.output
    result = CliRunner().invoke(cli, ["--config", str(config), "status", "--json"])
    payload = json.loads(result.output)
    assert payload["commitments"] == {"committed": 1, "failed": 1, "pending": 1}
    assert payload["oldest_pending_commitment"]
    assert payload["last_retrieve"]["status"] == "problems"

    store = Store(f"sqlite:///{data / 'dicomnode.db'}", data / "archive")
    try:
        collect = queue_collector(store)
        metrics.REGISTRY.add_collector(collect)
        try:
            text = metrics.render()
        finally:
            metrics.REGISTRY.remove_collector(collect)
    finally:
        store.close()
    assert 'dicomnode_commitments{state="failed"} 1' in text
    assert 'dicomnode_commitments{state="committed"} 1' in text
    assert 'dicomnode_commitments{state="pending"} 1' in text
    assert 'dicomnode_last_run_studies{activity="retrieve",outcome="missing"} 1' in text
    assert 'dicomnode_last_run_studies{activity="export",outcome="exported"} 2' in text
    assert 'dicomnode_last_run_timestamp_seconds{activity="export"}' in text
