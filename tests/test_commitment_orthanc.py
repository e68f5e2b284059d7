"""Results back to Orthanc (Debian package) by C-STORE with Storage Commitment: Orthanc is
the commitment SCP and sends its N-EVENT-REPORT on a new association to the node's SCP
(it knows the node's AE from DicomModalities). Committed and failed instances are recorded
per instance, shown by `dicomnode jobs show`, and retention waits for the commitment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest

from dicomnode.cli import main
from dicomnode.config import load_config
from dicomnode.network.scp import StorageSCP
from dicomnode.network.scu import Deliverer, build_scu
from dicomnode.wiring import destinations_from_config, open_store, policy_from_config
from storage.records import CommitmentState
from tests.support.peers import free_port, orthanc, wait_for, write_config
from tests.support.synth import SMALL

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


def _result_file(source: Path, out: Path) -> pydicom.Dataset:
    """A stand-in result object: the source image under a new SOP Instance UID/series."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(out)
    return ds


def test_results_are_committed_by_orthanc(tmp_path: Path, capsys, synth_study) -> None:
    image = sorted(synth_study(**SMALL).rglob("s2d/*.dcm"))[0]
    node_port = free_port()
    modalities = {"node": {"AET": "DICOMNODE", "Host": "127.0.0.1", "Port": node_port,
                           "AllowStorageCommitment": True}}
    with orthanc(tmp_path / "orthanc", modalities=modalities) as pacs:
        config_path = write_config(
            tmp_path / "node.toml", data_dir=tmp_path / "data", port=node_port,
            peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port,
                    "storage_commitment": True}], models={})
        config = load_config(config_path)
        store = open_store(config)
        scp = StorageSCP(store, policy_from_config(config), "127.0.0.1", node_port)
        scp.start()
        try:
            ds = pydicom.dcmread(image, stop_before_pixels=True)
            store.store_instance(
                encoded=image.read_bytes(), sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
                series_uid=ds.SeriesInstanceUID, transfer_syntax=ds.file_meta.TransferSyntaxUID,
                patient_key="p1", calling_ae="ORTHANC")
            job_id = store.force_ready(ds.StudyInstanceUID)
            store.claim_job("w1")
            delivery_ids = []
            results = []
            for n in range(2):
                res = _result_file(image, tmp_path / f"result{n}.dcm")
                record = store.store_result(
                    encoded=(tmp_path / f"result{n}.dcm").read_bytes(),
                    sop_instance_uid=res.SOPInstanceUID, sop_class_uid=res.SOPClassUID,
                    study_uid=res.StudyInstanceUID, series_uid=res.SeriesInstanceUID,
                    transfer_syntax=res.file_meta.TransferSyntaxUID, kind="sr", job_id=job_id)
                results.append(record)
            store.complete_job(job_id, "w1")
            # The first result goes through the deliverer (C-STORE + N-ACTION).
            delivery_ids.append(store.enqueue_delivery(results[0].id, "ORTHANC"))
            deliverer = Deliverer(store, "DICOMNODE", destinations_from_config(config), "w1")
            assert deliverer.run_once() == 1

            def state_of(delivery_id: int) -> CommitmentState | None:
                found = [c for c in store.commitments() if c.delivery_id == delivery_id]
                return found[0].state if found else None

            wait_for(lambda: state_of(delivery_ids[0]) == CommitmentState.COMMITTED, 60,
                     "Orthanc's N-EVENT-REPORT (committed)")
            # The second is asked for without being sent: Orthanc must report it failed.
            delivery_ids.append(store.enqueue_delivery(results[1].id, "ORTHANC"))
            [task] = store.claim_due_deliveries("w1")
            from dicomnode.network.commitment import request_commitment

            assoc = build_scu("DICOMNODE").associate("127.0.0.1", pacs.dicom_port,
                                                     ae_title="ORTHANC")
            assert assoc.is_established
            try:
                request_commitment(assoc, store, "ORTHANC", [task])
            finally:
                assoc.release()
            store.record_delivery_attempt(task.id, "w1", ok=True, status=0)
            wait_for(lambda: state_of(delivery_ids[1]) == CommitmentState.FAILED, 60,
                     "Orthanc's N-EVENT-REPORT (failed)")
        finally:
            scp.stop()
        commitments = {c.delivery_id: c for c in store.commitments(job_id=job_id)}
        assert commitments[delivery_ids[0]].reported_at is not None
        assert commitments[delivery_ids[1]].failure  # Orthanc's Failure Reason, e.g. 0x0112
        audit = [(a.event, a.sop_instance_uid, a.status) for a in store.audit_trail()]
        assert ("commitment", results[0].sop_instance_uid, "committed") in audit
        assert ("commitment", results[1].sop_instance_uid, "failed") in audit
        # Retention: the failed commitment keeps the study.
        later = datetime.now(UTC) + timedelta(days=30)
        assert store.apply_retention(timedelta(days=1), now=later).studies == 0
        store.close()

    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config_path), "jobs", "show", str(job_id)])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "storage commitment" in out
    assert "committed" in out and "failed" in out
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config_path), "status", "--json"])
    import json

    status = json.loads(capsys.readouterr().out)
    assert status["commitments"] == {"committed": 1, "failed": 1}
