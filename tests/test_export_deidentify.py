"""`dicomnode export --deidentify`: every exported object is scanned for the source's
identifying values (names, IDs, dates, UIDs) in its raw bytes and in every element's value;
pseudonyms are the same for one patient's studies; result objects still reference their
images; the key stays in data_dir; dciodvfy finds no error the source did not have."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID_dictionary

from dicomnode.config import load_config
from dicomnode.export.deidentify import KEY_FILE
from dicomnode.synth import SynthOptions, generate_studies
from dicomnode.wiring import open_store
from tests.support.cli import run_cli
from tests.support.results import findings, make_analysis, make_breast

IDENTIFYING_TEXT = ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID",
                    "SourceApplicationEntityTitle",
                    "InstitutionName", "InstitutionAddress", "StationName",
                    "DeviceSerialNumber", "IssuerOfPatientID", "PatientAddress")


pytestmark = pytest.mark.slow
IMAGES = 16


def walk(ds: pydicom.Dataset):
    yield from ds.iterall()
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from meta


def identifying_values(ds: pydicom.Dataset) -> set[str]:
    """What a source object says about whom, when and which: names, IDs, dates, UIDs."""
    values: set[str] = set()
    for elem in walk(ds):
        if elem.VR == "SQ" or elem.value in (None, "", b""):
            continue
        items = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) \
            else [elem.value]
        for v in items:
            text = str(v).strip()
            if elem.VR in ("PN", "DA", "DT") or elem.keyword in IDENTIFYING_TEXT:
                values.add(text)
                if elem.keyword == "PatientName":  # also each name component
                    values.update(p for p in re.split(r"[\^=]", text) if len(p) >= 4)
            elif elem.VR == "UI" and text not in UID_dictionary \
                    and elem.keyword != "ImplementationClassUID":  # the writing software
                values.add(text)
    return {v for v in values if len(v) >= 4}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """Two studies of one patient (the second's patient rewritten to the first's), with the
    node's result objects (SR, SEG, Parametric Maps) for one image; (config, labels, the
    source files)."""
    root = tmp_path_factory.mktemp("deid")
    synth = root / "synth"
    generate_studies(synth, SynthOptions(studies=2, modalities=("dbt", "s2d"), seed=1))
    files = sorted([*synth.rglob("s2d/*.dcm"), *synth.rglob("dbt/*.dcm")])
    assert len(files) == IMAGES
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    for path in files:
        ds = pydicom.dcmread(path)
        if ds.StudyInstanceUID != first.StudyInstanceUID:
            ds.PatientID, ds.PatientName = first.PatientID, first.PatientName
            ds.PatientBirthDate = first.PatientBirthDate
            ds.save_as(path)
    config = root / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{root / "data"}"\n[storage]\nmin_free_mb = 0\n')
    analysis = make_analysis(synth, findings(synth, "s2d")[0])
    results = make_results(analysis, root / "results")
    for path in files:  # as the SCP archives them: file meta naming the sender's AE
        ds = pydicom.dcmread(path)
        ds.file_meta.SourceApplicationEntityTitle = "HOSPITALPACS01"
        ds.save_as(path)
    with open_store(load_config(config)) as store:
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            store.store_instance(
                encoded=path.read_bytes(), sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
                series_uid=ds.SeriesInstanceUID, transfer_syntax=ds.file_meta.TransferSyntaxUID,
                patient_key="p", modality="MG", laterality=ds.get("ImageLaterality"))
        for path in results:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            store.store_result(encoded=path.read_bytes(), sop_instance_uid=ds.SOPInstanceUID,
                               sop_class_uid=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
                               series_uid=ds.SeriesInstanceUID,
                               transfer_syntax=ds.file_meta.TransferSyntaxUID, kind="sr")
    return config, synth / "labels.csv", files + results


def make_results(analysis, out: Path) -> list[Path]:
    from dicomnode.results import build_results

    out.mkdir()
    paths = []
    for n, ds in enumerate(build_results(analysis, make_breast(analysis)).datasets):
        paths.append(out / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def exported(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.dcm"))


def test_export_leaves_no_identifying_value(archive, tmp_path: Path, capsys) -> None:
    config, labels, sources = archive
    out = tmp_path / "out"
    code, stdout, err = run_cli(["--config", str(config), "export", "--deidentify", str(out),
                                 "--labels", str(labels)], capsys)
    assert code == 0, err
    files = exported(out)
    # 2 studies x 4 views x (DBT + synthetic 2D); SR, SEG and the (malignant) Parametric
    # Map of one image
    assert len(files) == len(sources) == IMAGES + 3
    secrets_ = set().union(*(identifying_values(pydicom.dcmread(p)) for p in sources))
    # The node's results name their equipment, the algorithm, by the weights' hash (Device
    # Serial Number), the same at every site: it identifies the model, not the patient.
    secrets_ -= {str(e.value) for p in sources[IMAGES:] for e in pydicom.dcmread(p).iterall()
                 if e.keyword == "DeviceSerialNumber"}
    assert len(secrets_) > 20  # names, IDs, dates and UIDs were found to look for
    long_ = {s for s in secrets_ if len(s) >= 6}  # short ones would match pixel bytes
    for path in files:
        raw = path.read_bytes()
        leaked = [s for s in long_ if s.encode() in raw]
        assert not leaked, f"{path.name}: {leaked}"
        ds = pydicom.dcmread(path)
        for elem in walk(ds):
            if elem.VR != "SQ":
                text = str(elem.value)
                tokens = set(re.split(r"[\^=\\ ]", text))
                assert not [s for s in long_ if s in text], (path.name, elem)
                assert not tokens & secrets_, (path.name, elem)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        codes = {c.CodeValue for c in ds.DeidentificationMethodCodeSequence}
        assert codes == {"113100", "113107", "113105"}
    for path in [*out.rglob("*.csv"), *out.rglob("*.json")]:  # nor in the labels/summary
        text = path.read_text()
        # short values (a series number such as "0001") as whole fields only: inside a new
        # random UID they are chance, not a leak
        fields = set(re.split(r"[\s,;:\"\[\]{}]+", text))
        assert not [s for s in long_ if s in text], path
        assert not fields & secrets_, path

    # one patient, one pseudonym; dates shifted, the interval between the studies kept
    images = [pydicom.dcmread(p, stop_before_pixels=True)
              for p in sorted(out.glob("images/**/*.dcm"))]
    assert len({d.PatientID for d in images}) == 1
    assert len({d.StudyInstanceUID for d in images}) == 2
    source_dates = sorted({pydicom.dcmread(p, stop_before_pixels=True).StudyDate
                           for p in sources[:IMAGES]})
    new_dates = sorted({d.StudyDate for d in images})
    days = [(pydicom.valuerep.DA(b) - pydicom.valuerep.DA(a)).days
            for a, b in (source_dates, new_dates)]
    assert days[0] == days[1] and source_dates != new_dates

    # results still reference the exported images (UIDs remapped consistently)
    image_uids = {str(d.SOPInstanceUID) for d in images}
    results = [pydicom.dcmread(p) for p in sorted(out.glob("results/**/*.dcm"))]
    result_uids = {str(r.SOPInstanceUID) for r in results}
    referenced = {str(e.value) for r in results for e in r.iterall()
                  if e.keyword == "ReferencedSOPInstanceUID"}
    assert referenced & image_uids and referenced <= image_uids | result_uids
    assert {str(r.StudyInstanceUID) for r in results} <= {str(d.StudyInstanceUID)
                                                          for d in images}

    # labels: the new UIDs and pseudonym, no file paths
    with (out / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == IMAGES and "path" not in rows[0]
    assert {r["sop_instance_uid"] for r in rows} == image_uids
    assert {r["patient_id"] for r in rows} == {images[0].PatientID}

    # the key stays on the node; a second export maps everything the same way
    key = next(config.parent.glob(f"data/{KEY_FILE}"))
    assert key.stat().st_mode & 0o077 == 0
    for path in out.rglob("*"):
        if path.is_file():
            assert key.read_bytes() not in path.read_bytes()
            assert key.read_bytes().hex().encode() not in path.read_bytes()
    again = tmp_path / "again"
    code, _, err = run_cli(["--config", str(config), "export", "--deidentify", str(again),
                            "--labels", str(labels)], capsys)
    assert code == 0, err
    assert [p.relative_to(again) for p in exported(again)] == \
        [p.relative_to(out) for p in exported(out)]
    summary = json.loads((out / "export.json").read_text())
    assert summary["studies"] == 2 and summary["results"] == 3


@pytest.mark.dicom3tools
def test_dciodvfy_finds_no_new_errors(archive, tmp_path: Path, capsys) -> None:
    config, labels, sources = archive
    out = tmp_path / "out"
    assert run_cli(["--config", str(config), "export", "--deidentify", str(out), "--labels",
                    str(labels)], capsys)[0] == 0
    by_class: dict[str, set[str]] = {}

    def errors(path: Path) -> set[str]:
        run = subprocess.run([shutil.which("dciodvfy") or "dciodvfy", str(path)],
                             capture_output=True, text=True, timeout=120)
        return {re.sub(r"\s*=\s*<[^>]*>|\[\d+\]", "", line).strip()  # without values
                for line in (run.stdout + run.stderr).splitlines()
                if line.startswith("Error")}

    for path in sources:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_class.setdefault(str(ds.SOPClassUID), set()).update(errors(path))
    for path in exported(out):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        new = errors(path) - by_class[str(ds.SOPClassUID)]
        assert not new, f"{path.relative_to(out)}: {sorted(new)}"


def test_missing_study_is_listed_not_skipped(archive, tmp_path: Path, capsys) -> None:
    config, labels, _ = archive
    extra = tmp_path / "labels.csv"
    extra.write_text(labels.read_text() + "2.25.4242,,L,CC,MG,2.25.4243,0,1\n")
    code, _, err = run_cli(["--config", str(config), "export", "--deidentify",
                            str(tmp_path / "o"), "--labels", str(extra)], capsys)
    assert code == 1 and "2.25.4242: not in the archive" in err
    code, _, err = run_cli(["--config", str(config), "export", "--deidentify",
                            str(tmp_path / "o"), "--labels", str(labels)], capsys)
    assert code == 1 and "is not empty" in err
