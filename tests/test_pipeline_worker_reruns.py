"""The worker when a study is not what it should be, or grows after its results went out
(issue 15, items 5 and 7): one image whose results cannot be built is left out and recorded,
the rest of the study gets its results; a study that grows after its results were sent gets
what it was sent superseded, never two contradicting CAD SRs at the PACS.

The model and the result builders are stand-ins here (the real ones are covered by
test_pipeline_worker and test_results_*): what is under test is the worker and the store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    MammographyCADSRStorage,
    generate_uid,
)

from dicomnode.config import Config, PeerConfig
from dicomnode.network.scp import ReceiverPolicy, archive_instance
from dicomnode.pipeline import worker as worker_module
from dicomnode.pipeline.analysis import AlgorithmIdentity, ClassProbabilities, ImageAnalysis
from dicomnode.pipeline.worker import Worker
from dicomnode.results.common import ResultsError
from storage import JobState, Store
from storage.records import DeliveryState

BASIC_TEXT_SR = BasicTextSRStorage
MAMMO_CAD_SR = MammographyCADSRStorage
KOS = KeyObjectSelectionDocumentStorage


@pytest.fixture(scope="module")
def study(synth_study) -> Path:
    out = synth_study(studies=1, size="small", seed=31, modalities=("ffdm",))
    return next(p for p in out.iterdir() if p.is_dir())


def study_files(study: Path) -> list[Path]:
    return sorted(study.glob("ffdm/*.dcm"))


class FakeModels:
    def get(self, modality: str):
        return SimpleNamespace(device="cpu", identity=None)


def fake_analysis(image, loaded) -> ImageAnalysis:
    p = ClassProbabilities(0.1, 0.2)
    return ImageAnalysis(image=image, algorithm=AlgorithmIdentity("GMIC", "0", "test", "0" * 64),
                         final=p, global_=p, local=p, regions=[],
                         saliency=np.zeros((2, 1, 1, 1), np.float32), transform=None)


def result_dataset(sources: list[Path], sop_class: str, label: str) -> Dataset:
    """A result object in the sources' study whose UID depends on its sources, as the real
    builders' do (dicomnode.results.common.result_uid, cad_sr.study_result_uid)."""
    source = dcmread(sources[0], stop_before_pixels=True)
    names = sorted(p.name for p in sources)
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*names, label])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*names, label, "series"])
    ds.Modality = "SR"
    ds.SeriesNumber = 7001
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = "20260105", "090000"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def fake_builders(bad: set[str]):
    def per_image(analysis: ImageAnalysis, breast) -> list:
        uid = analysis.image.sop_instance_uids[0]
        if uid in bad:
            raise ResultsError(f"cannot build the SEG of image {uid}: no frame of reference")
        return [(result_dataset(list(analysis.image.source_paths), BASIC_TEXT_SR, "sr"), "sr")]

    def per_study(job, analyses: list[ImageAnalysis], left_out=()) -> list:
        paths = [p for a in analyses for p in a.image.source_paths]
        return [(result_dataset(paths, MAMMO_CAD_SR, "cad-sr"), "cad-sr")]

    return per_image, per_study


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(worker_module, "analyse_image", fake_analysis)
    config = Config()
    config.node.data_dir = str(tmp_path / "data")
    config.peers = [PeerConfig("PACS", "127.0.0.1", 11112)]
    store = Store(config.database_url, tmp_path / "archive")
    yield SimpleNamespace(config=config, store=store)
    store.close()


def make_worker(node, bad: set[str] = frozenset(), name: str = "w1") -> Worker:
    per_image, per_study = fake_builders(set(bad))
    return Worker(node.config, node.store, models=FakeModels(), name=name,
                  result_builder=per_image, study_result_builder=per_study)


def receive(store: Store, paths: list[Path]) -> str:
    policy = ReceiverPolicy("DICOMNODE", patient_key_salt=b"t")
    for path in paths:
        _, ds = archive_instance(store, path.read_bytes(), policy, calling_ae="PACS")
    return str(ds.StudyInstanceUID)


def deliver_all(store: Store) -> list[str]:
    """Play the PACS accepting everything due: the SOP Instance UIDs delivered."""
    sent = []
    for task in store.claim_due_deliveries("sender", limit=100):
        store.record_delivery_attempt(task.id, "sender", ok=True, status=0)
        sent.append(task.sop_instance_uid)
    return sent


