"""Operating the node: the metrics registry, the HTTP health/metrics endpoint, status files,
`dicomnode status`, and logs that carry UIDs but never patient names or IDs."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread

from dicomnode import metrics
from dicomnode.cli import cli
from dicomnode.errors import ConfigError
from dicomnode.health import (
    StatusWriter,
    new_process_status,
    queue_snapshot,
    read_status_files,
)
from dicomnode.http import HealthServer, parse_listen
from dicomnode.scp import AllowedPeer, ReceiverPolicy, StorageSCP
from storage import Store
from tests.support.ops import scu
from tests.support.peers import write_config
from tests.support.synth import SMALL


def test_counter_and_histogram_render_prometheus_text() -> None:
    registry = metrics.Registry()
    requests = registry.counter("x_requests_total", "Requests.", ["code"])
    latency = registry.histogram("x_seconds", "Latency.", ["stage"], buckets=(0.1, 1.0))
    plain = registry.counter("x_plain_total", 'A "quoted" help.')
    requests.inc(code="200")
    requests.inc(2, code='5"0\n0')
    for value in (0.05, 0.5, 5.0):
        latency.observe(value, stage="model")
    text = registry.render()
    assert "# TYPE x_requests_total counter" in text
    assert 'x_requests_total{code="200"} 1' in text
    assert 'x_requests_total{code="5\\"0\\n0"} 2' in text
    assert 'x_seconds_bucket{stage="model",le="0.1"} 1' in text
    assert 'x_seconds_bucket{stage="model",le="1"} 2' in text
    assert 'x_seconds_bucket{stage="model",le="+Inf"} 3' in text
    assert 'x_seconds_sum{stage="model"} 5.55' in text
    assert 'x_seconds_count{stage="model"} 3' in text
    assert "x_plain_total 0" in text  # an unlabelled counter exists before it counts
    assert plain.value() == 0
    with pytest.raises(ValueError):
        requests.inc(-1, code="200")
    with pytest.raises(ValueError):
        requests.inc(stage="x")  # wrong label names
    with pytest.raises(ValueError):
        registry.gauge("x_requests_total", "again, as another type")


def test_metrics_are_thread_safe_and_collectors_run_at_scrape() -> None:
    registry = metrics.Registry()
    counter = registry.counter("t_total", "t")
    gauge = registry.gauge("t_depth", "d", ["queue"])

    def work() -> None:
        for _ in range(2000):
            counter.inc()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.value() == 16000
    registry.add_collector(lambda: gauge.replace({("jobs",): 3}))

    def broken() -> None:
        raise RuntimeError("database down")
    registry.add_collector(broken)  # a failing collector does not break the scrape
    assert 't_depth{queue="jobs"} 3' in registry.render()


def test_listen_addresses_default_to_loopback() -> None:
    assert parse_listen("8080") == ("127.0.0.1", 8080)
    assert parse_listen(":9100") == ("127.0.0.1", 9100)
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    for bad in ("localhost:http", "127.0.0.1:70000", "x"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.headers["Content-Type"], rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_http_endpoint_health_ready_metrics_status() -> None:
    registry = metrics.Registry()
    registry.counter("h_total", "h").inc(4)
    checks = {"database": (True, "ok"), "disk": (True, "plenty")}
    server = HealthServer("127.0.0.1:0", lambda: dict(checks), registry=registry,
                          status=lambda: {"role": "serve"})
    server.start()
    try:
        assert _get(server.url + "/health/live")[0] == 200
        code, _, body = _get(server.url + "/health/ready")
        assert code == 200 and json.loads(body)["ready"] is True
        checks["disk"] = (False, "2 MB free, watermark 1024 MB")
        code, _, body = _get(server.url + "/health/ready")
        assert code == 503 and json.loads(body)["checks"]["disk"]["ok"] is False
        code, content_type, body = _get(server.url + "/metrics")
        assert code == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert "h_total 4" in body
        assert json.loads(_get(server.url + "/status")[2]) == {"role": "serve"}
        assert _get(server.url + "/nothing")[0] == 404
    finally:
        server.stop()


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


def test_logs_and_audit_carry_uids_never_patient_names_or_ids(
        tmp_path: Path, image: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "archive")
    policy = ReceiverPolicy("DICOMNODE", [AllowedPeer("PACS", "127.0.0.1")],
                            patient_key_salt=b"s")
    scp = StorageSCP(store, policy, "127.0.0.1", 0)
    scp.start()
    ds = dcmread(image)
    ds.PatientName, ds.PatientID, ds.OtherPatientIDs = "Secretname^Jane", "PID-93471", "OPID-1"
    try:
        with caplog.at_level(logging.INFO, logger="dicomnode"):
            ae = scu()
            ae.add_requested_context(ds.SOPClassUID)
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
            assert assoc.send_c_store(ds).Status == 0
            assoc.release()
            time.sleep(0.5)  # the close event is handled on the association's thread
        audit = store.audit_trail()
    finally:
        scp.stop()
        store.close()
    text = caplog.text + repr(audit)
    assert str(ds.SOPInstanceUID) in caplog.text and str(ds.StudyInstanceUID) in caplog.text
    for secret in ("Secretname", "PID-93471", "OPID-1"):
        assert secret not in text
    assert any(a.event == "association" and a.count == 1 for a in audit)


def test_status_command_reports_queue_disk_model_and_audit(tmp_path: Path, image: Path) -> None:
    config = write_config(tmp_path / "node.toml", data_dir=tmp_path / "data", port=1,
                          peers=[], models={"dbt": "none", "ffdm": "none",
                                            "s2d": str(tmp_path / "missing.pt")})
    store = Store(f"sqlite:///{tmp_path / 'data' / 'dicomnode.db'}", tmp_path / "data" /
                  "archive")
    try:
        from dicomnode.scp import archive_instance

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
