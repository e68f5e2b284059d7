"""Apply ``[storage] retention_days`` in the running node.

The worker loop (``dicomnode worker`` and ``dicomnode run``) calls :meth:`RetentionSchedule.
run_due` on every turn: it runs :meth:`storage.Store.apply_retention` once when the worker
starts and then every ``[storage] retention_interval_minutes``. Every worker does this, also
where several share one database: apply_retention is safe to run concurrently (each study is
removed by one transaction; files only once no row refers to them) and never removes a study
with an unfinished job, a pending delivery or uncommitted results. Each removed study is
logged, written to the audit trail ("retention" events) and counted in
``dicomnode_retention_studies_removed_total``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dicomnode.ops import prometheus
from dicomnode.ops.logs import kv
from dicomnode.wiring import retention_age

if TYPE_CHECKING:
    from dicomnode.config import Config
    from storage import RetentionReport, Store

log = logging.getLogger("dicomnode.retention")


class RetentionSchedule:
    """Runs retention when due; a failed run is logged and tried again one interval later."""

    def __init__(self, config: Config, store: Store, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.max_age = retention_age(config)
        self.interval_seconds = config.storage.retention_interval_minutes * 60.0
        self._clock = clock
        self._next: float | None = None   # None: due now (the first turn of the worker)

    @property
    def enabled(self) -> bool:
        return self.max_age is not None

    def run_due(self) -> RetentionReport | None:
        """Apply retention if it is on and due; the report, or None when nothing ran."""
        if self.max_age is None:
            return None
        now = self._clock()
        if self._next is not None and now < self._next:
            return None
        self._next = now + self.interval_seconds
        started = time.perf_counter()
        try:
            report = self.store.apply_retention(self.max_age)
        except Exception:  # a database hiccup: the worker goes on, retention tries later
            prometheus.RETENTION_RUNS.inc(outcome="error")
            log.exception("event=retention_failed %s",
                          kv(retry_in_s=round(self.interval_seconds)))
            return None
        prometheus.RETENTION_RUNS.inc(outcome="ok")
        prometheus.RETENTION_STUDIES.inc(report.studies)
        prometheus.RETENTION_BYTES.inc(report.bytes_freed)
        for study_uid in report.study_uids:
            log.info("event=retention_removed %s", kv(study_uid=study_uid))
        log.info("event=retention_applied %s", kv(
            max_age_days=self.max_age.days, studies=report.studies,
            instances=report.instances, results=report.results,
            bytes_freed=report.bytes_freed, seconds=round(time.perf_counter() - started, 2)))
        return report
