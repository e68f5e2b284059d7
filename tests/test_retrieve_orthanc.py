"""`dicomnode retrieve` from Orthanc (Debian package) by C-GET and by C-MOVE, for a labels
file naming studies Orthanc holds and one it does not; resumable; then `dicomnode train`
runs one epoch on what arrived."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pydicom
import pytest
import torch

from tests.support.cli import ABSENT, read_report, run_cli
from tests.support.peers import free_port, orthanc, write_config
from tests.support.training import TINY_ARGS

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

@pytest.fixture(scope="module")
def synth(synth_study) -> Path:
    return synth_study(studies=4, modalities=("s2d",), seed=183)


def test_retrieve_by_get_and_move_then_train(synth: Path, tmp_path: Path, capsys) -> None:
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
    node_port = free_port()
    modalities = {"node": ["DICOMNODE", "127.0.0.1", node_port]}
    with orthanc(tmp_path / "orthanc", modalities=modalities) as pacs:
        for path in images + ground_truth:
            pacs.post("/instances", path.read_bytes())
        peer = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port,
                "send_results": False, "retrieve": True}
        config = write_config(tmp_path / "get.toml", data_dir=tmp_path / "get", port=node_port,
                              peers=[peer], models={})
        report = tmp_path / "get-report.csv"
        complete = tmp_path / "complete.csv"
        code, out, err = run_cli(["--config", str(config), "retrieve", "--labels", str(labels),
                                  "--method", "get", "--report", str(report),
                                  "--write-labels", str(complete)], capsys)
        assert code == 1, err
        assert f"{len(rows)} label rows of complete studies" in out
        assert ABSENT not in complete.read_text()
        assert f"{ABSENT} (line {len(rows) + 2}): missing" in err
        assert "retrieved 4" in out and "missing 1" in out
        statuses = read_report(report)
        assert {u: statuses[u]["status"] for u in studies} == dict.fromkeys(studies,
                                                                             "retrieved")
        assert statuses[ABSENT]["status"] == "missing"
        assert all(statuses[u]["archived"] == "4" for u in studies)

        # Resumable: the second run skips what is complete, and still lists the missing one.
        code, out, err = run_cli(["--config", str(config), "retrieve", "--labels", str(labels),
                                  "--method", "get"], capsys)
        assert code == 1 and out.count("already complete, skipped") == 4, out
        assert ABSENT in err

        # Retrieved studies are for training: their jobs are cancelled, not inferred.
        code, out, _ = run_cli(["--config", str(config), "jobs", "list"], capsys)
        assert code == 0 and out.count("cancelled") == 4, out
        code, out, _ = run_cli(["--config", str(config), "status", "--json"], capsys)
        last = json.loads(out)["last_retrieve"]
        assert last["status"] == "problems" and "complete=4 missing=1" in last["detail"]

        # C-MOVE, by accession number, into a second node (its SCP started by the command).
        accession = str(pydicom.dcmread(images[0], stop_before_pixels=True).AccessionNumber)
        by_accession = tmp_path / "accessions.csv"
        by_accession.write_text(f"accession_number\n{accession}\nNOSUCHACC\n")
        config_move = write_config(tmp_path / "move.toml", data_dir=tmp_path / "move",
                                   port=node_port, peers=[peer], models={})
        code, out, err = run_cli(["--config", str(config_move), "retrieve", "--labels",
                                  str(by_accession), "--method", "move"], capsys)
        assert code == 1, out + err
        assert "retrieved 1" in out and "missing 1" in out
        assert "accession NOSUCHACC (line 3): missing" in err
        code, out, err = run_cli(["--config", str(config_move), "retrieve", "--labels",
                                  str(by_accession), "--method", "move"], capsys)
        assert code == 1 and "already complete, skipped" in out, out + err
        from dicomnode.config import load_config
        from dicomnode.wiring import open_store

        with open_store(load_config(config_move)) as store:
            study = str(pydicom.dcmread(images[0], stop_before_pixels=True).StudyInstanceUID)
            assert len(store.study_instances(study)) == 4

    # train on what arrived by C-GET, with the labels of the complete studies
    code, out, err = run_cli(["--config", str(config), "train", "--labels",
                              str(complete), "--modality", "s2d", "--out",
                              str(tmp_path / "run"), "--epochs", "1", *TINY_ARGS], capsys)
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["source"].startswith("the archive")
    assert run["splits"]["train"]["images"] + run["splits"]["val"]["images"] == 16