# ------------------------------------------------------------------------- item 5

def test_one_image_whose_results_fail_is_left_out_and_the_study_completes(
        node, study: Path) -> None:
    files = study_files(study)
    bad = str(dcmread(files[1], stop_before_pixels=True).SOPInstanceUID)
    study_uid = receive(node.store, files)
    node.store.force_ready(study_uid)
    worker = make_worker(node, bad={bad})
    assert worker.run_one_job()
    [job] = node.store.list_jobs()
    assert job.state is JobState.DONE, job.last_error
    assert job.attempts == 1  # ran once: no retry of the whole study
    results = node.store.study_results(study_uid)
    assert sorted(r.kind for r in results) == ["cad-sr", "sr", "sr", "sr"]
    # the study-level object covers the images that got results, not the one left out
    good = [i.path for i in node.store.study_instances(study_uid) if i.sop_instance_uid != bad]
    [cad] = [r for r in results if r.kind == "cad-sr"]
    assert cad.sop_instance_uid == result_dataset(good, MAMMO_CAD_SR, "cad-sr").SOPInstanceUID
    assert any("no frame of reference" in s for s in worker.last_times.skipped)
    [note] = [a for a in node.store.audit_trail() if a.event == "image_left_out"]
    assert note.sop_instance_uid == bad and "no frame of reference" in note.detail
    assert note.study_uid == study_uid


def test_a_study_whose_every_image_fails_its_results_fails_once(node, study: Path) -> None:
    files = study_files(study)
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    study_uid = receive(node.store, files)
    node.store.force_ready(study_uid)
    assert make_worker(node, bad=uids).run_one_job()
    [job] = node.store.list_jobs()
    assert job.state is JobState.FAILED and "results could be built" in job.last_error
    assert node.store.study_results(study_uid) == []
    assert [d for d in node.store.list_deliveries() if d.state is DeliveryState.PENDING] == []


# ------------------------------------------------------------------------- item 7: results

def current(results) -> list:
    """The results the node stands by: neither superseded nor rejection notes."""
    return [r for r in results if not r.kind.startswith("superseded:")
            and r.kind != "rejection"]


def store_results(store: Store) -> list:
    [job] = store.list_jobs()
    return store.study_results(job.study_uid)


def pacs_view(store: Store, delivered: list[str]) -> set[str]:
    """What a PACS that honours IOCM shows: the delivered instances less those that a
    delivered rejection note (113001) lists."""
    rejected = set()
    for r in store_results(store):
        if r.sop_instance_uid in delivered and r.sop_class_uid == KOS:
            note = dcmread(r.path)
            assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
            rejected |= {ref.ReferencedSOPInstanceUID
                         for item in note.CurrentRequestedProcedureEvidenceSequence
                         for series in item.ReferencedSeriesSequence
                         for ref in series.ReferencedSOPSequence}
    return set(delivered) - rejected - {r.sop_instance_uid for r in store_results(store)
                                        if r.sop_class_uid == KOS}


