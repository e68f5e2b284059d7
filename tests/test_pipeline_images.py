"""Loading breast DICOM into (D, H, W) arrays: layouts, geometry, pixels, laterality, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    BreastProjectionXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MediaStorageDirectoryStorage,
    RLELossless,
)

from dicomnode.errors import UnusableImageError
from dicomnode.pipeline.images import (
    DecodeError,
    FrameSizeMismatchError,
    NoPixelDataError,
    NotABreastImageError,
    NotDicomError,
    SliceOrderError,
    UnknownLateralityError,
    UnsupportedPhotometricError,
    describe_dataset,
    load_image,
    load_images,
    scan_images,
)
from tests.support.dicom import (
    CT,
    phantom,
    write_enhanced_dbt,
    write_mammo,
    write_seg_like,
    write_slice_series,
)

SYNTAXES = [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless]


@pytest.mark.parametrize("transfer_syntax", SYNTAXES)
@pytest.mark.parametrize("geometry", ["shared", "per-frame"])
def test_enhanced_dbt_round_trip(tmp_path: Path, transfer_syntax: str, geometry: str) -> None:
    vol = phantom(6, 64, 48, "R", seed=3)
    ds = write_enhanced_dbt(tmp_path / "dbt.dcm", vol, laterality="R", view="MLO",
                            geometry=geometry, transfer_syntax=transfer_syntax,
                            spacing=(0.1, 0.12))
    image = load_image(tmp_path / "dbt.dcm")
    assert image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels, vol.astype(np.float32))
    assert image.modality == "dbt"
    assert (image.laterality, image.laterality_source, image.view) == ("R", "tag", "MLO")
    assert image.pixel_spacing == (0.1, 0.12)
    assert image.sop_instance_uids == [ds.SOPInstanceUID] * 6
    assert image.frame_numbers == [1, 2, 3, 4, 5, 6]
    assert image.transfer_syntax_uid == transfer_syntax
    assert image.source_paths == [tmp_path / "dbt.dcm"]
    assert image.study_uid == ds.StudyInstanceUID
    assert image.series_uid == ds.SeriesInstanceUID
    assert image.frame_of_reference_uid == ds.FrameOfReferenceUID
    # positions step 1 mm along the normal, in frame order
    along = image.slice_positions @ image.slice_normal
    np.testing.assert_allclose(np.diff(along), 1.0)
    # what pydicom itself decodes, frame for frame
    np.testing.assert_array_equal(image.pixels, pydicom.dcmread(tmp_path / "dbt.dcm").pixel_array)


def test_enhanced_dbt_keeps_descending_frame_order(tmp_path: Path) -> None:
    vol = phantom(5, 32, 24)
    write_enhanced_dbt(tmp_path / "d.dcm", vol, descending=True)
    image = load_image(tmp_path / "d.dcm")
    np.testing.assert_array_equal(image.pixels, vol)
    assert image.frame_numbers == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(np.diff(image.slice_positions @ image.slice_normal), -1.0)


@pytest.mark.parametrize("classic", [False, True], ids=["dbt-class", "mammo-class"])
@pytest.mark.parametrize("instance_numbers", [True, False])
def test_single_frame_series_sorted_by_position(tmp_path: Path, instance_numbers: bool,
                                                classic: bool) -> None:
    vol = phantom(7, 40, 32, "L", seed=1)
    written = write_slice_series(tmp_path / "series", vol, laterality="L", view="MLO",
                                 instance_numbers=instance_numbers, classic=classic)
    (image,) = load_images([tmp_path])
    np.testing.assert_array_equal(image.pixels, vol)
    assert image.sop_instance_uids == [ds.SOPInstanceUID for ds in written]
    assert image.frame_numbers == [1] * 7
    assert len(image.source_paths) == 7
    # every slice's own file, matching its UID
    for path, uid in zip(image.source_paths, image.sop_instance_uids, strict=True):
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid
    np.testing.assert_allclose(image.slice_positions[:, 2], np.arange(7))
    assert (image.modality, image.laterality, image.view) == ("dbt", "L", "MLO")
    assert scan_images([tmp_path])[0].display_path == tmp_path / "series"


def test_two_series_and_other_objects_in_one_folder(tmp_path: Path) -> None:
    write_slice_series(tmp_path / "a", phantom(3, 32, 24, "L"), laterality="L")
    write_slice_series(tmp_path / "b", phantom(4, 32, 24, "R"), laterality="R")
    write_mammo(tmp_path / "ffdm.dcm", phantom(1, 50, 40)[0])
    write_seg_like(tmp_path / "seg.dcm")
    (tmp_path / "README.txt").write_text("not DICOM")
    images = load_images([tmp_path])
    assert sorted((im.modality, im.shape[0], im.laterality) for im in images) == [
        ("dbt", 3, "L"), ("dbt", 4, "R"), ("ffdm", 1, "L")]


def test_ffdm_and_synthetic_2d(tmp_path: Path) -> None:
    img = phantom(1, 60, 40, "L")[0]
    write_mammo(tmp_path / "ffdm.dcm", img)
    write_mammo(tmp_path / "s2d.dcm", img, synthetic=True)
    write_mammo(tmp_path / "cview.dcm", img, SeriesDescription="L CC C-View")
    write_mammo(tmp_path / "gen.dcm", img,
                ImageType=["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"])
    write_mammo(tmp_path / "tomo.dcm", img, SeriesDescription="Tomosynthesis projection view")
    names = ("ffdm.dcm", "s2d.dcm", "cview.dcm", "gen.dcm", "tomo.dcm")
    ffdm, s2d, cview, gen, tomo = (load_image(tmp_path / n) for n in names)
    assert ffdm.modality == "ffdm" and tomo.modality == "ffdm"
    assert s2d.modality == "s2d" and cview.modality == "s2d" and gen.modality == "s2d"
    assert ffdm.shape == (1, 60, 40)
    np.testing.assert_array_equal(ffdm.pixels[0], img)
    np.testing.assert_array_equal(ffdm.slice_positions, np.zeros((1, 3)))
    assert ffdm.slice_normal is None
    assert ffdm.pixel_spacing == (0.07, 0.07)


def test_monochrome1_is_inverted_and_rescale_applied(tmp_path: Path) -> None:
    img = phantom(1, 40, 30)[0]
    write_mammo(tmp_path / "m1.dcm", img, photometric="MONOCHROME1")
    np.testing.assert_array_equal(load_image(tmp_path / "m1.dcm").pixels[0], 4095.0 - img)
    write_mammo(tmp_path / "rs.dcm", img, rescale=(2.0, -100.0))
    np.testing.assert_allclose(load_image(tmp_path / "rs.dcm").pixels[0], img * 2.0 - 100.0)
    vol = phantom(3, 32, 24)
    write_enhanced_dbt(tmp_path / "dbt.dcm", vol, rescale=(0.5, 10.0))
    np.testing.assert_allclose(load_image(tmp_path / "dbt.dcm").pixels, vol * 0.5 + 10.0)


@pytest.mark.parametrize("where", ["frame", "image", "series"])
def test_laterality_from_each_tag(tmp_path: Path, where: str) -> None:
    write_enhanced_dbt(tmp_path / "d.dcm", phantom(3, 32, 24, "R"), laterality="R",
                       laterality_in=where)
    image = load_image(tmp_path / "d.dcm")
    assert (image.laterality, image.laterality_source) == ("R", "tag")


@pytest.mark.parametrize("side", ["L", "R"])
def test_laterality_from_image_when_tags_missing(tmp_path: Path, side: str) -> None:
    write_enhanced_dbt(tmp_path / "d.dcm", phantom(4, 64, 48, side), laterality=None)
    write_mammo(tmp_path / "m.dcm", phantom(1, 64, 48, side)[0], laterality=None)
    for name in ("d.dcm", "m.dcm"):
        image = load_image(tmp_path / name)
        assert (image.laterality, image.laterality_source) == (side, "image")


def test_view_codes(tmp_path: Path) -> None:
    img = phantom(1, 32, 24)[0]
    write_mammo(tmp_path / "cc.dcm", img, view="CC")
    write_mammo(tmp_path / "none.dcm", img, view=None)
    write_mammo(tmp_path / "pos.dcm", img, view=None, ViewPosition="XCCL")
    assert load_image(tmp_path / "cc.dcm").view == "CC"
    assert load_image(tmp_path / "none.dcm").view == ""
    assert load_image(tmp_path / "pos.dcm").view == "XCCL"


# ------------------------------------------------------------------ unusable input


def _raises(exc_type: type[Exception], path: Path, uid: str) -> None:
    with pytest.raises(exc_type) as info:
        load_images([path])
    assert isinstance(info.value, UnusableImageError)
    assert uid in str(info.value)


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = write_mammo(tmp_path / "m.dcm", phantom(1, 32, 24)[0], pixels=False)
    _raises(NoPixelDataError, tmp_path / "m.dcm", ds.SOPInstanceUID)


def test_frames_of_different_sizes(tmp_path: Path) -> None:
    written = write_slice_series(tmp_path / "s", phantom(4, 32, 24),
                                 sizes=[(32, 24), (30, 24)])
    _raises(FrameSizeMismatchError, tmp_path, written[0].SeriesInstanceUID)


def test_duplicate_slice_positions(tmp_path: Path) -> None:
    written = write_slice_series(tmp_path / "s", phantom(2, 32, 24))
    again = pydicom.dcmread(next((tmp_path / "s").iterdir()))
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    again.save_as(tmp_path / "s" / "copy.dcm")
    _raises(SliceOrderError, tmp_path, written[0].SeriesInstanceUID)


def test_unsupported_photometric(tmp_path: Path) -> None:
    ds = write_mammo(tmp_path / "m.dcm", phantom(1, 32, 24)[0], photometric="PALETTE COLOR")
    _raises(UnsupportedPhotometricError, tmp_path / "m.dcm", ds.SOPInstanceUID)


def test_not_a_breast_image(tmp_path: Path) -> None:
    ds = write_mammo(tmp_path / "ct.dcm", phantom(1, 32, 24)[0], sop_class=CT,
                     modality="CT", body_part="CHEST")
    _raises(NotABreastImageError, tmp_path / "ct.dcm", ds.SOPInstanceUID)
    # the same SOP class from a breast exam is taken as a 2D breast image
    write_mammo(tmp_path / "b.dcm", phantom(1, 32, 24)[0], sop_class=CT, modality="MG")
    assert load_image(tmp_path / "b.dcm").modality == "ffdm"


def test_non_image_objects(tmp_path: Path) -> None:
    seg = write_seg_like(tmp_path / "seg.dcm")
    assert load_images([tmp_path]) == []
    assert load_images([tmp_path / "seg.dcm"]) == []
    with pytest.raises(NotABreastImageError, match=seg.SOPInstanceUID):
        load_image(tmp_path / "seg.dcm")


def test_dicomdir_and_duplicates(tmp_path: Path) -> None:
    write_mammo(tmp_path / "m.dcm", phantom(1, 32, 24)[0])
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = "TEST"
    ds.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    images = load_images([tmp_path, tmp_path / "m.dcm"])  # the file once, DICOMDIR skipped
    assert len(images) == 1


def test_not_dicom(tmp_path: Path) -> None:
    (tmp_path / "x.dcm").write_bytes(b"\x00" * 300)
    assert load_images([tmp_path]) == []  # skipped inside a folder
    with pytest.raises(NotDicomError, match="x.dcm"):
        load_images([tmp_path / "x.dcm"])


def test_unknown_laterality(tmp_path: Path) -> None:
    ds = write_mammo(tmp_path / "m.dcm", np.zeros((32, 24), np.uint16), laterality=None)
    _raises(UnknownLateralityError, tmp_path / "m.dcm", ds.SOPInstanceUID)


def test_corrupt_pixel_data(tmp_path: Path) -> None:
    ds = write_enhanced_dbt(tmp_path / "d.dcm", phantom(3, 64, 48),
                            transfer_syntax=JPEG2000Lossless)
    raw = pydicom.dcmread(tmp_path / "d.dcm")
    raw.PixelData = raw.PixelData[:200] + b"\x00" * 64 + raw.PixelData[-10:]
    raw.save_as(tmp_path / "d.dcm")
    _raises(DecodeError, tmp_path / "d.dcm", ds.SOPInstanceUID)


def test_breast_projection_stack_is_refused(tmp_path: Path) -> None:
    ds = write_enhanced_dbt(tmp_path / "p.dcm", phantom(3, 32, 24),
                            SOPClassUID=BreastProjectionXRayImageStorageForPresentation)
    _raises(NotABreastImageError, tmp_path / "p.dcm", ds.SOPInstanceUID)


@pytest.mark.slow
def test_decoding_in_worker_processes_gives_the_same_volume(tmp_path: Path) -> None:
    vol = phantom(5, 64, 48, "R", seed=5)
    write_enhanced_dbt(tmp_path / "dbt.dcm", vol, laterality="R", descending=True,
                       transfer_syntax=JPEG2000Lossless)
    write_slice_series(tmp_path / "series", vol, laterality="R",
                       transfer_syntax=JPEG2000Lossless)
    for image in load_images([tmp_path], workers=2):
        np.testing.assert_array_equal(image.pixels, vol)


def test_multi_frame_2d_image_is_refused(tmp_path: Path) -> None:
    ds = write_mammo(tmp_path / "m.dcm", phantom(2, 32, 24), NumberOfFrames=2)
    _raises(NotABreastImageError, tmp_path / "m.dcm", ds.SOPInstanceUID)


def test_describe_dataset_in_memory(tmp_path: Path) -> None:
    write_enhanced_dbt(tmp_path / "d.dcm", phantom(3, 32, 24, "R"), laterality="R", view="MLO")
    ds = pydicom.dcmread(tmp_path / "d.dcm", stop_before_pixels=True)
    assert describe_dataset(ds) == ("dbt", "R", "MLO")
    seg = write_seg_like(tmp_path / "seg.dcm")
    with pytest.raises(NotABreastImageError, match=seg.SOPInstanceUID):
        describe_dataset(seg, "received")
