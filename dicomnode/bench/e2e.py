"""`dicomnode bench e2e`: from the first C-STORE of a 4-view DBT study to the last result
received back, broken down by stage.

Everything runs on this machine: dcmtk `storescu` sends the study to the node's SCP; the
worker (in this process, so its stage timings can be read) runs the model and sends the
results to dcmtk `storescp`, run bit-preserving (`+B`): it stores each result as received,
as a PACS archive stores it (Orthanc keeps what it receives), instead of inflating and
re-deflating every deflated SEG and Parametric Map (storescp's default re-encodes).
Stages: receive (storescu start to its exit), wait (the configured idle time that marks
the study complete), load, model, build results after the model (the worker builds a
breast's results while it analyses the next: what is left once the last image is analysed),
send (job done to the last result on disk at storescp), and all the time spent building
results. Then what came back: the results' bytes as received (and as a fraction of the
study's), how many objects and series.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from dicomnode.bench.receive import dcmtk_tool, synth_dbt_files
from dicomnode.bench.report import BenchReport
from dicomnode.errors import DicomnodeError
from dicomnode.external import free_port, wait_port


def _random_checkpoint(path: Path) -> str:
    """A DBT model at the published input size with random weights: same cost as a trained
    one, for timing only."""
    from gmic.checkpoint import save_checkpoint
    from gmic.model import GMIC
    from gmic.model_config import GMICConfig

    save_checkpoint(path, GMIC(GMICConfig.dbt()), meta={"description": "random, timing only"})
    return str(path)


def _reset_peak_rss() -> None:
    """Start this process's peak RSS (VmHWM) afresh, so it covers the study alone (Linux
    4.0+; elsewhere it stays the process's lifetime peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None  # kB


def results_summary(paths: list[Path]) -> dict:
    """Bytes (as received), objects, series and bytes per modality of result files."""
    import pydicom

    by_kind: dict[str, int] = {}
    series = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        size = path.stat().st_size
        kind = str(ds.get("Modality", "?"))
        by_kind[kind] = by_kind.get(kind, 0) + size
        series.add(str(ds.SeriesInstanceUID))
    return {"bytes": sum(by_kind.values()), "objects": len(paths), "series": len(series),
            "by_kind": by_kind}


def run_e2e_bench(files: list[Path] | None, checkpoint: str | None, device: str,
                  idle_seconds: float, workdir: Path | None, seed: int,
                  timeout_s: float = 3600) -> BenchReport:
    from dicomnode.config import Config, PeerConfig
    from dicomnode.network.scp import ReceiverPolicy, StorageSCP
    from dicomnode.pipeline.worker import Worker
    from storage import Store

    tmp = Path(tempfile.mkdtemp(prefix="dicomnode-bench-e2e-", dir=workdir))
    received = tmp / "received"
    received.mkdir()
    storescp = None
    try:
        files = files or synth_dbt_files(tmp, seed)
        dest_port = free_port()
        storescp = subprocess.Popen(
            [dcmtk_tool("storescp"), "-aet", "RESULTS", "+xa", "+B", "-od", str(received), "-uf",
             str(dest_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(dest_port)

        config = Config()
        config.node.data_dir = str(tmp / "data")
        config.node.idle_seconds = idle_seconds
        config.model.device = device
        config.model.dbt = checkpoint or _random_checkpoint(tmp / "dbt.pt")
        config.peers = [PeerConfig("BENCH", "127.0.0.1", 1, send_results=False),
                        PeerConfig("RESULTS", "127.0.0.1", dest_port)]
        config.worker.poll_seconds = 0.05
        store = Store(config.database_url, tmp / "archive")
        scp = StorageSCP(store, ReceiverPolicy("DICOMNODE", accept_any_peer=True), "127.0.0.1", 0)
        scp.start()
        worker = Worker(config, store, name="bench")
        thread = threading.Thread(target=worker.run_forever, daemon=True)
        try:
            thread.start()
            _reset_peak_rss()
            t0 = time.perf_counter()
            proc = subprocess.run(
                [dcmtk_tool("storescu"), "-R", "-xv", "-aet", "BENCH", "-aec", "DICOMNODE",
                 "127.0.0.1", str(scp.port), *map(str, files)],
                capture_output=True, text=True, timeout=timeout_s)
            t_received = time.perf_counter()
            if proc.returncode != 0:
                raise DicomnodeError(f"storescu failed: {proc.stderr.strip()[:300]}")
            deadline = time.monotonic() + timeout_s
            while worker.jobs_done + worker.jobs_failed == 0:
                if time.monotonic() > deadline:
                    raise DicomnodeError("the study was not processed in time")
                time.sleep(0.05)
            t_done = time.perf_counter()
            if worker.jobs_failed:
                raise DicomnodeError(f"the job failed: {store.list_jobs()[0].last_error}")
            expected = len(store.list_deliveries())
            while len(list(received.glob("*"))) < expected:
                if time.monotonic() > deadline:
                    raise DicomnodeError("results did not all arrive in time")
                time.sleep(0.05)
            t_sent = time.perf_counter()
        finally:
            worker.stop()
            thread.join(timeout=60)
            scp.stop()
            store.close()
        times = worker.last_times
        report = BenchReport("e2e", device=str(worker.models.device), memory_kind="rss")
        stages = [
            ("receive", t_received - t0),
            # idle time that marks the study complete, plus the worker's polling
            ("wait for completion", (t_done - t_received) - times.load - times.model
             - times.results),
            ("load", times.load),
            ("model", times.model),
            # after the last image's model pass: the last breast's results, the CAD SR,
            # archiving; the other breasts' were built during the model ([worker]
            # result_threads)
            ("build results (after the model)", times.results),
            ("send", t_sent - t_done),
        ]
        for name, seconds in stages:
            report.rows.append({"name": name, "seconds": seconds})
        report.rows.append({"name": "total (first C-STORE to last result)",
                            "seconds": t_sent - t0})
        report.rows.append({"name": "building results, all (most during the model)",
                            "seconds": times.building})
        peak = _peak_rss_mb()
        if peak is not None:
            report.rows.append({"name": "peak memory", "seconds": None,
                                "detail": f"{peak:,.0f} MB RSS from the first C-STORE (SCP, "
                                          "worker and its results threads)"})
        study_bytes = sum(f.stat().st_size for f in files)
        returned = results_summary(sorted(received.glob("*")))
        report.rows.append({"name": "study", "seconds": None,
                            "detail": f"{len(files)} DBT views, {study_bytes / 1e6:.0f} MB, "
                                      f"{expected} results"})
        report.rows.append({"name": "results", "seconds": None,
                            "detail": f"{returned['bytes'] / 1e6:.2f} MB "
                                      f"({returned['bytes'] / study_bytes:.2%} of the study) "
                                      f"in {returned['objects']} objects, "
                                      f"{returned['series']} series; "
                                      + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in
                                                  sorted(returned["by_kind"].items()))})
        report.add_ratio("model share of total", times.model / (t_sent - t0), "total")
        report.add_ratio("result bytes / study bytes", returned["bytes"] / study_bytes,
                         "study")
        report.add_ratio("build + send seconds", times.results + (t_sent - t_done), "seconds")
        return report
    finally:
        if storescp is not None:
            storescp.terminate()
            storescp.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
