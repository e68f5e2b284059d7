"""Receipt-time checks (issue 15, items 5 and 6): what the worker cannot use is refused with
its C-STORE status, and the vendor variants it can use are stored, over real DICOM."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless
from pynetdicom import AE
from pynetdicom.dsutils import encode_file_meta

from tests.support.peers import NODE_AE
from tests.support.scp import (
    BTO,
    MG,
    Node,
    image_files,
    still_serves,
    store_status,
    storescu,
)
from tests.support.synth import SMALL


@pytest.fixture(scope="module")
def study(synth_study) -> Path:
    return synth_study(**SMALL)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


JPEG2000_LOSSLESS = JPEG2000Lossless
JPEG_BASELINE = JPEGBaseline8Bit
RLE = RLELossless
JPEG_LS = JPEGLSLossless


def _mammo(study: Path) -> Dataset:
    return dcmread(sorted(study.glob("*/ffdm/*.dcm"))[0])


def _dbt(study: Path) -> Dataset:
    return dcmread(sorted(study.glob("*/dbt/*.dcm"))[0])


def send(node: Node, ds: Dataset, sop_class: str, transfer_syntax: str) -> tuple[int, str]:
    """C-STORE ``ds`` on a context of exactly ``transfer_syntax`` (what a sender whose file
    meta says so proposes); the status and Error Comment."""
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(sop_class, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status), str(rsp.get("ErrorComment", ""))
    finally:
        assoc.release()


def archived(node: Node, ds: Dataset) -> list:
    try:
        return node.store.study_instances(str(ds.StudyInstanceUID))
    except Exception:  # StudyNotFound: nothing of the study was stored
        return []


# ------------------------------------------------------------------------- item 5

@pytest.mark.parametrize("syntax", [JPEG2000_LOSSLESS, JPEG_BASELINE, RLE, JPEG_LS])
def test_native_pixel_data_under_a_compressed_syntax_is_refused(node: Node, study: Path,
                                                                syntax: str) -> None:
    ds = _mammo(study)
    ds.file_meta.TransferSyntaxUID = syntax  # the pixel data stays native
    status, comment = send(node, ds, MG, syntax)
    assert status == 0xC000, comment
    assert "native pixel data" in comment
    assert archived(node, ds) == []
    assert still_serves(node)


def test_encapsulated_pixel_data_under_a_native_syntax_is_refused(node: Node,
                                                                 study: Path) -> None:
    # pydicom's SCU re-encodes a dataset, so the bytes are built here: an encapsulated
    # body (undefined-length Pixel Data) behind a file meta that says Explicit VR LE
    from pydicom.uid import ExplicitVRLittleEndian

    from dicomnode.network.instance_checks import EncodedInstance, StoreRefused, dataset_offset
    from dicomnode.network.scp import ReceiverPolicy, archive_instance

    ds = _mammo(study)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000_LOSSLESS
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    encoded = EncodedInstance(buffer.getvalue())
    body = encoded[dataset_offset(encoded):len(encoded)]
    meta = copy.deepcopy(ds.file_meta)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    prefix = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    with pytest.raises(StoreRefused) as refused:
        archive_instance(node.store, EncodedInstance(prefix, body), ReceiverPolicy(NODE_AE),
                         calling_ae="PACS")
    assert refused.value.status == 0xC000
    assert "encapsulated pixel data" in refused.value.comment
    assert archived(node, ds) == []


@pytest.mark.parametrize("change,words", [
    (lambda ds: delattr(ds, "PixelRepresentation"), "Pixel Representation"),
    (lambda ds: delattr(ds, "BitsStored"), "Bits Stored"),
    (lambda ds: setattr(ds, "BitsStored", 255), "Bits Stored"),
    (lambda ds: setattr(ds, "PixelRepresentation", 7), "Pixel Representation"),
    (lambda ds: setattr(ds, "HighBit", 3), "High Bit"),
    (lambda ds: setattr(ds, "SamplesPerPixel", 3), "Samples"),
    (lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), "Photometric"),
], ids=["no-pixel-representation", "no-bits-stored", "bits-stored-255",
        "pixel-representation-7", "high-bit", "samples-3", "rgb"])
def test_image_pixel_module_that_cannot_be_decoded_is_refused(node: Node, study: Path,
                                                             change, words: str) -> None:
    ds = _mammo(study)
    change(ds)
    status, comment = store_status(node, ds, MG)
    assert status == 0xA900, comment
    assert words in comment
    assert archived(node, ds) == []
    assert still_serves(node)


def test_dbt_without_frame_of_reference_is_refused(node: Node, study: Path) -> None:
    ds = _dbt(study)
    del ds.FrameOfReferenceUID
    status, comment = store_status(node, ds, BTO)
    assert status == 0xA900 and "Frame of Reference" in comment
    assert archived(node, ds) == []


def test_a_good_image_still_succeeds(node: Node, study: Path) -> None:
    ds = _mammo(study)
    assert store_status(node, ds, MG) == (0x0000, "")
    assert len(archived(node, ds)) == 1


# ------------------------------------------------------------------------- item 6

def per_frame_laterality(ds: Dataset) -> Dataset:
    """The vendor variant: laterality only in each frame's Frame Anatomy."""
    ds = copy.deepcopy(ds)
    del ds.ImageLaterality
    shared = ds.SharedFunctionalGroupsSequence[0]
    anatomy = shared.FrameAnatomySequence[0]
    del shared.FrameAnatomySequence
    for item in ds.PerFrameFunctionalGroupsSequence:
        item.FrameAnatomySequence = Sequence([copy.deepcopy(anatomy)])
    return ds


def test_dbt_with_laterality_per_frame_is_stored_with_its_laterality(node: Node,
                                                                     study: Path) -> None:
    source = _dbt(study)
    ds = per_frame_laterality(source)
    status, comment = store_status(node, ds, BTO)
    assert (status, comment) == (0x0000, "")
    [row] = archived(node, ds)
    assert row.laterality == source.ImageLaterality
    assert row.modality == "dbt"


def test_dbt_with_laterality_per_frame_is_stored_as_a_file_too(node: Node, study: Path,
                                                               tmp_path: Path) -> None:
    # the same sent from a file (pynetdicom's SCU reads the file; the node parses the
    # chunked temporary file the SCP wrote)
    path = tmp_path / "perframe.dcm"
    per_frame_laterality(_dbt(study)).save_as(path, enforce_file_format=True)
    assert store_status(node, path, BTO) == (0x0000, "")


@pytest.mark.dcmtk
@pytest.mark.parametrize("variant", [
    dict(dbt_layout="single-frame"), dict(dbt_geometry="per-frame"),
    dict(transfer_syntax="j2k"), dict(dbt_geometry="per-frame", transfer_syntax="j2k"),
], ids=["single-frame", "per-frame-geometry", "j2k", "per-frame-j2k"])
def test_every_synth_variant_is_stored_through_storescu(node: Node, synth_study,
                                                        variant: dict) -> None:
    out = synth_study(**SMALL, **variant)
    files = image_files(out)
    extra = ["-xv"] if variant.get("transfer_syntax") == "j2k" else []
    proc = storescu(node, files, *extra)
    assert proc.returncode == 0, proc.stderr
    assert "Status" not in proc.stderr or "0xa900" not in proc.stderr.lower()
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    rows = node.store.study_instances(study_uid)
    assert len(rows) == len(files)
    assert all(r.laterality in ("L", "R") for r in rows)
