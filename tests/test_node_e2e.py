"""End to end with real peers: dcmtk storescu sends a study to `dicomnode run`; the SR, SEG
and Parametric Maps arrive at dcmtk storescp and at Orthanc, valid and in the same study."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    Comprehensive3DSRStorage,
    MammographyCADSRStorage,
    ParametricMapStorage,
    SegmentationStorage,
)

from dicomnode.config import Config
from dicomnode.pipeline.images import load_image
from dicomnode.pipeline.weights import ModelRegistry
from dicomnode.pipeline.worker import analyse_image, result_options
from dicomnode.results.findings import flagged_regions
from dicomnode.results.read import read_sr_summary
from dicomnode.results.validate import (
    dciodvfy_errors,
    dciodvfy_output,
    dsrdump_errors,
    sr_validator_errors,
)
from tests.support.peers import (
    dcmtk,
    free_port,
    make_checkpoint,
    node_process,
    orthanc,
    storescp,
    wait_for,
    write_config,
)
from tests.support.results import (
    WITH_FINDINGS,
    WITHOUT_FINDINGS,
    cad_marks,
    cad_summary,
    dciodvfy_complaints,
    evidence_uids,
    finding_groups,
)

MODALITIES = ("dbt", "ffdm", "s2d")
SR = Comprehensive3DSRStorage
SEG = SegmentationStorage
PM = ParametricMapStorage
CAD_SR = MammographyCADSRStorage
# 12 images (4 views x DBT, FFDM, synthetic 2D): an SR, a SEG and the malignant PM each;
# and one Mammography CAD SR for the study's DBT images
EXPECTED_RESULTS = 12 * 3 + 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    return {m: str(make_checkpoint(root / f"{m}.pt", m, seed=i))
            for i, m in enumerate(MODALITIES)}


@pytest.fixture(scope="module")
def study(synth_study) -> list[Path]:
    out = synth_study(studies=1, size="small", seed=31)
    return sorted(p for m in MODALITIES for p in out.glob(f"*/{m}/*.dcm"))


def _received(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


@pytest.mark.slow
@pytest.mark.dcmtk
@pytest.mark.dicom3tools
@pytest.mark.pixelmed
def test_storescu_to_node_to_storescp(tmp_path: Path, study: list[Path],
                                      checkpoints: dict[str, str]) -> None:
    import subprocess

    out = tmp_path / "received"
    with storescp(out, ae_title="RESULTS") as results_port:
        node_port = free_port()
        config = write_config(
            tmp_path / "node.toml", data_dir=tmp_path / "data", port=node_port,
            peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 1, "send_results": False},
                   {"ae_title": "RESULTS", "host": "127.0.0.1", "port": results_port}],
            models=checkpoints)
        with node_process(config, port=node_port):
            started = time.monotonic()
            proc = subprocess.run(
                [dcmtk("storescu"), "-R", "-aet", "PACS", "-aec", "DICOMNODE", "127.0.0.1",
                 str(node_port), *map(str, study)], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            wait_for(lambda: len(_received(out)) >= EXPECTED_RESULTS, 600,
                     f"{EXPECTED_RESULTS} results at storescp")
            elapsed = time.monotonic() - started
    received = [dcmread(p) for p in _received(out)]
    assert len(received) == EXPECTED_RESULTS, f"after {elapsed:.0f} s"
    study_uid = dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
    assert {ds.StudyInstanceUID for ds in received} == {study_uid}
    by_class = {uid: [p for p, ds in zip(_received(out), received, strict=True)
                      if ds.SOPClassUID == uid] for uid in (SR, SEG, PM, CAD_SR)}
    assert [len(by_class[c]) for c in (SR, SEG, PM, CAD_SR)] == [12, 12, 12, 1]

    # Validators on one object of each kind from the DBT (the others share the code path).
    dbt_uids = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study
                if p.parent.name == "dbt"}
    def from_dbt(path: Path) -> bool:
        ds = dcmread(path, stop_before_pixels=True)
        refs = [r.ReferencedSOPInstanceUID for s in ds.get("ReferencedSeriesSequence", [])
                for r in s.ReferencedInstanceSequence]
        refs += [r.ReferencedSOPInstanceUID
                 for e in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                 for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence]
        return bool(set(refs) & dbt_uids)
    for kind in (SR, SEG, PM):
        path = next(p for p in by_class[kind] if from_dbt(p))
        assert dciodvfy_errors(path) == [], kind
    sr_path = next(p for p in by_class[SR] if from_dbt(p))
    assert dsrdump_errors(sr_path) == []
    assert sr_validator_errors(sr_path) == []
    (cad_path,) = by_class[CAD_SR]
    assert from_dbt(cad_path)
    assert dciodvfy_errors(cad_path) == [] and dsrdump_errors(cad_path) == []
    assert sr_validator_errors(cad_path) == []
    for path in [*by_class[SR], cad_path]:  # no warning either, but the explained one
        assert dciodvfy_complaints(dciodvfy_output(path)) == [], path

    # The SR's probabilities are the model's for that image.
    config_model = Config().model
    for modality, spec in checkpoints.items():
        setattr(config_model, modality, spec)
    config_model.device = "cpu"
    registry = ModelRegistry(config_model)
    sr = dcmread(sr_path)
    evidence = {r.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    source = next(p for p in study if dcmread(p, stop_before_pixels=True).SOPInstanceUID
                  in evidence)
    image = load_image(source)
    expected = analyse_image(image, registry.get(image.modality))
    got = read_sr_summary(sr).probabilities["final"]
    assert got["malignant"] == pytest.approx(expected.final.malignant, abs=1e-5)
    assert got["benign"] == pytest.approx(expected.final.benign, abs=1e-5)

    # What the results claim is what the model flags: no CAD mark on a DBT image and no
    # finding-coded TID 1500 group on an image whose saliency stays below the operating
    # points; the CAD summary code agrees with its impressions.
    options = result_options(Config())  # the node runs the default [results]
    floor = options.cad_operating_points[-1]
    cad = dcmread(cad_path)
    summary_code, impressions = cad_summary(cad)
    assert summary_code == (WITH_FINDINGS if impressions else WITHOUT_FINDINGS)
    marks = cad_marks(cad)
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in study}
    for path in by_class[SR]:
        report = dcmread(path)
        (uid,) = evidence_uids(report) & set(sources)
        image = load_image(sources[uid])
        analysis = analyse_image(image, registry.get(image.modality))
        groups = finding_groups(report)
        for c in (0, 1):
            regions = flagged_regions(analysis, c, options.thresholds[c])
            assert len([g for g in groups if g[0] == c]) == len(regions)
            if float(analysis.saliency[:, c].max()) < options.thresholds[c]:
                assert regions == []
        on_image = [m for m in marks if m.sop_instance_uid == uid]
        if image.modality == "dbt":
            assert len(on_image) == len(flagged_regions(analysis, 1, floor))
            if float(analysis.saliency[:, 1].max()) < floor:
                assert on_image == []
        else:
            assert on_image == []


@pytest.mark.slow
@pytest.mark.orthanc
def test_orthanc_routes_a_study_and_receives_the_results(tmp_path: Path, study: list[Path],
                                                         checkpoints: dict[str, str]) -> None:
    node_port = free_port()
    with orthanc(tmp_path / "orthanc", ae_title="ORTHANC",
                 modalities={"dicomnode": ["DICOMNODE", "127.0.0.1", node_port]}) as pacs:
        config = write_config(
            tmp_path / "node.toml", data_dir=tmp_path / "data", port=node_port,
            peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
            models=checkpoints)
        with node_process(config, port=node_port):
            ids = [pacs.post("/instances", p.read_bytes())["ID"] for p in study]
            orthanc_study = pacs.get(f"/instances/{ids[0]}/study")["ID"]
            job = pacs.post("/modalities/dicomnode/store",
                            {"Resources": [orthanc_study], "Synchronous": True})
            assert job.get("FailedInstancesCount", 0) == 0

            def results_arrived() -> bool:
                return len(pacs.get(f"/studies/{orthanc_study}/instances")) >= \
                    len(study) + EXPECTED_RESULTS
            wait_for(results_arrived, 600, "results in Orthanc")
        modalities = sorted(pacs.get(f"/series/{s}")["MainDicomTags"].get("Modality", "")
                            for s in pacs.get(f"/studies/{orthanc_study}")["Series"])
    # the results went into the same study in the PACS, next to the images
    # 12 SR series and the CAD SR's
    assert modalities.count("SR") == 13 and modalities.count("SEG") == 12
    # one Parametric Map series per image (the malignant map; OHIF shows one map a series),
    # beside the 12 source series
    assert len(modalities) == 12 + 13 + 12 + 12