def test_a_study_that_grows_after_its_results_went_out_keeps_one_cad_sr_at_the_pacs(
        node, study: Path) -> None:
    """A kill during receive: the first images were processed after the idle time and their
    results sent; the rest arrived, the full study was processed, and the PACS held two CAD
    SRs. The node now sends an IOCM rejection note for the partial run's CAD SR."""
    files = study_files(study)
    study_uid = receive(node.store, files[:2])
    node.store.force_ready(study_uid)
    assert make_worker(node).run_one_job()
    [partial_cad] = [r for r in node.store.study_results(study_uid) if r.kind == "cad-sr"]
    delivered = deliver_all(node.store)
    assert partial_cad.sop_instance_uid in delivered

    receive(node.store, files[2:])
    node.store.force_ready(study_uid)
    assert make_worker(node).run_one_job()
    results = node.store.study_results(study_uid)
    [full_cad] = [r for r in current(results) if r.kind == "cad-sr"]
    assert full_cad.sop_instance_uid != partial_cad.sop_instance_uid
    assert len([r for r in current(results) if r.kind == "sr"]) == 4
    [old] = [r for r in results if r.sop_instance_uid == partial_cad.sop_instance_uid]
    assert old.kind == "superseded:cad-sr"  # remembered, not forgotten
    [rejection] = [r for r in results if r.kind == "rejection"]
    note = dcmread(rejection.path)
    assert note.SOPClassUID == KOS and note.StudyInstanceUID == study_uid
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    referenced = {ref.ReferencedSOPInstanceUID
                  for item in note.CurrentRequestedProcedureEvidenceSequence
                  for series in item.ReferencedSeriesSequence
                  for ref in series.ReferencedSOPSequence}
    assert referenced == {partial_cad.sop_instance_uid}
    [to_pacs] = [d for d in node.store.list_deliveries() if d.result_id == rejection.id]
    assert to_pacs.destination == "PACS" and to_pacs.state is DeliveryState.PENDING

    second = deliver_all(node.store)
    assert partial_cad.sop_instance_uid not in second and rejection.sop_instance_uid in second
    delivered += second
    shown = pacs_view(node.store, delivered)
    cads = [r.sop_instance_uid for r in results if r.sop_class_uid == MAMMO_CAD_SR]
    assert [uid for uid in cads if uid in shown] == [full_cad.sop_instance_uid]

    # the same study again: nothing new to reject, no second note
    node.store.force_ready(study_uid)
    assert make_worker(node).run_one_job()
    again = node.store.study_results(study_uid)
    assert [r.kind for r in again].count("rejection") == 1
    assert deliver_all(node.store) == []  # identical results, already delivered


def test_results_superseded_before_they_were_sent_are_cancelled_not_rejected(
        node, study: Path) -> None:
    files = study_files(study)
    study_uid = receive(node.store, files[:2])
    node.store.force_ready(study_uid)
    assert make_worker(node).run_one_job()
    [partial_cad] = [r for r in node.store.study_results(study_uid) if r.kind == "cad-sr"]
    receive(node.store, files[2:])  # arrives before anything was sent
    node.store.force_ready(study_uid)
    assert make_worker(node).run_one_job()
    results = node.store.study_results(study_uid)
    assert [r.kind for r in results].count("rejection") == 0
    [cancelled] = [d for d in node.store.list_deliveries()
                   if d.result_sop_instance_uid == partial_cad.sop_instance_uid]
    assert cancelled.state is DeliveryState.CANCELLED
    delivered = deliver_all(node.store)
    assert partial_cad.sop_instance_uid not in delivered
    assert len([u for u in delivered if u in {r.sop_instance_uid for r in results
                                              if r.sop_class_uid == MAMMO_CAD_SR}]) == 1


