"""deploy/orthanc as shipped: Orthanc from its Debian package with deploy/orthanc/orthanc.json
(test ports and paths patched in) and the Lua auto-routing script. A study uploaded over
REST is routed to `dicomnode run` once stable; the results land in the same study, and the
study is routed once even though the results make it stable again."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, ParametricMapStorage, SegmentationStorage

from tests.support.peers import (
    DEPLOY,
    deploy_config,
    free_port,
    make_checkpoint,
    node_process,
    orthanc,
    wait_for,
    write_config,
)
from tests.support.synth import SMALL

SR = Comprehensive3DSRStorage
SEG = SegmentationStorage
PM = ParametricMapStorage


def _text(pacs, path: str) -> str:
    with urllib.request.urlopen(pacs.url + path, timeout=10) as rsp:
        return rsp.read().decode().strip()


def test_shipped_orthanc_config_is_json_with_the_lua_script() -> None:
    config = deploy_config(Path("/tmp/x"), 11112)
    assert config["DicomModalities"]["dicomnode"]["AET"] == "DICOMNODE"
    assert "DicomnodeRouted" in config["UserMetadata"]
    assert "function OnStableStudy" in (DEPLOY / "dicomnode-route.lua").read_text()


@pytest.mark.slow
@pytest.mark.orthanc
def test_orthanc_routes_stable_breast_study_and_keeps_results(tmp_path: Path,
                                                              synth_study) -> None:
    study_dir = synth_study(**SMALL)
    images = sorted(study_dir.glob("*/s2d/*.dcm"))  # 4 synthetic 2D views: small and quick
    ground_truth = sorted(study_dir.glob("*/seg/s2d_*.dcm"))[:1]  # a SEG is not routed
    checkpoint = make_checkpoint(tmp_path / "s2d.pt", "s2d")
    node_port = free_port()
    with orthanc(tmp_path / "orthanc", extra=deploy_config(tmp_path / "orthanc", node_port)
                 ) as pacs:
        config = write_config(
            tmp_path / "node.toml", data_dir=tmp_path / "data", port=node_port,
            peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
            models={"s2d": str(checkpoint), "dbt": "none", "ffdm": "none"}, idle_seconds=1.0)
        with node_process(config, port=node_port):
            ids = [pacs.post("/instances", p.read_bytes())["ID"] for p in images + ground_truth]
            study = pacs.get(f"/instances/{ids[0]}/study")["ID"]
            expected = len(images) * 3  # per image: SR, SEG, the malignant map

            def results() -> list[str]:
                return [i["ID"] for i in pacs.get(f"/studies/{study}/instances")
                        if i["ID"] not in ids]
            wait_for(lambda: len(results()) >= expected, 420, "results in Orthanc", 2)
            time.sleep(6)  # results made the study stable again: it must not be re-routed
            classes = [_text(pacs, f"/instances/{i}/metadata/SopClassUid") for i in results()]
            jobs = [pacs.get(f"/jobs/{j}") for j in pacs.get("/jobs")]
    assert sorted(classes) == sorted([SR] * 4 + [SEG] * 4 + [PM] * 4)
    stores = [j for j in jobs if j["Type"] == "DicomModalityStore"]
    assert len(stores) == 1 and stores[0]["State"] == "Success"
    assert stores[0]["Content"]["InstancesCount"] == len(images)  # not the ground-truth SEG
