"""`dicomnode retrieve` from Orthanc's DICOMweb (Debian orthanc + orthanc-dicomweb) by
QIDO-RS and WADO-RS: a labels file naming studies Orthanc holds and one it does not, one
study already partly archived (its missing instances fetched one by one), a resumed run that
skips what is complete, by accession number too; then `dicomnode train` runs one epoch on
what arrived."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pydicom
import pytest
import torch

from dicomnode.config import load_config
from dicomnode.network.instance_checks import EncodedInstance
from dicomnode.network.scp import archive_instance
from dicomnode.wiring import open_store, policy_from_config
from tests.support.cli import ABSENT, read_report, run_cli
from tests.support.peers import DICOMWEB_PLUGIN, free_port, orthanc, write_config
from tests.support.training import TINY_ARGS

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


@pytest.fixture(scope="module")
def synth(synth_study) -> Path:
    return synth_study(studies=4, modalities=("s2d",), seed=183)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_retrieve_by_wado_then_train(synth: Path, tmp_path: Path, capsys) -> None:
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} (Debian orthanc-dicomweb)")
    torch.set_num_threads(1)
    with (synth / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    studies = sorted({r["study_uid"] for r in rows})
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:  # the training labels plus a study nobody holds
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({**rows[0], "study_uid": ABSENT, "sop_instance_uid": ABSENT + ".1"})
    images = sorted(synth.rglob("s2d/*.dcm"))
    ground_truth = sorted(synth.rglob("seg/*.dcm"))[:1]  # not a breast image: not wanted
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): _sha256(p)
                 for p in images}
    extra = {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True,
                                                             "Root": "/dicom-web/"}}
    with orthanc(tmp_path / "orthanc", extra=extra) as pacs:
        for path in images + ground_truth:
            pacs.post("/instances", path.read_bytes())
        # No retrieve_method: a peer with a dicomweb_url is retrieved from by WADO-RS.
        peer = {"ae_title": "ORTHANC", "send_results": False, "retrieve": True,
                "dicomweb_url": f"{pacs.url}/dicom-web"}
        config = write_config(tmp_path / "node.toml", data_dir=tmp_path / "data",
                              port=free_port(), peers=[peer], models={})

        # A run that stopped part way: one instance of the first study is archived already.
        first = next(p for p in images
                     if str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                     == studies[0])
        loaded = load_config(config)
        with open_store(loaded) as store:
            archive_instance(store, EncodedInstance(first.read_bytes()),
                             policy_from_config(loaded), calling_ae="ORTHANC")

        report = tmp_path / "report.csv"
        complete = tmp_path / "complete.csv"
        code, out, err = run_cli(["--config", str(config), "retrieve", "--labels", str(labels),
                                  "--report", str(report), "--write-labels", str(complete)],
                                 capsys)
        assert code == 1, err
        assert "by WADO-RS" in out
        assert out.count("retrieved, 4 instances") == 4, out
        assert "retrieved 4" in out and "missing 1" in out
        assert f"{ABSENT} (line {len(rows) + 2}): missing" in err
        assert f"{len(rows)} label rows of complete studies" in out
        assert ABSENT not in complete.read_text()
        statuses = read_report(report)
        assert statuses[ABSENT]["status"] == "missing"
        assert {u: statuses[u]["status"] for u in studies} == dict.fromkeys(studies,
                                                                             "retrieved")
        assert all(statuses[u]["archived"] == "4" for u in studies)
        assert statuses[studies[0]]["fetched"] == "3"  # only what the archive lacked
        assert {statuses[u]["fetched"] for u in studies[1:]} == {"4"}

        # What arrived is what Orthanc holds, byte for byte, from the peer's AE; the
        # ground-truth SEG (not a breast image) was not fetched; no part file is left over.
        with open_store(loaded) as store:
            archived = [i for u in studies for i in store.study_instances(u)]
        assert {i.sop_instance_uid: i.sha256 for i in archived} == originals
        assert {i.calling_ae for i in archived} == {"ORTHANC"}
        assert not list((tmp_path / "data" / "retrieve-incoming").iterdir())

        # Resumable: the second run skips what is complete and still lists the missing one.
        code, out, err = run_cli(["--config", str(config), "retrieve", "--labels",
                                  str(labels)], capsys)
        assert code == 1 and out.count("already complete, skipped") == 4, out
        assert ABSENT in err

        # By accession number (QIDO-RS ?AccessionNumber=), into a second archive.
        accession = str(pydicom.dcmread(images[0], stop_before_pixels=True).AccessionNumber)
        by_accession = tmp_path / "accessions.csv"
        by_accession.write_text(f"accession_number\n{accession}\nNOSUCHACC\n")
        config2 = write_config(tmp_path / "node2.toml", data_dir=tmp_path / "data2",
                               port=free_port(), peers=[peer], models={})
        code, out, err = run_cli(["--config", str(config2), "retrieve", "--labels",
                                  str(by_accession), "--method", "wado"], capsys)
        assert code == 1, out + err
        assert "retrieved 1" in out and "missing 1" in out
        assert "accession NOSUCHACC (line 3): missing" in err

        # Retrieved studies are for training: their jobs are cancelled, not inferred.
        code, out, _ = run_cli(["--config", str(config), "jobs", "list"], capsys)
        assert code == 0 and out.count("cancelled") == 4, out
        code, out, _ = run_cli(["--config", str(config), "status", "--json"], capsys)
        last = json.loads(out)["last_retrieve"]
        assert last["status"] == "problems" and "complete=4 missing=1" in last["detail"]

    # Orthanc is gone: the run stops at the first study, says so, and nothing is lost.
    code, out, err = run_cli(["--config", str(config2), "retrieve", "--labels",
                              str(labels)], capsys)
    assert code != 0 and "did not answer" in err and "run again to resume" in err, out + err

    # train on what arrived by WADO-RS, with the labels of the complete studies
    code, out, err = run_cli(["--config", str(config), "train", "--labels",
                              str(complete), "--modality", "s2d", "--out",
                              str(tmp_path / "run"), "--epochs", "1", *TINY_ARGS], capsys)
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["source"].startswith("the archive")
    assert run["splits"]["train"]["images"] + run["splits"]["val"]["images"] == 16
