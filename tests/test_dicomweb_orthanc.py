"""Orthanc (with its DICOMweb plugin) as a DICOMweb PACS: it sends a study to `dicomnode run`
by STOW-RS with a bearer token, the node runs the model and sends the results back into
Orthanc by STOW-RS through its delivery queue; a wrong token is refused with 401; all of it
shows in `dicomnode status`, /metrics and the audit trail."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, ParametricMapStorage, SegmentationStorage

from dicomnode.dicomweb.stow import hash_token
from tests.support.peers import (
    DICOMWEB_PLUGIN,
    free_port,
    make_checkpoint,
    node_process,
    orthanc,
    wait_for,
    write_config,
)
from tests.support.synth import SMALL

TOKEN = "orthanc-to-dicomnode-token"
SR = Comprehensive3DSRStorage
SEG = SegmentationStorage
PM = ParametricMapStorage


@pytest.fixture
def dicomweb_plugin() -> Path:
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} (Debian orthanc-dicomweb)")
    return DICOMWEB_PLUGIN


def _orthanc_stow(pacs, server: str, study: str) -> tuple[int, str]:
    req = urllib.request.Request(f"{pacs.url}/dicom-web/servers/{server}/stow",
                                 data=json.dumps({"Resources": [study]}).encode(),
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _status(config: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dicomnode.cli", "--config", str(config),
                           "status", "--json", "--audit", "50"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.orthanc
def test_orthanc_stow_in_results_stow_out(tmp_path: Path, dicomweb_plugin: Path,
                                          synth_study) -> None:
    study_dir = synth_study(**SMALL)
    images = sorted(study_dir.glob("*/s2d/*.dcm"))  # 4 synthetic 2D views: small and quick
    checkpoint = make_checkpoint(tmp_path / "s2d.pt", "s2d")
    node_port, stow_port, http_port = free_port(), free_port(), free_port()
    servers = {
        "node": {"Url": f"http://127.0.0.1:{stow_port}/",
                 "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}},
        "intruder": {"Url": f"http://127.0.0.1:{stow_port}/",
                     "HttpHeaders": {"Authorization": "Bearer not-the-token"}},
    }
    extra = {"Plugins": [str(dicomweb_plugin)],
             "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers}}
    with orthanc(tmp_path / "orthanc", extra=extra) as pacs:
        config = write_config(
            tmp_path / "node.toml", data_dir=tmp_path / "data", port=node_port,
            peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port,
                    "token_sha256": hash_token(TOKEN),
                    "dicomweb_url": f"{pacs.url}/dicom-web"}],
            models={"s2d": str(checkpoint), "dbt": "none", "ffdm": "none"}, idle_seconds=1.0,
            extra=f'\n[dicomweb]\nlisten = "127.0.0.1:{stow_port}"\n\n'
                  f'[http]\nlisten = "127.0.0.1:{http_port}"\n')
        with node_process(config, port=node_port):
            wait_for(lambda: _open(stow_port), 30, "STOW-RS endpoint")
            ids = [pacs.post("/instances", p.read_bytes())["ID"] for p in images]
            study = pacs.get(f"/instances/{ids[0]}/study")["ID"]

            code, _ = _orthanc_stow(pacs, "intruder", study)
            assert code >= 400  # the node answered 401; Orthanc reports the failure
            code, text = _orthanc_stow(pacs, "node", study)
            assert code == 200, text

            expected = len(images) * 3  # per image: SR, SEG, the malignant map (the default)

            def results() -> list[str]:
                return [i["ID"] for i in pacs.get(f"/studies/{study}/instances")
                        if i["ID"] not in ids]
            wait_for(lambda: len(results()) >= expected, 420, "results in Orthanc", 2)
            classes = [pacs.get(f"/instances/{i}/simplified-tags")["SOPClassUID"]
                       for i in results()]
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics",
                                        timeout=10) as rsp:
                scrape = rsp.read().decode()
            wait_for(lambda: _status(config)["processes"][0]["stow_instances_received"] == 4,
                     20, "status file refreshed")
            status = _status(config)
    assert sorted(classes) == sorted([SR] * 4 + [SEG] * 4 + [PM] * 4)
    assert 'dicomnode_stow_requests_total{status="200"} 1' in scrape
    assert 'dicomnode_stow_requests_total{status="401"} 1' in scrape
    assert 'dicomnode_stow_instances_total{result="stored"} 4' in scrape
    assert status["stow"]["up"]
    process = status["processes"][0]
    assert process["stow_listen"] == f"http://127.0.0.1:{stow_port}"
    assert process["stow_requests"] == 1  # refused ones are not received requests
    assert status["deliveries"].get("done") == expected
    events = {(e["event"], e["status"], e["calling_ae"]) for e in status["audit"]}
    assert ("stow", "200", "ORTHANC") in events
    assert ("stow_rejected", "401", None) in events
    delivered = [e for e in status["audit"] if e["event"] == "delivery"]
    assert len(delivered) == expected
    assert {(e["called_ae"], e["status"]) for e in delivered} == {("ORTHANC", "http-200")}


def _open(port: int) -> bool:
    from dicomnode.external import port_open

    return port_open(port)
