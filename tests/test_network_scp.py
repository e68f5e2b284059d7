"""The Storage SCP against real peers (dcmtk storescu) and hostile ones (pynetdicom SCU)."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SegmentationStorage, generate_uid
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.support.scp import (
    BTO,
    MG,
    Node,
    associate,
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


@pytest.mark.dcmtk
def test_storescu_study_is_archived_byte_for_byte(node: Node, study: Path) -> None:
    files = image_files(study)
    proc = storescu(node, files)
    assert proc.returncode == 0, proc.stderr
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    archived = node.store.study_instances(study_uid)
    assert len(archived) == len(files) == 12
    by_uid = {a.sop_instance_uid: a for a in archived}
    for path in files:
        sent = dcmread(path)
        got = dcmread(by_uid[sent.SOPInstanceUID].path)
        assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert got.PixelData == sent.PixelData  # stored as received
    rows = {(a.modality, a.laterality, a.view) for a in archived}
    assert {("dbt", "L", "CC"), ("s2d", "R", "MLO"), ("ffdm", "L", "MLO")} <= rows
    # re-sending the same study stores nothing twice
    assert storescu(node, files).returncode == 0
    assert len(node.store.study_instances(study_uid)) == 12


@pytest.mark.dcmtk
def test_storescu_sends_jpeg2000_as_received(node: Node, synth_study) -> None:
    # the DBT of the JPEG 2000 variant test_network_instance_checks sends too
    out = synth_study(**SMALL, transfer_syntax="j2k")
    files = sorted(out.glob("*/dbt/*.dcm"))
    proc = storescu(node, files, "-xv")  # propose JPEG 2000 lossless
    assert proc.returncode == 0, proc.stderr
    archived = node.store.study_instances(dcmread(files[0], stop_before_pixels=True)
                                          .StudyInstanceUID)
    assert {a.transfer_syntax for a in archived} == {JPEG2000Lossless}
    by_uid = {a.sop_instance_uid: a for a in archived}
    for path in files:
        sent = dcmread(path)
        # the JPEG 2000 codestream is archived as received: never decoded or re-encoded
        assert dcmread(by_uid[sent.SOPInstanceUID].path).PixelData == sent.PixelData


def test_unknown_calling_ae_is_rejected(node: Node) -> None:
    assoc = associate(node, [Verification], calling="STRANGER")
    assert assoc.is_rejected
    assert node.store.audit_trail()[-1].status == "calling_ae"
    assert still_serves(node)


def test_wrong_called_ae_is_rejected(node: Node) -> None:
    assoc = associate(node, [Verification], called="SOMEONEELSE")
    assert assoc.is_rejected
    assert still_serves(node)


def _small_mammo(study: Path) -> Dataset:
    return dcmread(next(iter(sorted(study.glob("*/ffdm/*.dcm")))))


def ct_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "X"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_unsupported_sop_class_gets_0122(node: Node) -> None:
    ds = ct_dataset()
    status, comment = store_status(node, ds, CTImageStorage)
    assert status == 0x0122 and "not a breast image" in comment
    assert still_serves(node)


def test_unsupported_sop_class_can_be_stored_and_ignored(tmp_path: Path) -> None:
    n = Node(tmp_path, other="store")
    try:
        ds = ct_dataset()
        assert store_status(n, ds, CTImageStorage)[0] == 0x0000
        assert len(n.store.study_instances(ds.StudyInstanceUID)) == 1
    finally:
        n.close()


def test_truncated_dataset_is_refused(node: Node, study: Path, tmp_path: Path) -> None:
    source = sorted(study.glob("*/ffdm/*.dcm"))[0]
    data = source.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 5000])
    status, comment = store_status(node, truncated, MG)
    # pynetdicom's SCU may send the short value with a corrected length: then the length
    # no longer matches the image dimensions; either way the node refuses it
    assert status == 0xC000 and ("truncated" in comment or "dimensions say" in comment)
    assert not list((node.store.archive.root).rglob("*.dcm"))
    assert still_serves(node)


def test_sop_class_that_does_not_match_content_gets_a900(node: Node, study: Path) -> None:
    ds = _small_mammo(study)
    ds.SOPClassUID = BTO  # a 2D image claiming to be a tomosynthesis volume
    ds.file_meta.MediaStorageSOPClassUID = BTO
    status, comment = store_status(node, ds, BTO)
    assert status == 0xA900 and "DBT" in comment
    assert still_serves(node)


@pytest.mark.parametrize("rows,cols,frames", [(65535, 65535, 1000), (4000, 4000, 1)])
def test_absurd_declared_pixel_size_is_refused(node: Node, study: Path, rows: int, cols: int,
                                               frames: int) -> None:
    ds = _small_mammo(study)
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    status, comment = store_status(node, ds, MG)
    assert status == 0xC000 and "bytes" in comment
    assert still_serves(node)


def test_low_disk_gives_a700_and_keeps_what_is_stored(tmp_path: Path, study: Path) -> None:
    n = Node(tmp_path, min_free_bytes=2**62)  # more than any disk: below the watermark
    try:
        ds = _small_mammo(study)
        status, comment = store_status(n, ds, MG)
        assert status == 0xA700 and "disk" in comment
        assert still_serves(n)
    finally:
        n.close()


def test_identical_resend_and_changed_resend(node: Node, study: Path) -> None:
    ds = _small_mammo(study)
    assert store_status(node, ds, MG)[0] == 0
    assert store_status(node, ds, MG)[0] == 0
    changed = copy.deepcopy(ds)
    arr = changed.pixel_array.copy()
    arr[0, 0] = (int(arr[0, 0]) + 1) % 4096
    changed.PixelData = arr.astype(np.uint16).tobytes()
    assert store_status(node, changed, MG)[0] == 0
    archived = node.store.study_instances(ds.StudyInstanceUID)
    assert len(archived) == 1
    assert dcmread(archived[0].path).pixel_array[0, 0] == arr[0, 0]


def test_bit_packed_seg_is_stored_when_other_classes_are_kept(tmp_path: Path, study: Path) -> None:
    # a BINARY SEG's 1-bit pixel data is packed and padded to even length
    n = Node(tmp_path, other="store")
    try:
        seg = sorted(study.glob("*/seg/*.dcm"))[0]
        assert store_status(n, seg, SegmentationStorage)[0] == 0x0000
    finally:
        n.close()


def test_study_is_not_complete_while_its_association_is_open(tmp_path: Path,
                                                              study: Path) -> None:
    """The idle timer runs from the association's close: its next instance may still be on
    the wire (a C-STORE reaches the node only once complete)."""
    node = Node(tmp_path, hold_seconds=0.1)
    first, second = sorted(study.glob("*/dbt/*.dcm"))[:2]
    queued: list[int] = []
    try:
        assoc = associate(node, [BTO])
        assert assoc.is_established
        try:
            assert assoc.send_c_store(first).Status == 0
            # three idle times pass with the association open (as during a slow transfer)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                queued += node.store.mark_ready(idle_seconds=0.5)
                time.sleep(0.05)
            assert queued == []
            assert assoc.send_c_store(second).Status == 0
        finally:
            assoc.release()
        deadline = time.monotonic() + 10
        while not queued and time.monotonic() < deadline:
            queued += node.store.mark_ready(idle_seconds=0.5)
            time.sleep(0.05)
        [job_id] = queued
        assert len(node.store.study_instances(node.store.get_job(job_id).study_uid)) == 2
    finally:
        node.close()


def test_hold_interval_stays_under_the_shortest_idle_time() -> None:
    from dicomnode.config import Config, PeerConfig
    from dicomnode.network.scp import HOLD_SECONDS
    from dicomnode.wiring import hold_interval

    config = Config()
    assert hold_interval(config) == HOLD_SECONDS  # the default 30 s idle time
    config.peers = [PeerConfig("FAST", idle_seconds=2.0), PeerConfig("SLOW")]
    assert hold_interval(config) == 0.5


def test_only_stale_incoming_datasets_are_swept(tmp_path: Path) -> None:
    """At start the SCP removes what a killed process left half-received, not a live one's."""
    import os

    from dicomnode.network.guard import sweep_incoming

    incoming = tmp_path / "incoming"
    assert sweep_incoming(incoming) == 0 and incoming.is_dir()  # made if missing
    old, fresh, other = incoming / "a.dcm", incoming / "b.dcm", incoming / "notes.txt"
    for path in (old, fresh, other):
        path.write_bytes(b"x")
    for path in (old, other):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert sweep_incoming(incoming) == 1
    assert not old.exists() and fresh.exists() and other.exists()
