"""The worker in-process: a received study becomes SR + SEG + Parametric Maps whose numbers
are the model's, and a node without weights fails the job clearly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import MammographyCADSRStorage

from dicomnode.config import Config
from dicomnode.network.scp import ReceiverPolicy, archive_instance
from dicomnode.pipeline.images import load_image
from dicomnode.pipeline.weights import ModelRegistry
from dicomnode.pipeline.worker import Worker, analyse_image, combine_breasts
from dicomnode.results import ResultOptions
from dicomnode.results.common import result_uid
from dicomnode.results.findings import flagged_regions
from dicomnode.results.read import read_sr_summary
from storage import Store
from tests.support.peers import make_checkpoint
from tests.support.results import WITH_FINDINGS, cad_marks, cad_summary
from tests.support.synth import SMALL

MODALITIES = ("dbt", "ffdm", "s2d")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {m: make_checkpoint(root / f"{m}.pt", m, seed=i) for i, m in enumerate(MODALITIES)}


@pytest.fixture(scope="module")
def study(synth_study) -> Path:
    return next(p for p in synth_study(**SMALL).iterdir() if p.is_dir())


def node_config(tmp_path: Path, checkpoints: dict[str, str]) -> Config:
    config = Config()
    config.node.data_dir = str(tmp_path / "data")
    config.model.device = "cpu"
    for modality, spec in checkpoints.items():
        setattr(config.model, modality, spec)
    return config


def receive(store: Store, study: Path) -> str:
    policy = ReceiverPolicy("DICOMNODE", patient_key_salt=b"t")
    study_uid = ""
    for path in sorted(study.glob("*/*.dcm")):
        if path.parent.name != "seg":
            _, ds = archive_instance(store, path.read_bytes(), policy, calling_ae="PACS")
            study_uid = str(ds.StudyInstanceUID)
    return study_uid


@pytest.mark.slow
def test_study_gets_results_that_carry_the_model_outputs(tmp_path: Path, study: Path,
                                                         checkpoints: dict[str, Path]) -> None:
    config = node_config(tmp_path, {m: str(p) for m, p in checkpoints.items()})
    config.results.cad_operating_points = [0.5, 1e-4]
    store = Store(config.database_url, tmp_path / "archive")
    try:
        study_uid = receive(store, study)
        store.force_ready(study_uid)
        worker = Worker(config, store, name="w1")
        assert worker.run_one_job()
        job = store.list_jobs()[0]
        assert str(job.state) == "done", job.last_error
        results = store.study_results(study_uid)
        kinds = sorted(r.kind for r in results)
        assert kinds.count("sr") == 12 and kinds.count("pmap") == 12 and kinds.count("seg") == 12
        assert kinds.count("cad-sr") == 1  # one Mammography CAD SR: the study has DBT

        # Every SR's probabilities are what the model gives for its image, recomputed here.
        registry = ModelRegistry(config.model)
        analyses = {}
        for path in sorted(study.glob("*/*.dcm")):
            if path.parent.name == "seg":
                continue
            image = load_image(path)
            analyses[image.sop_instance_uids[0]] = analyse_image(image, registry.get(
                image.modality))
        breasts = combine_breasts(list(analyses.values()))
        srs = [dcmread(r.path) for r in results if r.kind == "sr"]
        for sr in srs:
            assert sr.StudyInstanceUID == study_uid
            evidence = {ref.ReferencedSOPInstanceUID
                        for item in sr.CurrentRequestedProcedureEvidenceSequence
                        for series in item.ReferencedSeriesSequence
                        for ref in series.ReferencedSOPSequence}
            (source_uid,) = evidence & set(analyses)
            expected = analyses[source_uid]
            summary = read_sr_summary(sr)
            for method, probs in (("final", expected.final), ("global", expected.global_),
                                  ("local", expected.local)):
                assert summary.probabilities[method]["malignant"] == pytest.approx(
                    probs.malignant, abs=1e-5)
                assert summary.probabilities[method]["benign"] == pytest.approx(
                    probs.benign, abs=1e-5)
            breast = breasts[expected.image.laterality].final
            assert summary.probabilities["breast"]["malignant"] == pytest.approx(
                breast.malignant, abs=1e-5)
            assert summary.attention == pytest.approx([r.attention for r in expected.regions],
                                                      abs=1e-5)

        # The CAD SR covers the DBT images, with the model's malignant probabilities.
        (cad,) = [dcmread(r.path) for r in results if r.kind == "cad-sr"]
        assert cad.SOPClassUID == MammographyCADSRStorage
        assert cad.StudyInstanceUID == study_uid
        dbt = {uid: a for uid, a in analyses.items() if a.image.modality == "dbt"}
        evidence = {ref.ReferencedSOPInstanceUID
                    for item in cad.CurrentRequestedProcedureEvidenceSequence
                    for series in item.ReferencedSeriesSequence
                    for ref in series.ReferencedSOPSequence}
        assert evidence == set(dbt)
        # ... with a mark per region the model flags (the floor is set low: random weights
        # give faint saliency), each with its peak as probability of cancer
        floor = config.results.cad_operating_points[-1]
        expected_peaks = sorted(100 * r.peak for a in dbt.values()
                                for r in flagged_regions(a, 1, floor))
        marks = cad_marks(cad)
        assert expected_peaks and sorted(100 * m.probability for m in marks) == \
            pytest.approx(expected_peaks, abs=1e-2)
        summary_code, impressions = cad_summary(cad)  # a CC+MLO pair is one impression
        assert summary_code == WITH_FINDINGS and (len(marks) + 1) // 2 <= impressions <= len(marks)
    finally:
        store.close()


def test_test_time_augmentation_changes_the_scores_not_the_drawings(
        tmp_path: Path, study: Path, checkpoints: dict[str, Path]) -> None:
    config = node_config(tmp_path, {"dbt": str(checkpoints["dbt"]), "ffdm": "none",
                                    "s2d": "none"})
    config.model.test_time_augmentations, config.model.augment_px = 3, 8
    store = Store(config.database_url, tmp_path / "archive")
    try:
        study_uid = receive(store, study)
        store.force_ready(study_uid)
        assert Worker(config, store, name="w1").run_one_job()
        assert str(store.list_jobs()[0].state) == "done"
        finals = {}
        for result in store.study_results(study_uid):
            if result.kind == "sr":
                sr = dcmread(result.path)
                uid = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[
                    0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                finals[uid] = read_sr_summary(sr).probabilities["final"]["malignant"]

        loaded = ModelRegistry(config.model).get("dbt")
        one_pass = ModelRegistry(replace(config.model, test_time_augmentations=0)).get("dbt")
        moved = 0
        for path in sorted(study.glob("dbt/*.dcm")):
            image = load_image(path)
            plain = analyse_image(image, one_pass)
            augmented = analyse_image(image, loaded)
            # The worker reported the augmented mean ...
            assert finals[image.sop_instance_uids[0]] == pytest.approx(
                augmented.final.malignant, abs=1e-5)
            moved += abs(augmented.final.malignant - plain.final.malignant) > 1e-4
            # ... and drew what the plain pass saw, in the source image's geometry.
            assert augmented.global_ == plain.global_ and augmented.regions == plain.regions
            np.testing.assert_array_equal(augmented.saliency, plain.saliency)
        assert moved >= 2 and len(finals) == 4

        # The objects say how they were scored, and get other UIDs than one-pass results.
        seg = next(dcmread(r.path) for r in store.study_results(study_uid) if r.kind == "seg")
        parameters: list[str] = []
        seg.walk(lambda _, e: parameters.append(str(e.value))
                 if e.keyword == "AlgorithmParameters" else None)
        assert parameters and all("test_time_augmentations" in p and "3 copies, up to 8 px" in p
                                  for p in parameters)
        assert result_uid(augmented, ResultOptions(), "sr") != result_uid(plain, ResultOptions(),
                                                                          "sr")
    finally:
        store.close()


def test_no_weights_fails_the_job_with_a_clear_error(tmp_path: Path, study: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # as in a package built without the shipped weights
    monkeypatch.setattr("dicomnode.pipeline.weights.BUILTIN_DIR", tmp_path / "no-weights")
    config = node_config(tmp_path, {m: "builtin" for m in MODALITIES})
    store = Store(config.database_url, tmp_path / "archive")
    try:
        study_uid = receive(store, study)
        store.force_ready(study_uid)
        assert Worker(config, store, name="w1").run_one_job()
        job = store.list_jobs()[0]
        assert str(job.state) == "failed"
        assert "no built-in" in job.last_error and "[model]" in job.last_error
        assert store.study_results(study_uid) == []
    finally:
        store.close()


def test_missing_checkpoint_file_fails_clearly(tmp_path: Path, study: Path) -> None:
    config = node_config(tmp_path, {m: str(tmp_path / "nope.pt") for m in MODALITIES})
    store = Store(config.database_url, tmp_path / "archive")
    try:
        store.force_ready(receive(store, study))
        assert Worker(config, store, name="w1").run_one_job()
        job = store.list_jobs()[0]
        assert str(job.state) == "failed" and "no such checkpoint file" in job.last_error
    finally:
        store.close()
