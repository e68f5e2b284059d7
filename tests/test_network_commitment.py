"""Storage commitment with a pynetdicom stand-in PACS (no Orthanc needed): N-ACTION after
the C-STOREs, the N-EVENT-REPORT on a new association to the node's SCP, per instance."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

from dicomnode.config import load_config
from dicomnode.identifiers import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from dicomnode.network.scp import StorageSCP
from dicomnode.network.scu import Deliverer
from dicomnode.wiring import destinations_from_config, open_store, policy_from_config
from storage.records import CommitmentState
from tests.support.dicom import phantom, write_mammo
from tests.support.peers import free_port, wait_for, write_config


class FakePacs:
    """Stores nothing, answers every C-STORE, and reports commitment of everything it was
    sent except ``refuse`` (Failure Reason 0x0110), from a new association."""

    def __init__(self, node_port: int, refuse: set[str]) -> None:
        self.port = free_port()
        self.node_port = node_port
        self.refuse = refuse
        self.received: set[str] = set()
        self.ae = AE(ae_title="PACS")
        for context in StoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax)
        self.ae.add_supported_context(STORAGE_COMMITMENT_PUSH)
        self.threads: list[threading.Thread] = []

    def _store(self, event: evt.Event) -> int:
        self.received.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: evt.Event):
        request = event.action_information
        thread = threading.Thread(target=self._report, args=(request,), daemon=True)
        self.threads.append(thread)
        thread.start()
        return 0x0000, None

    def _report(self, request: Dataset) -> None:
        time.sleep(0.2)  # after the N-ACTION response, as a PACS does
        report = Dataset()
        report.TransactionUID = request.TransactionUID
        ok, failed = [], []
        for item in request.ReferencedSOPSequence:
            ref = Dataset()
            ref.ReferencedSOPClassUID = item.ReferencedSOPClassUID
            ref.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
            uid = str(item.ReferencedSOPInstanceUID)
            if uid in self.refuse or uid not in self.received:
                ref.FailureReason = 0x0110
                failed.append(ref)
            else:
                ok.append(ref)
        report.ReferencedSOPSequence = ok
        if failed:
            report.FailedSOPSequence = failed
        ae = AE(ae_title="PACS")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        assoc = ae.associate("127.0.0.1", self.node_port, ae_title="DICOMNODE")
        assert assoc.is_established
        status = assoc.send_n_event_report(report, 2 if failed else 1,
                                           STORAGE_COMMITMENT_PUSH,
                                           STORAGE_COMMITMENT_INSTANCE)[0]
        self.report_status = int(status.Status)
        assoc.release()

    def __enter__(self) -> FakePacs:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)])
        return self

    def __exit__(self, *exc: object) -> None:
        for thread in self.threads:
            thread.join(10)
        self.server.shutdown()


def test_commitment_report_on_a_new_association(tmp_path: Path) -> None:
    node_port = free_port()
    source = write_mammo(tmp_path / "src.dcm", phantom(depth=1)[0])
    refused = ""
    with FakePacs(node_port, refuse=set()) as pacs:
        config = load_config(write_config(
            tmp_path / "node.toml", data_dir=tmp_path / "data", port=node_port,
            peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port,
                    "storage_commitment": True}], models={}))
        with open_store(config) as store:
            scp = StorageSCP(store, policy_from_config(config), "127.0.0.1", node_port)
            scp.start()
            try:
                store.store_instance(
                    encoded=(tmp_path / "src.dcm").read_bytes(),
                    sop_instance_uid=source.SOPInstanceUID, sop_class_uid=source.SOPClassUID,
                    study_uid=source.StudyInstanceUID, series_uid=source.SeriesInstanceUID,
                    transfer_syntax=source.file_meta.TransferSyntaxUID, patient_key="p")
                job = store.force_ready(source.StudyInstanceUID)
                store.claim_job("w")
                uids = []
                for n in range(3):
                    ds = pydicom.dcmread(tmp_path / "src.dcm")
                    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = \
                        pydicom.uid.generate_uid()
                    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
                    ds.save_as(tmp_path / f"r{n}.dcm")
                    result = store.store_result(
                        encoded=(tmp_path / f"r{n}.dcm").read_bytes(),
                        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                        study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                        transfer_syntax=ds.file_meta.TransferSyntaxUID, kind="sr", job_id=job)
                    store.enqueue_delivery(result.id, "PACS")
                    uids.append(str(ds.SOPInstanceUID))
                store.complete_job(job, "w")
                refused = uids[2]
                pacs.refuse.add(refused)
                deliverer = Deliverer(store, "DICOMNODE", destinations_from_config(config),
                                      "w")
                assert deliverer.run_once() == 3

                def settled() -> bool:
                    return all(c.state != CommitmentState.PENDING
                               for c in store.commitments()) and len(store.commitments()) == 3
                wait_for(settled, 30, "the N-EVENT-REPORT")
            finally:
                scp.stop()
            states = {c.result_sop_instance_uid: (c.state, c.failure)
                      for c in store.commitments(job_id=job)}
            assert pacs.report_status == 0
            assert states == {uids[0]: (CommitmentState.COMMITTED, None),
                              uids[1]: (CommitmentState.COMMITTED, None),
                              refused: (CommitmentState.FAILED, "0x0110")}
            assert len({c.transaction_uid for c in store.commitments()}) == 1  # one N-ACTION
            assert store.commitment_counts() == {"committed": 2, "failed": 1}


def test_report_from_an_unknown_ae_is_refused_at_association(tmp_path: Path) -> None:
    node_port = free_port()
    config = load_config(write_config(
        tmp_path / "node.toml", data_dir=tmp_path / "data", port=node_port,
        peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}], models={}))
    with open_store(config) as store:
        scp = StorageSCP(store, policy_from_config(config), "127.0.0.1", node_port)
        scp.start()
        try:
            ae = AE(ae_title="STRANGER")
            ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
            assoc = ae.associate("127.0.0.1", node_port, ae_title="DICOMNODE")
            assert not assoc.is_established
            ae = AE(ae_title="PACS")  # a known peer, a transaction the node never asked for
            ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
            assoc = ae.associate("127.0.0.1", node_port, ae_title="DICOMNODE")
            assert assoc.is_established
            report = Dataset()
            report.TransactionUID = "2.25.12345"
            item = Dataset()
            item.ReferencedSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
            item.ReferencedSOPInstanceUID = "2.25.999"
            report.ReferencedSOPSequence = [item]
            status, _ = assoc.send_n_event_report(report, 1, STORAGE_COMMITMENT_PUSH,
                                                  STORAGE_COMMITMENT_INSTANCE)
            assoc.release()
            assert int(status.Status) == 0
        finally:
            scp.stop()
        assert store.commitments() == []
        assert any(a.event == "commitment_unknown" for a in store.audit_trail())
