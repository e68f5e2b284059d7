"""A worker SIGKILLed while sending results (issue 15, item 7): restarted, it resumes the
interrupted deliveries at once, not after their 120 s lease, and re-sends only what was in
flight, not what had already arrived. Real processes on loopback; every wait is bounded."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicomnode.config import load_config
from dicomnode.network.scp import archive_instance
from dicomnode.wiring import open_store, policy_from_config
from tests.support.ops import kill
from tests.support.peers import NO_MODELS, free_port, node_process, wait_for, write_config
from tests.support.synth import SMALL

RESULTS = 12


class SlowPacs:
    """A PACS that takes 0.3 s per C-STORE and counts what it received, by SOP UID."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()
        ae = AE(ae_title="SLOWPACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        time.sleep(0.3)
        with self._lock:
            self.received[str(event.request.AffectedSOPInstanceUID)] += 1
        return 0x0000

    def distinct(self) -> int:
        with self._lock:
            return len(self.received)

    def close(self) -> None:
        self.server.shutdown()


def queue_results(config: Path, source: Path, count: int) -> None:
    """One received instance, and ``count`` result objects of its study queued to SLOWPACS."""
    cfg = load_config(config)
    store = open_store(cfg)
    try:
        _, ds = archive_instance(store, source.read_bytes(), policy_from_config(cfg),
                                 calling_ae="SLOWPACS")
        job = store.list_jobs()[0]
        for i in range(count):
            result = dcmread(source)
            result.SOPInstanceUID = result.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            result.SeriesInstanceUID = generate_uid()
            buffer = io.BytesIO()
            result.save_as(buffer, enforce_file_format=True)
            stored = store.store_result(
                encoded=buffer.getvalue(), sop_instance_uid=result.SOPInstanceUID,
                sop_class_uid=result.SOPClassUID, study_uid=ds.StudyInstanceUID,
                series_uid=result.SeriesInstanceUID,
                transfer_syntax=str(result.file_meta.TransferSyntaxUID), kind=f"test{i}",
                job_id=job.id)
            store.enqueue_delivery(stored.id, "SLOWPACS")
    finally:
        store.close()


@pytest.mark.slow
def test_worker_killed_while_sending_resumes_at_restart_and_resends_only_the_one_in_flight(
        tmp_path: Path, synth_study) -> None:
    source = sorted(synth_study(**SMALL).glob("*/s2d/*.dcm"))[0]
    pacs = SlowPacs()
    try:
        config = write_config(
            tmp_path / "node.toml", data_dir=tmp_path / "data", port=free_port(),
            peers=[{"ae_title": "SLOWPACS", "host": "127.0.0.1", "port": pacs.port}],
            models=NO_MODELS, idle_seconds=3600)
        queue_results(config, source, RESULTS)
        with node_process(config, "worker", log_path=tmp_path / "worker-a.log") as worker_a:
            wait_for(lambda: pacs.distinct() >= 3, 120, "the first results arrive", 0.05)
            kill(worker_a)
        arrived_before = pacs.distinct()
        assert arrived_before < RESULTS  # killed mid-group
        restarted = time.monotonic()
        with node_process(config, "worker", log_path=tmp_path / "worker-b.log"):
            # well inside the 120 s delivery lease
            wait_for(lambda: pacs.distinct() == RESULTS, 60, "all results after restart", 0.1)
            took = time.monotonic() - restarted
            time.sleep(1)  # anything sent twice more would arrive now
        store = open_store(load_config(config))
        try:
            deliveries = store.list_deliveries()
        finally:
            store.close()
    finally:
        pacs.close()
    assert took < 60
    assert {d.state.value for d in deliveries} == {"done"} and len(deliveries) == RESULTS
    # only what was in flight when the worker died (at most one C-STORE) arrived twice
    twice = [uid for uid, n in pacs.received.items() if n > 1]
    assert len(twice) <= 1, pacs.received
    assert max(pacs.received.values()) <= 2
