"""`dicomnode bench stow`: STOW-RS receive throughput against C-STORE into the same node.

The same files go, alternately, by C-STORE (dcmtk `storescu`, one association) and by
STOW-RS (one request, sent by `dicomnode dicomweb stow` in its own process, streamed from
the files) into a fresh node each time: the node's SCP and its STOW-RS endpoint share one
store, one policy and the same archive function, so the ratio is the cost of the HTTP path.
Both answer only after every instance is fsynced and indexed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dicomnode.bench.receive import _send, synth_dbt_files
from dicomnode.bench.report import BenchReport
from dicomnode.errors import DicomnodeError

_TOKEN = "bench-token"


class _Node:
    """A fresh node: store, C-STORE SCP and STOW-RS endpoint."""

    def __init__(self, root: Path) -> None:
        from dicomnode.dicomweb.stow import StowAuth, StowServer, hash_token
        from dicomnode.network.scp import AllowedPeer, ReceiverPolicy, StorageSCP
        from storage import Store

        self.root = root
        self.store = Store(f"sqlite:///{root / 'bench.db'}", root / "archive")
        # storescu calls as BENCH from loopback; STOW-RS requests are BENCH's by their token
        policy = ReceiverPolicy("DICOMNODE", [AllowedPeer("BENCH", "127.0.0.1")])
        self.scp = StorageSCP(self.store, policy, "127.0.0.1", 0)
        self.stow = StowServer(self.store, policy, root, "127.0.0.1:0",
                               auth=StowAuth({hash_token(_TOKEN): "BENCH"}))
        self.scp.start()
        self.stow.start()

    def close(self) -> None:
        self.stow.stop()
        self.scp.stop()
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _stow(files: list[Path], url: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "dicomweb", "stow", url, *map(str, files)],
        capture_output=True, text=True, timeout=3600,
        env={**os.environ, "DICOMNODE_STOW_TOKEN": _TOKEN})
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise DicomnodeError(f"STOW-RS to the node failed: {(proc.stdout + proc.stderr)[-300:]}")
    return elapsed


def _count(node: _Node, study_uids: set[str]) -> int:
    return sum(len(node.store.study_instances(uid)) for uid in study_uids)


def run_stow_bench(files: list[Path] | None, runs: int, workdir: Path | None = None,
                   seed: int = 1) -> BenchReport:
    from pydicom import dcmread

    tmp = Path(tempfile.mkdtemp(prefix="dicomnode-bench-stow-", dir=workdir))
    try:
        files = files or synth_dbt_files(tmp, seed)
        total_bytes = sum(f.stat().st_size for f in files)
        study_uids = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
        report = BenchReport("stow", device="cpu", memory_kind="rss")
        cstore, stow = [], []
        for round_ in range(runs):
            for kind, samples in (("cstore", cstore), ("stow", stow)):
                node = _Node(tmp / f"node-{kind}-{round_}")
                try:
                    if kind == "cstore":
                        samples.append(_send(files, node.scp.port, "DICOMNODE"))
                    else:
                        samples.append(_stow(files, node.stow.url))
                    if _count(node, study_uids) != len(files):
                        raise DicomnodeError(f"{kind}: the node indexed "
                                             f"{_count(node, study_uids)} of {len(files)} "
                                             "instances")
                finally:
                    node.close()
        cstore_s = report.add_timing("C-STORE (dcmtk storescu): send study", cstore)
        stow_s = report.add_timing("STOW-RS (one request): send study", stow)
        for name, seconds in (("C-STORE", cstore_s), ("STOW-RS", stow_s)):
            report.add_throughput(name, seconds, len(files), total_bytes)
        report.add_ratio("STOW-RS / C-STORE throughput", cstore_s / stow_s, "C-STORE")
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