# ------------------------------------------------------------------------- item 7: sending

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deliveries_of_a_killed_node_resume_when_it_restarts(node, study: Path) -> None:
    """A node killed mid-send used to leave its deliveries leased for 120 s; restarted, it
    now takes back at once what its dead process held, and nothing a live worker holds."""
    node.config.peers = [PeerConfig("PACS", "127.0.0.1", _closed_port())]
    node.config.worker.poll_seconds = 0.05
    study_uid = receive(node.store, study_files(study))
    node.store.force_ready(study_uid)
    assert make_worker(node).run_one_job()
    from dicomnode.pipeline.worker import worker_id

    host = socket.gethostname()
    dead = f"{host}:{_dead_pid()}:dead01"
    alive = worker_id()  # another worker of this process, still sending
    elsewhere = "otherhost:4242:abcdef"  # another machine: only its lease tells
    in_flight = {}
    for owner, count in ((dead, 3), (alive, 1), (elsewhere, 1)):
        for task in node.store.claim_due_deliveries(owner, limit=count, lease_seconds=120):
            in_flight[task.id] = owner
    assert len(in_flight) == 5

    restarted = make_worker(node, name=None)
    thread = threading.Thread(target=restarted.run_forever, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = {d.id: d for d in node.store.list_deliveries()}
            retried = [i for i, o in in_flight.items() if o == dead and states[i].attempts > 1]
            if len(retried) == 3:
                break
            time.sleep(0.05)
    finally:
        restarted.stop()
        thread.join(10)
    states = {d.id: d for d in node.store.list_deliveries()}
    for delivery_id, owner in in_flight.items():
        if owner == dead:  # sent again at once (the PACS is down here: it backs off)
            assert states[delivery_id].attempts == 2, states[delivery_id]
            assert states[delivery_id].last_status == "unreachable"
        else:  # still leased by a worker that may be sending it
            assert states[delivery_id].state is DeliveryState.SENDING
            assert states[delivery_id].attempts == 1


def test_dead_workers_are_only_this_hosts_gone_processes() -> None:
    from dicomnode.pipeline.worker import dead_workers, worker_id

    host = socket.gethostname()
    gone = f"{host}:{_dead_pid()}:aaaaaa"
    previous_me = f"{host}:{os.getpid()}:zzzzzz"  # this pid, not made here: a container restart
    parent = f"{host}:{os.getppid()}:bbbbbb"  # alive
    owners = {gone, previous_me, worker_id(), parent, "other:1:cccccc", "w1"}
    assert dead_workers(owners) == {gone, previous_me}


@pytest.mark.slow
def test_real_results_of_a_grown_dbt_study_get_one_cad_sr(tmp_path: Path, synth_study) -> None:
    """The same with the real model and builders: the partial run's Mammography CAD SR is
    rejected by a KOS that dciodvfy-clean highdicom builds from the real header."""
    from tests.support.peers import make_checkpoint

    out = synth_study(studies=1, size="small", seed=41, modalities=("dbt",))
    files = sorted(out.glob("*/dbt/*.dcm"))
    config = Config()
    config.node.data_dir = str(tmp_path / "data")
    config.model.device = "cpu"
    config.model.dbt = str(make_checkpoint(tmp_path / "dbt.pt", "dbt"))
    config.peers = [PeerConfig("PACS", "127.0.0.1", 11112)]
    store = Store(config.database_url, tmp_path / "archive")
    try:
        study_uid = receive(store, files[:2])
        store.force_ready(study_uid)
        assert Worker(config, store, name="w1").run_one_job()
        [partial] = [r for r in store.study_results(study_uid) if r.kind == "cad-sr"]
        delivered = deliver_all(store)
        receive(store, files[2:])
        store.force_ready(study_uid)
        assert Worker(config, store, name="w2").run_one_job()
        results = store.study_results(study_uid)
        assert [r.kind for r in current(results)].count("cad-sr") == 1
        [rejection] = [r for r in results if r.kind == "rejection"]
        note = dcmread(rejection.path)
        assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
        assert {ref.ReferencedSOPInstanceUID
                for item in note.CurrentRequestedProcedureEvidenceSequence
                for series in item.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence} == {partial.sop_instance_uid}
        assert note.PatientID == dcmread(files[0], stop_before_pixels=True).PatientID
        delivered += deliver_all(store)
        shown = pacs_view(store, delivered)
        assert len([r for r in results if r.sop_class_uid == MAMMO_CAD_SR
                    and r.sop_instance_uid in shown]) == 1
    finally:
        store.close()


def test_each_delivery_is_recorded_as_soon_as_the_pacs_answers(node, study: Path) -> None:
    """A node killed mid-group used to re-send what had already arrived (outcomes were
    recorded after the whole association): now each is recorded on its C-STORE response."""
    from pynetdicom import AE, evt

    seen: list[str] = []
    states_before: list[set[str]] = []

    def on_store(event) -> int:
        # what the node has recorded for the instances that arrived before this one
        done = {d.result_sop_instance_uid for d in node.store.list_deliveries()
                if d.state is DeliveryState.DONE}
        states_before.append({uid for uid in seen if uid in done})
        seen.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    pacs = AE(ae_title="PACS")
    for uid in (BASIC_TEXT_SR, MAMMO_CAD_SR):
        pacs.add_supported_context(uid)
    server = pacs.start_server(("127.0.0.1", 0), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node.config.peers = [PeerConfig("PACS", "127.0.0.1", server.server_address[1])]
        study_uid = receive(node.store, study_files(study))
        node.store.force_ready(study_uid)
        worker = make_worker(node)
        assert worker.run_one_job()
        assert worker.deliverer.run_once() == 5
    finally:
        server.shutdown()
    assert len(seen) == 5
    # before each C-STORE, every earlier one is already recorded as delivered
    assert states_before == [set(seen[:i]) for i in range(5)]
