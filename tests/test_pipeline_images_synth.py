"""Round trip with the project's generator: synth -> load returns the volume that was written.

The files are also read independently (pydicom's pixel_array, slices ordered by the
generator's file names) to compare, and both DBT layouts of one seed must load alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.pipeline.images import BreastImage, load_image, load_images
from gmic.preprocess import preprocess

SLOW = pytest.mark.slow


def _generate(synth_study, **options) -> Path:
    """The session's study of seed 0 with these options (shared: read only)."""
    opts = dict(studies=1, size="small", seed=0, transfer_syntax="explicit",
                modalities=("dbt", "ffdm", "s2d"), dbt_layout="enhanced",
                dbt_geometry="shared")
    opts.update(options)
    return synth_study(**opts)


def _independent(paths: list[Path]) -> np.ndarray:
    """(D, H, W) float32 straight from pydicom, one frame per slice file or all frames of one."""
    frames = []
    for path in paths:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float32)
        arr = arr.reshape(-1, ds.Rows, ds.Columns)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = float((1 << ds.BitsStored) - 1) - arr
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        frames.append(arr * slope + intercept)
    return np.concatenate(frames)


def _expect_name(image: BreastImage, name: str) -> None:
    lat, view = name.split("_")[:2]
    assert (image.laterality, image.laterality_source) == (lat, "tag")
    assert image.view == view


@pytest.mark.parametrize("geometry", ["shared", "per-frame"])
@pytest.mark.parametrize("syntax", ["explicit", pytest.param("j2k", marks=SLOW)])
def test_synth_enhanced_round_trip(synth_study, syntax: str, geometry: str) -> None:
    out = _generate(synth_study, transfer_syntax=syntax, dbt_geometry=geometry)
    files = sorted(f for f in out.glob("*/*/*.dcm") if f.parent.name != "seg")
    assert {f.parent.name for f in files} == {"dbt", "ffdm", "s2d"}
    for path in files:
        image = load_image(path)
        assert image.modality == path.parent.name
        _expect_name(image, path.stem)
        expected = _independent([path])
        assert image.shape == expected.shape
        np.testing.assert_array_equal(image.pixels, expected)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert image.sop_instance_uids == [ds.SOPInstanceUID] * image.shape[0]
        assert image.frame_numbers == list(range(1, image.shape[0] + 1))
        assert image.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
        if image.modality == "dbt":
            assert image.shape[0] > 1 and image.slice_normal is not None
            steps = np.diff(image.slice_positions @ image.slice_normal)
            assert np.allclose(np.abs(steps), 1.0, atol=1e-3)  # 1 mm slices, monotonic
            assert np.all(steps > 0) or np.all(steps < 0)
        else:
            assert image.shape[0] == 1


@pytest.mark.parametrize("syntax", ["explicit", pytest.param("j2k", marks=SLOW)])
def test_synth_single_frame_round_trip(synth_study, syntax: str) -> None:
    single = _generate(synth_study, transfer_syntax=syntax, modalities=("dbt",),
                       dbt_layout="single-frame")
    enhanced = _generate(synth_study, transfer_syntax=syntax, modalities=("dbt",))
    folders = sorted(p for p in single.glob("*/dbt/*") if p.is_dir())
    assert folders
    for folder in folders:
        (image,) = load_images([folder])
        _expect_name(image, folder.name)
        slices = sorted(folder.glob("*.dcm"))
        np.testing.assert_array_equal(image.pixels, _independent(slices))  # file-name order
        assert image.source_paths == slices
        assert image.frame_numbers == [1] * len(slices)
        uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in slices]
        assert image.sop_instance_uids == uids
        # the same seed's enhanced DBT of this view loads to the same volume, slice for slice
        twin = load_image(next(enhanced.glob(f"*/dbt/{folder.name}.dcm")))
        np.testing.assert_array_equal(image.pixels, twin.pixels)
        np.testing.assert_allclose(image.slice_positions, twin.slice_positions, atol=1e-4)
    # a whole study folder: one volume per view, nothing else
    assert len(load_images([single])) == len(folders)


@pytest.mark.parametrize("layout", ["enhanced", "single-frame"])
def test_synth_findings_survive_preprocessing(synth_study, layout: str) -> None:
    """Each finding's (frame, row, col) lies in its image, on the slice the generator names,
    and maps into the model window and back to the same source pixel."""
    out = _generate(synth_study, dbt_layout=layout)
    items = json.loads((out / "findings.json").read_text())
    images = {}
    for image in load_images([out]):  # the ground-truth SEGs under seg/ are skipped
        for uid in set(image.sop_instance_uids):
            images[uid] = image
    for finding in items:
        image = images[finding["sop_instance_uid"]]
        assert (image.modality, image.laterality, image.view) == (
            finding["modality"], finding["laterality"], finding["view"])
        row, col = int(round(finding["row"])), int(round(finding["col"]))
        frame = int(finding["frame"] or 0)
        assert 0 <= frame < image.shape[0] and 0 <= row < image.shape[1]
        assert 0 <= col < image.shape[2]
        if finding.get("frame_sop_instance_uid"):  # single-frame DBT: the slice named is ours
            assert image.sop_instance_uids[frame] == finding["frame_sop_instance_uid"]
        size = (768, 512) if image.modality == "ffdm" else (512, 384)
        _, transform = preprocess(image.pixels, image.modality, image.laterality,
                                  input_size=size)
        f, r, c = transform.to_model(frame, row, col)
        assert transform.in_window(row, col), (finding, transform)
        assert transform.to_source(f, r, c) == (frame, row, col)
    assert items


def test_synth_laterality_from_image_when_tags_removed(tmp_path: Path, synth_study) -> None:
    """The image-content fallback agrees with the generator's tags on every view, and the
    preprocessing flips exactly the right breasts."""
    out = _generate(synth_study, modalities=("dbt", "s2d"))
    for path in sorted(out.glob("*/*/[LR]_*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in ("ImageLaterality", "Laterality"):
            if keyword in ds:
                delattr(ds, keyword)
        for group in ds.get("SharedFunctionalGroupsSequence", []):
            for item in group.get("FrameAnatomySequence", []):
                if "FrameLaterality" in item:
                    del item.FrameLaterality
        stripped = tmp_path / "stripped.dcm"
        ds.save_as(stripped)
        image = load_image(stripped)
        assert (image.laterality, image.laterality_source) == (path.stem[0], "image"), path
        _, transform = preprocess(image.pixels, image.modality, None, input_size=(512, 384))
        assert transform.flipped == (path.stem[0] == "R")
