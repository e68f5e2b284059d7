"""The synthetic study generator: layout, labels, ground truth, determinism, DICOM validity."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
)

from dicomnode.synth import SynthOptions, generate_studies
from dicomnode.synth.options import DBT_PIXEL_MM, FFDM_PIXEL_MM

# Seed 0, three studies: one benign, one malignant (mass + calcifications), one normal.
SEED = 0
STUDIES = 3
BTO = BreastTomosynthesisImageStorage
MAMMO = DigitalMammographyXRayImageStorageForPresentation


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth")
    records = generate_studies(out, SynthOptions(studies=STUDIES, seed=SEED))
    return out, records


def _pixel_hashes(out: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        hashes[ds.SOPInstanceUID] = hashlib.sha256(ds.PixelData).hexdigest()
    return hashes


def _labels(out: Path) -> list[dict[str, str]]:
    with (out / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_labels_csv_has_a_row_per_view_and_modality(generated):
    out, records = generated
    rows = _labels(out)
    assert len(rows) == STUDIES * 4 * 3
    for col in ("study_uid", "patient_id", "laterality", "view", "modality", "sop_instance_uid",
                "benign", "malignant", "path", "seg_path", "lesion_count"):
        assert col in rows[0]
    for study in records:
        mine = [r for r in rows if r["study_uid"] == study.study_uid]
        keys = {(r["laterality"], r["view"], r["modality"]) for r in mine}
        assert keys == {(lat, view, m) for lat in "LR" for view in ("CC", "MLO")
                        for m in ("dbt", "ffdm", "s2d")}
        for row in mine:
            assert (out / row["path"]).is_file()
            assert (out / row["seg_path"]).is_file()
    categories = {s.category for s in records}
    assert categories == {"normal", "benign", "malignant"}
    normal = next(s for s in records if s.category == "normal")
    assert all(im.benign == im.malignant == 0 and not im.findings for im in normal.images)
    malignant = next(s for s in records if s.category == "malignant")
    assert any(im.malignant for im in malignant.images)


def test_same_seed_same_bytes_other_seed_differs(generated, tmp_path: Path):
    out, _ = generated
    again = generate_studies(tmp_path / "again", SynthOptions(studies=1, seed=SEED))
    first = out / again[0].patient_id
    for path in sorted((tmp_path / "again").rglob("*.dcm")):
        twin = first / path.relative_to(tmp_path / "again" / again[0].patient_id)
        assert path.read_bytes() == twin.read_bytes(), path
    other = generate_studies(tmp_path / "other", SynthOptions(studies=1, seed=SEED + 1,
                                                              modalities=("ffdm",)))
    assert other[0].study_uid != again[0].study_uid
    first_ffdm = next(im for im in again[0].images if im.modality == "ffdm")
    other_ffdm = next(im for im in other[0].images if im.modality == "ffdm")
    assert first_ffdm.sop_instance_uid != other_ffdm.sop_instance_uid
    assert (pydicom.dcmread(first_ffdm.path).PixelData
            != pydicom.dcmread(other_ffdm.path).PixelData)


def test_modalities_are_tagged_and_tied_together(generated):
    _, records = generated
    study = records[0]
    by_key = {(im.modality, im.laterality, im.view): im for im in study.images}
    for (modality, lat, view), im in by_key.items():
        ds = pydicom.dcmread(im.path)
        assert ds.StudyInstanceUID == study.study_uid
        assert ds.PatientID == study.patient_id
        assert re.fullmatch(r"SYNTH\^\d{4}", str(ds.PatientName))
        assert ds.FrameOfReferenceUID == study.frame_of_reference_uid
        assert ds.ImageLaterality == lat
        code = {"CC": "399162004", "MLO": "399368009"}[view]
        assert ds.ViewCodeSequence[0].CodeValue == code
        assert ds.BitsAllocated == 16 and 12 <= ds.BitsStored <= 14
        assert ds.PatientOrientation[0] == ("A" if lat == "L" else "P")
        if modality == "dbt":
            assert ds.SOPClassUID == BTO
            shared = ds.SharedFunctionalGroupsSequence[0]
            assert shared.PixelMeasuresSequence[0].PixelSpacing == [DBT_PIXEL_MM, DBT_PIXEL_MM]
            assert "PlaneOrientationSequence" in shared
            assert shared.FrameVOILUTSequence[0].WindowWidth > 0
            assert shared.FrameAnatomySequence[0].FrameLaterality == lat
            assert ds.NumberOfFrames == im.shape[0] >= 10
            assert min(ds.Rows, ds.Columns) >= 256
        else:
            assert ds.SOPClassUID == MAMMO
            assert ds.WindowWidth > 0
            spacing = FFDM_PIXEL_MM if modality == "ffdm" else DBT_PIXEL_MM
            assert [float(v) for v in ds.ImagerPixelSpacing] == [spacing, spacing]
        if modality == "ffdm":
            assert list(ds.ImageType)[:2] == ["ORIGINAL", "PRIMARY"]
        if modality == "s2d":
            assert list(ds.ImageType)[:2] == ["DERIVED", "PRIMARY"]
            assert "Synthetic 2D" in ds.SeriesDescription
            ref = ds.SourceImageSequence[0]
            assert ref.ReferencedSOPInstanceUID == by_key[("dbt", lat, view)].sop_instance_uid
            assert ref.ReferencedSOPClassUID == BTO


def _seg_frame(seg: pydicom.Dataset, segment: int, source_frame: int | None) -> np.ndarray:
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber != segment:
            continue
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        if source_frame is None or ref.ReferencedFrameNumber == source_frame + 1:
            return pixels[i]
    raise AssertionError(f"no SEG frame for segment {segment}, source frame {source_frame}")


def test_seg_references_image_and_covers_findings(generated):
    out, records = generated
    entries = json.loads((out / "findings.json").read_text())
    images = {im.sop_instance_uid: im for s in records for im in s.images}
    assert entries and {e["kind"] for e in entries} >= {"benign mass", "malignant mass",
                                                        "calcification cluster"}
    for e in entries:
        im = images[e["sop_instance_uid"]]
        seg = pydicom.dcmread(im.seg_path)
        assert seg.SOPInstanceUID == e["seg_sop_instance_uid"]
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert referenced.ReferencedSOPInstanceUID == im.sop_instance_uid
        segment = 2 if e["malignant"] else 1
        mask = _seg_frame(seg, segment, e["frame"] if im.modality == "dbt" else None)
        row, col = round(e["row"]), round(e["col"])
        assert mask[row, col] == 1, e
        # The mask lies around the centre, within the finding's radius (+ margin).
        rows, cols = np.nonzero(mask)
        dist = np.hypot(rows - e["row"], cols - e["col"])
        assert np.percentile(dist, 90) <= 2.5 * e["radius_px"] + 10


def test_finding_positions_agree_across_modalities(generated):
    out, _ = generated
    entries = json.loads((out / "findings.json").read_text())
    for e in entries:
        if e["modality"] != "dbt":
            continue
        twins = [t for t in entries if t["study_uid"] == e["study_uid"]
                 and (t["laterality"], t["view"], t["index"]) == (e["laterality"], e["view"],
                                                                  e["index"])]
        for t in twins:
            scale = DBT_PIXEL_MM / (FFDM_PIXEL_MM if t["modality"] == "ffdm" else DBT_PIXEL_MM)
            assert abs((e["row"] + 0.5) * scale - 0.5 - t["row"]) < 1.0
            assert abs((e["col"] + 0.5) * scale - 0.5 - t["col"]) < 1.0


def test_malignant_mass_is_brighter_in_its_dbt_slice(generated):
    out, records = generated
    entries = json.loads((out / "findings.json").read_text())
    masses = [e for e in entries if e["kind"] == "malignant mass" and e["modality"] == "dbt"]
    assert masses
    images = {im.sop_instance_uid: im for s in records for im in s.images}
    for e in masses:
        im = images[e["sop_instance_uid"]]
        volume = pydicom.dcmread(im.path).pixel_array.astype(np.float32)
        mask = _seg_frame(pydicom.dcmread(im.seg_path), 2, e["frame"]).astype(bool)
        frame = volume[e["frame"]]
        yy, xx = np.indices(frame.shape)
        dist = np.hypot(yy - e["row"], xx - e["col"])
        ring = (dist < e["radius_px"] * 2 + 20) & ~mask & (frame > 500)  # breast, not air
        assert frame[mask].mean() > frame[ring].mean() + 50
        # Out of plane, the finding is fainter: the slice well away from it shows less.
        away = e["frame"] + 6 if e["frame"] + 6 < volume.shape[0] else e["frame"] - 6
        contrast_here = frame[mask].mean() - frame[ring].mean()
        contrast_away = volume[away][mask].mean() - volume[away][ring].mean()
        assert contrast_away < contrast_here


def test_single_frame_layout_and_per_frame_geometry(tmp_path: Path):
    out = tmp_path / "sf"
    [study] = generate_studies(out, SynthOptions(studies=1, seed=1, modalities=("dbt",),
                                                 dbt_layout="single-frame"))
    im = study.images[0]
    assert im.path.is_dir() and len(im.paths) == im.shape[0]
    assert [p.name for p in im.paths[:2]] == ["slice_000.dcm", "slice_001.dcm"]
    slices = [pydicom.dcmread(p) for p in im.paths]
    assert len({ds.SOPInstanceUID for ds in slices}) == len(slices)
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    assert np.allclose(steps, 1.0)
    assert [ds.InstanceNumber for ds in slices] == list(range(1, len(slices) + 1))
    seg = pydicom.dcmread(im.seg_path)
    refs = {r.ReferencedSOPInstanceUID
            for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs <= {ds.SOPInstanceUID for ds in slices}

    [study] = generate_studies(tmp_path / "pf", SynthOptions(studies=1, seed=1,
                                                             modalities=("dbt",),
                                                             dbt_geometry="per-frame"))
    ds = pydicom.dcmread(study.images[0].path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert "PlaneOrientationSequence" not in shared and "PixelMeasuresSequence" not in shared
    for item in ds.PerFrameFunctionalGroupsSequence:
        assert "PlaneOrientationSequence" in item and "PixelMeasuresSequence" in item


def test_j2k_is_lossless(generated, tmp_path: Path):
    out, records = generated
    [study] = generate_studies(tmp_path, SynthOptions(studies=1, seed=SEED,
                                                      transfer_syntax="j2k",
                                                      modalities=("dbt", "ffdm")))
    for im in study.images:
        ds = pydicom.dcmread(im.path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
        twin = next(t for t in records[0].images if t.sop_instance_uid == im.sop_instance_uid)
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(twin.path).pixel_array)


def test_options_are_validated():
    with pytest.raises(ValueError, match="studies"):
        SynthOptions(studies=0)
    with pytest.raises(ValueError, match="size"):
        SynthOptions(size="tiny")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="modalities"):
        SynthOptions(modalities=("dbt", "ct"))
    assert SynthOptions(modalities="s2d,dbt").modalities == ("dbt", "s2d")


def test_cli_writes_studies(tmp_path: Path):
    from dicomnode.cli import cli

    result = CliRunner().invoke(cli, ["synth", str(tmp_path / "o"), "--studies", "1",
                                      "--seed", "2", "--modalities", "ffdm,s2d"])
    assert result.exit_code == 0, result.output
    rows = _labels(tmp_path / "o")
    assert len(rows) == 8 and {r["modality"] for r in rows} == {"ffdm", "s2d"}


@pytest.mark.parametrize("args", [["--studies", "0"], ["--studies", "x"],
                                  ["--studies", "1", "--size", "huge"],
                                  ["--studies", "1", "--modalities", "dbt,mri"]])
def test_cli_bad_argument_is_one_line_usage_error(tmp_path: Path, args: list[str]):
    from dicomnode.cli import cli

    result = CliRunner().invoke(cli, ["synth", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.dicom3tools
def test_every_object_kind_passes_dciodvfy(tmp_path: Path):
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy
    checked = []
    for ts in ("explicit", "j2k"):
        for layout in ("enhanced", "single-frame"):
            out = tmp_path / f"{ts}-{layout}"
            # Seed 1's first study has a malignant and a benign mass in the right breast: both
            # SEG segments filled there, empty SEGs on the left. The single-frame run adds the
            # DBT slice IOD and its SEG.
            modalities = ("dbt", "ffdm", "s2d") if layout == "enhanced" else ("dbt",)
            [study] = generate_studies(out, SynthOptions(studies=1, seed=1, transfer_syntax=ts,
                                                         dbt_layout=layout,
                                                         modalities=modalities))
            images = [im for im in study.images if im.view == "CC"]
            files = [im.paths[len(im.paths) // 2] for im in images]
            files += [im.seg_path for im in images]
            for path in files:
                run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True,
                                     timeout=120)
                report = run.stdout + run.stderr
                errors = [line for line in report.splitlines() if line.startswith("Error")]
                assert not errors, f"{path}:\n" + "\n".join(errors)
                checked.append(path)
    assert len(checked) == 2 * (6 + 2) * 2
