"""What an operator (``dicomnode status``), a load balancer (/health/ready) and Prometheus
(/metrics) ask of a running node: queue depth, disk, and the live state of each process.

Each node process (serve, worker, run) writes a small JSON status file under
``<data_dir>/status/`` every few seconds (associations open, instances received, models
loaded), so that ``dicomnode status`` on the same machine can report it without a network
endpoint; the HTTP endpoint (``[http] listen``) serves the same from memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.ops import prometheus
from dicomnode.ops.logs import kv

if TYPE_CHECKING:
    from storage import AuditRecord, Store

log = logging.getLogger("dicomnode.health")

STATUS_INTERVAL_S = 5.0
# A status file not refreshed for this long belongs to a process that is gone.
STATUS_STALE_S = 4 * STATUS_INTERVAL_S


@dataclass
class QueueSnapshot:
    jobs: dict[str, int]
    deliveries: dict[str, int]
    oldest_queued_job: int | None = None
    oldest_queued_at: datetime | None = None

    @property
    def oldest_queued_seconds(self) -> float | None:
        if self.oldest_queued_at is None:
            return None
        from storage import utcnow

        return max(0.0, (utcnow() - self.oldest_queued_at).total_seconds())


def queue_snapshot(store: Store) -> QueueSnapshot:
    """Jobs and deliveries by state, and the job that has waited longest for a worker."""
    counts = store.queue_counts()
    snapshot = QueueSnapshot(
        jobs={str(k): int(v) for k, v in counts["jobs"].items()},
        deliveries={str(k): int(v) for k, v in counts["deliveries"].items()})
    oldest = store.oldest_queued_job()
    if oldest is not None:
        snapshot.oldest_queued_job, snapshot.oldest_queued_at = oldest
    return snapshot


def recent_audit(store: Store, count: int) -> list[AuditRecord]:
    """The last ``count`` audit events, oldest first (Store.audit_trail reads from the start)."""
    return store.recent_audit(count)


def last_audit(store: Store, event: str) -> AuditRecord | None:
    """The newest audit event of this kind (e.g. "retrieve", "export"), or None."""
    return store.last_audit(event)


def run_outcomes(record: AuditRecord) -> dict[str, int]:
    """{outcome: studies} of a retrieve/export audit record, whose detail is
    "outcome=n outcome=n ..." (see dicomnode.network.retrieve and dicomnode.export.training_set)."""
    out = {}
    for part in (record.detail or "").split():
        key, _, value = part.partition("=")
        if value.isdigit():
            out[key] = int(value)
    return out


def queue_collector(store: Store) -> Callable[[], None]:
    """A metrics collector that refreshes the queue gauges from the store at scrape time."""

    def collect() -> None:
        snap = queue_snapshot(store)
        values: dict[tuple[str, ...], float] = {
            ("jobs", state): n for state, n in snap.jobs.items()}
        values.update({("deliveries", state): n for state, n in snap.deliveries.items()})
        prometheus.QUEUE_DEPTH.replace(values)
        prometheus.OLDEST_QUEUED_SECONDS.set(snap.oldest_queued_seconds or 0.0)
        prometheus.COMMITMENTS.replace({(str(k),): int(v)
                                     for k, v in store.commitment_counts().items()})
        for activity in ("retrieve", "export"):
            record = last_audit(store, activity)
            if record is not None:
                prometheus.LAST_RUN_TIMESTAMP.set(record.at.timestamp(), activity=activity)
                for outcome, n in run_outcomes(record).items():
                    prometheus.LAST_RUN_STUDIES.set(n, activity=activity, outcome=outcome)

    return collect


def disk_free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


# ----------------------------------------------------------------------- status files


@dataclass
class ProcessStatus:
    role: str  # serve | worker | run
    host: str
    pid: int
    started_at: float
    updated_at: float = 0.0
    ae_title: str = ""
    listen: str = ""  # host:port of the SCP, "" for a worker
    http: str = ""
    associations_open: int = 0
    instances_received: int = 0
    bytes_received: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    deliveries_sent: int = 0
    delivery_failures: int = 0
    stow_listen: str = ""  # URL of the STOW-RS endpoint, "" when off
    stow_requests: int = 0
    stow_instances_received: int = 0
    stow_bytes_received: int = 0
    device: str = ""
    models_loaded: dict[str, str] = field(default_factory=dict)  # modality -> device

    @property
    def age_s(self) -> float:
        return time.time() - self.updated_at


def status_dir(data_dir: Path) -> Path:
    return data_dir / "status"


class StatusWriter:
    """Refreshes this process's status file every few seconds (atomic rename) and removes
    it on stop. ``fill`` updates the live fields just before each write."""

    def __init__(self, data_dir: Path, status: ProcessStatus,
                 fill: Callable[[ProcessStatus], None],
                 interval_s: float = STATUS_INTERVAL_S) -> None:
        self.status = status
        self.fill = fill
        self.interval_s = interval_s
        self.path = status_dir(data_dir) / f"{status.role}-{status.host}-{status.pid}.json"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="status-file", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread.start()

    def write(self) -> None:
        try:
            self.fill(self.status)
            self.status.updated_at = time.time()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self.status)))
            os.replace(tmp, self.path)
        except Exception as exc:  # status is informative: never let it stop the node
            log.warning("event=status_file_failed %s", kv(path=self.path, error=exc))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def read_status_files(data_dir: Path) -> list[ProcessStatus]:
    """Live processes of this data directory; files of dead processes are skipped."""
    found = []
    here = socket.gethostname()
    for path in sorted(status_dir(data_dir).glob("*.json")):
        try:
            status = ProcessStatus(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if status.host == here and not _pid_alive(status.pid):
            continue
        if status.age_s > STATUS_STALE_S:
            continue
        found.append(status)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_process_status(role: str, **fields: Any) -> ProcessStatus:
    return ProcessStatus(role=role, host=socket.gethostname(), pid=os.getpid(),
                         started_at=time.time(), **fields)
