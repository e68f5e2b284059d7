"""`dicomnode bench scp`: receive throughput of the node against dcmtk's storescp.

The same files, sent by the same dcmtk `storescu`, alternately to dcmtk `storescp` (the
speed reference) and to the node's SCP, several rounds; medians and the ratio come from
one run on one machine. The node fsyncs every instance and indexes it before it answers;
storescp writes without fsync, so the comparison is conservative for the node.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dicomnode.bench.report import BenchReport
from dicomnode.errors import DicomnodeError
from dicomnode.external import dcmtk_program, free_port, wait_port


def dcmtk_tool(name: str) -> str:
    path = dcmtk_program(name)
    if path is None:
        raise DicomnodeError(f"dcmtk's {name} is not installed; install the Debian package dcmtk")
    return path


def _send(files: list[Path], port: int, called: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        [dcmtk_tool("storescu"), "-R", "-xv", "-aet", "BENCH", "-aec", called, "--max-send-pdu",
         "131072", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise DicomnodeError(f"storescu failed sending to {called}: {proc.stderr.strip()[:300]}")
    return elapsed


def synth_dbt_files(workdir: Path, seed: int) -> list[Path]:
    from dicomnode.synth import SynthOptions, generate_studies

    out = workdir / "study"
    generate_studies(out, SynthOptions(studies=1, size="full", seed=seed, modalities=("dbt",)))
    return sorted(out.glob("*/dbt/*.dcm"))


def run_scp_bench(files: list[Path] | None, runs: int, workdir: Path | None = None,
                  seed: int = 1) -> BenchReport:
    tmp = Path(tempfile.mkdtemp(prefix="dicomnode-bench-scp-", dir=workdir))
    try:
        files = files or synth_dbt_files(tmp, seed)
        total_bytes = sum(f.stat().st_size for f in files)
        report = BenchReport("scp", device="cpu", memory_kind="rss")

        dcmtk_dir = tmp / "storescp"
        dcmtk_dir.mkdir()
        dcmtk_port = free_port()
        storescp = subprocess.Popen(
            [dcmtk_tool("storescp"), "-aet", "STORESCP", "+xa", "-od", str(dcmtk_dir), "-uf",
             "--max-pdu", "131072", str(dcmtk_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(dcmtk_port)
            reference, node = [], []
            for round_ in range(runs):
                reference.append(_send(files, dcmtk_port, "STORESCP"))
                for path in dcmtk_dir.iterdir():
                    path.unlink()
                node.append(_send_to_fresh_node(files, tmp / f"node-{round_}"))
        finally:
            storescp.terminate()
            storescp.wait(timeout=30)
        ref_s = report.add_timing("dcmtk storescp: send study", reference)
        node_s = report.add_timing("dicomnode scp: send study", node)
        for name, seconds in (("dcmtk storescp", ref_s), ("dicomnode scp", node_s)):
            report.add_throughput(name, seconds, len(files), total_bytes)
        report.add_ratio("dicomnode / dcmtk throughput", ref_s / node_s, "dcmtk storescp")
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _send_to_fresh_node(files: list[Path], root: Path) -> float:
    """Send to a node with an empty archive (re-sent identical instances would be skipped)."""
    from dicomnode.network.scp import ReceiverPolicy, StorageSCP
    from storage import Store

    store = Store(f"sqlite:///{root / 'bench.db'}", root / "archive")
    scp = StorageSCP(store, ReceiverPolicy("DICOMNODE", accept_any_peer=True), "127.0.0.1", 0)
    scp.start()
    try:
        return _send(files, scp.port, "DICOMNODE")
    finally:
        scp.stop()
        store.close()
        shutil.rmtree(root, ignore_errors=True)
