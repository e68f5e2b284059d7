"""`dicomnode bench store`: job claims per second with N worker processes, and instance
index inserts per second, on SQLite and (given a URL) PostgreSQL.

Each engine gets a scratch database (a temporary SQLite file; a temporary PostgreSQL schema
dropped afterwards), so the benchmark never touches the node's own data.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation, ExplicitVRLittleEndian

from dicomnode.bench.report import BenchReport


@contextmanager
def _scratch_url(engine: str, postgres_url: str | None, workdir: Path) -> Iterator[str]:
    from storage import scratch_schema, upgrade

    if engine == "sqlite":
        url = f"sqlite:///{workdir / 'bench.db'}"
        upgrade(url)
        yield url
        return
    assert postgres_url
    with scratch_schema(postgres_url, "dicomnode_bench") as url:
        upgrade(url)
        yield url


def _claims_per_second(url: str, archive: Path, workers: int, jobs: int) -> float:
    """Seconds for ``workers`` processes to claim and complete ``jobs`` queued jobs."""
    from storage import Store, claim_worker, seed_queued_jobs

    with Store(url, archive, create_schema=False) as store:
        seed_queued_jobs(store, jobs, tag=int(time.time() * 1000) % 10**9)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=claim_worker,
                         args=(url, str(archive), f"bench-{i}", barrier, results))
             for i in range(workers)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    done = sum(len(r[1]) for r in reports)
    if done != jobs:
        raise RuntimeError(f"bench store: {done} of {jobs} jobs processed")
    return max(r[3] for r in reports) - min(r[2] for r in reports)


def _insert_seconds(url: str, archive: Path, count: int, size: int) -> float:
    """Seconds to store ``count`` instances of ``size`` bytes (file, fsync, index row)."""
    from storage import Store

    payload = bytes(size)
    with Store(url, archive, create_schema=False) as store:
        start = time.perf_counter()
        for n in range(count):
            study, series = n // 100, n // 10
            store.store_instance(
                encoded=payload[:-8] + n.to_bytes(8, "big"),
                sop_instance_uid=f"2.25.7.{study}.{series}.{n}",
                sop_class_uid=DigitalMammographyXRayImageStorageForPresentation,
                study_uid=f"2.25.7.{study}", series_uid=f"2.25.7.{study}.{series}",
                transfer_syntax=ExplicitVRLittleEndian, patient_key=f"bench-{study}",
                calling_ae="BENCH",
                modality="MG", laterality="L", view="CC")
        return time.perf_counter() - start


def run_store_bench(*, postgres_url: str | None, workers: int = 4, jobs: int = 1000,
                    instances: int = 500, instance_bytes: int = 1024) -> BenchReport:
    report = BenchReport(benchmark="store", device="cpu", memory_kind="rss")
    engines = ["sqlite"] + (["postgresql"] if postgres_url else [])
    claims: dict[str, float] = {}
    inserts: dict[str, float] = {}
    for engine in engines:
        with tempfile.TemporaryDirectory(prefix=f"dicomnode-bench-{engine}-") as tmp:
            workdir = Path(tmp)
            with _scratch_url(engine, postgres_url, workdir) as url:
                single = _claims_per_second(url, workdir / "archive", 1, jobs)
                many = _claims_per_second(url, workdir / "archive", workers, jobs)
                seconds = _insert_seconds(url, workdir / "archive", instances, instance_bytes)
        claims[engine] = jobs / many
        inserts[engine] = instances / seconds
        report.rows.append({"name": "claim+complete", "engine": engine, "workers": workers,
                            "count": jobs, "per_s": jobs / many})
        report.rows.append({"name": "claim+complete", "engine": engine, "workers": 1,
                            "count": jobs, "per_s": jobs / single})
        report.rows.append({"name": f"store_instance ({instance_bytes} B, fsync)",
                            "engine": engine, "workers": 1, "count": instances,
                            "per_s": instances / seconds})
        report.add_timing(f"claim+complete x{jobs}, {workers} workers, {engine}", [many])
        report.add_timing(f"claim+complete x{jobs}, 1 worker, {engine}", [single])
        report.add_timing(f"store_instance x{instances}, {engine}", [seconds])
        report.add_ratio(f"claims/s {workers} workers vs 1, {engine}", single / many,
                         f"1 worker, {engine}")
    if "postgresql" in claims:
        report.add_ratio(f"claims/s postgresql vs sqlite, {workers} workers",
                         claims["postgresql"] / claims["sqlite"], "sqlite")
        report.add_ratio("store_instance/s postgresql vs sqlite",
                         inserts["postgresql"] / inserts["sqlite"], "sqlite")
    return report
