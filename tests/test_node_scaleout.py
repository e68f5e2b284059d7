"""Several workers on several machines: one `dicomnode serve` and two `dicomnode worker`
processes share a PostgreSQL queue (and the archive directory, as an NFS mount would).
Each study is processed once, each result delivered once, and the SRs carry the same
probabilities one worker computes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage

from dicomnode.config import Config, load_config
from dicomnode.pipeline.images import load_image
from dicomnode.pipeline.weights import ModelRegistry
from dicomnode.pipeline.worker import analyse_image
from dicomnode.results.read import read_sr_summary
from dicomnode.wiring import open_store
from storage.testing import scratch_schema
from tests.support.ops import NODE_AE, copies_of
from tests.support.peers import (
    dcmtk,
    free_port,
    make_checkpoint,
    node_process,
    storescp,
    wait_for,
    write_config,
)
from tests.support.synth import SMALL

SR = Comprehensive3DSRStorage


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.dcmtk
def test_two_workers_share_a_postgres_queue_results_identical_and_sent_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synth_study) -> None:
    views = sorted(synth_study(**SMALL).glob("*/s2d/*.dcm"))
    # two one-image studies: a job for each worker (whichever claims first)
    study_a, _ = copies_of(views[0], tmp_path / "a", 1)
    study_b, _ = copies_of(views[1], tmp_path / "b", 1)
    checkpoint = make_checkpoint(tmp_path / "s2d.pt", "s2d", seed=3)
    received = tmp_path / "received"
    port = free_port()
    with scratch_schema(os.environ["DICOMNODE_TEST_POSTGRES_URL"]) as url, \
            storescp(received, ae_title="RESULTS") as results_port:
        monkeypatch.setenv("DICOMNODE_DATABASE_URL", str(url))
        config = write_config(
            tmp_path / "node.toml", data_dir=tmp_path / "data", port=port,
            peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 1, "send_results": False},
                   {"ae_title": "RESULTS", "host": "127.0.0.1", "port": results_port}],
            models={"s2d": str(checkpoint), "dbt": "none", "ffdm": "none"}, idle_seconds=1.5)
        upgrade = subprocess.run([sys.executable, "-m", "dicomnode.cli", "--config",
                                  str(config), "db", "upgrade"], capture_output=True, text=True,
                                 timeout=120)
        assert upgrade.returncode == 0, upgrade.stderr
        logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
        with ExitStack() as stack:
            stack.enter_context(node_process(config, "serve", log_path=tmp_path / "serve.log",
                                             port=port))
            for log in logs:
                stack.enter_context(node_process(config, "worker", log_path=log))
            sent = subprocess.run(
                [dcmtk("storescu"), "-aet", "PACS", "-aec", NODE_AE, "127.0.0.1", str(port),
                 *map(str, study_a + study_b)], capture_output=True, text=True, timeout=120)
            assert sent.returncode == 0, sent.stderr
            # per study: SR, SEG, the malignant map
            wait_for(lambda: len(list(received.glob("*.dcm"))) >= 6, 600, "6 results", 1)
            time.sleep(3)  # a duplicate would arrive now
        store = open_store(load_config(config))
        try:
            jobs = store.list_jobs()
            deliveries = store.list_deliveries()
        finally:
            store.close()
    results = [dcmread(p) for p in sorted(received.glob("*.dcm"))]
    assert len({ds.SOPInstanceUID for ds in results}) == len(results) == 6
    assert sorted((j.state.value, j.attempts) for j in jobs) == [("done", 1), ("done", 1)]
    assert len(deliveries) == 6 and {d.state.value for d in deliveries} == {"done"}
    done_by = [log.read_text().count("event=job_done") for log in logs]
    assert sum(done_by) == 2

    # The SRs carry exactly what one worker computes for each image.
    model_config = Config().model
    model_config.device, model_config.s2d = "cpu", str(checkpoint)
    loaded = ModelRegistry(model_config).get("s2d")
    by_uid = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in study_a + study_b}
    srs = [ds for ds in results if ds.SOPClassUID == SR]
    assert len(srs) == 2
    for sr in srs:
        source = {r.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                  for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
        (uid,) = source & set(by_uid)
        expected = analyse_image(load_image(by_uid[uid]), loaded)
        got = read_sr_summary(sr).probabilities["final"]
        assert got["malignant"] == pytest.approx(expected.final.malignant, abs=1e-5)
        assert got["benign"] == pytest.approx(expected.final.benign, abs=1e-5)
    print(f"\npostgres: jobs done per worker {done_by}, 6 results delivered once each")
