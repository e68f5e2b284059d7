"""A small thread-safe metrics registry rendered in the Prometheus text format (0.0.4).

Counters, gauges and histograms with labels; no dependency. The SCP, the worker and the
SCU increment the module-level metrics below; ``dicomnode.ops.http`` serves ``render()`` at
/metrics. Values are per process: run one scrape target per node process.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

LabelValues = tuple[str, ...]

# Seconds: from a fast SCP write to a full-size DBT inference on a CPU.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0, 600.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, object]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {list(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = [f"# HELP {self.name} {_escape(self.help)}", f"# TYPE {self.name} {self.kind}"]
        return "\n".join([*head, *self.samples()])


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0.0)]  # an unlabelled counter exists from the start
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def replace(self, values: dict[LabelValues, float]) -> None:
        """Set the whole label set at once (labels absent now disappear)."""
        with self._lock:
            self._values = {tuple(map(str, k)): float(v) for k, v in values.items()}


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets))
        # per label set: counts per bucket (non-cumulative), sum, count
        self._data: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * len(self.buckets), [0.0, 0.0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
                    break
            total[0] += value
            total[1] += 1

    def count(self, **labels: object) -> int:
        with self._lock:
            data = self._data.get(self._key(labels))
            return int(data[1][1]) if data else 0

    def samples(self) -> Iterable[str]:
        with self._lock:
            items = sorted((k, (list(c), list(t))) for k, (c, t) in self._data.items())
        lines = []
        for key, (counts, (total, n)) in items:
            cumulative = 0
            for bound, c in zip(self.buckets, counts, strict=True):
                cumulative += c
                le = _labels(self.labelnames, key, f'le="{_number(bound)}"')
                lines.append(f"{self.name}_bucket{le} {cumulative}")
            inf = _labels(self.labelnames, key, 'le="+Inf"')
            lines.append(f"{self.name}_bucket{inf} {int(n)}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {int(n)}")
        return lines


class Registry:
    """Named metrics plus collectors: callables run before each rendering (e.g. to read the
    queue depth from the database only when scraped)."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def _add(self, metric: _Metric) -> _Metric:
        with self._lock:
            existing = self._metrics.get(metric.name)
            if existing is not None:
                if type(existing) is not type(metric) or existing.labelnames != metric.labelnames:
                    raise ValueError(f"metric {metric.name} is already registered differently")
                return existing
            self._metrics[metric.name] = metric
            return metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labelnames))  # type: ignore[return-value]

    def histogram(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help_text, labelnames, buckets))  # type: ignore

    def add_collector(self, collect: Callable[[], None]) -> None:
        with self._lock:
            self._collectors.append(collect)

    def remove_collector(self, collect: Callable[[], None]) -> None:
        with self._lock:
            if collect in self._collectors:
                self._collectors.remove(collect)

    def render(self) -> str:
        with self._lock:
            collectors = list(self._collectors)
            metrics = sorted(self._metrics.values(), key=lambda m: m.name)
        for collect in collectors:
            try:
                collect()
            except Exception:  # a failing collector (database down) must not break /metrics
                SCRAPE_ERRORS.inc()
        return "\n".join(m.render() for m in metrics) + "\n"


REGISTRY = Registry()

SCRAPE_ERRORS = REGISTRY.counter(
    "dicomnode_scrape_collector_errors_total",
    "Collectors (e.g. the queue depth query) that failed during a scrape.")

# -- receiving (scp.py) -----------------------------------------------------------------
INSTANCES_RECEIVED = REGISTRY.counter(
    "dicomnode_instances_received_total", "Instances stored and acknowledged.", ["outcome"])
BYTES_RECEIVED = REGISTRY.counter(
    "dicomnode_received_bytes_total", "Bytes of instances stored and acknowledged.")
STORE_REFUSALS = REGISTRY.counter(
    "dicomnode_store_refusals_total", "C-STORE requests refused, by status.", ["status"])
ASSOCIATION_REFUSALS = REGISTRY.counter(
    "dicomnode_association_refusals_total",
    "Associations rejected, by reason (called_ae, calling_ae, busy, other).", ["reason"])
CONNECTIONS_REFUSED = REGISTRY.counter(
    "dicomnode_connections_refused_total",
    "Connections closed or associations aborted by the wire guard, by reason "
    "(pending_limit, pending_per_address, request_timeout, request_too_large, "
    "not_association_request, tls_handshake, closed, pdu_too_large, malformed_dimse).",
    ["reason"])
ASSOCIATIONS = REGISTRY.counter(
    "dicomnode_associations_total", "Associations accepted and closed, by outcome.", ["outcome"])
ASSOCIATIONS_OPEN = REGISTRY.gauge(
    "dicomnode_associations_open", "Associations open now.")
STORE_SECONDS = REGISTRY.histogram(
    "dicomnode_store_seconds", "Time to check, write (fsync) and index one instance.")

# -- STOW-RS receiving (dicomweb/stow.py); its stored instances also count above ----------
STOW_REQUESTS = REGISTRY.counter(
    "dicomnode_stow_requests_total", "STOW-RS requests answered, by HTTP status.", ["status"])
STOW_INSTANCES = REGISTRY.counter(
    "dicomnode_stow_instances_total",
    "STOW-RS parts, by result: storage's outcome (stored, duplicate, ...) or the Failure "
    "Reason (0x0122, 0xC000, ...).", ["result"])
STOW_BYTES = REGISTRY.counter(
    "dicomnode_stow_received_bytes_total", "Bytes of STOW-RS request bodies read.")
STOW_SECONDS = REGISTRY.histogram(
    "dicomnode_stow_seconds", "Time to receive, write (fsync) and index one STOW-RS request.")

# -- inference (worker.py) ------------------------------------------------------------
JOB_STAGE_SECONDS = REGISTRY.histogram(
    "dicomnode_job_stage_seconds",
    "Seconds per job and stage (load, model, results, total; wait = ready to claimed).",
    ["stage"])
MODEL_SECONDS = REGISTRY.counter(
    "dicomnode_model_seconds_total", "Seconds spent in the model, by modality.", ["modality"])
IMAGES_ANALYSED = REGISTRY.counter(
    "dicomnode_images_analysed_total", "Images run through the model, by modality.",
    ["modality"])
JOBS = REGISTRY.counter(
    "dicomnode_jobs_total", "Jobs finished by this process, by outcome (done, failed, retry).",
    ["outcome"])
MODELS_LOADED = REGISTRY.gauge(
    "dicomnode_model_loaded", "1 for each modality whose model this process has loaded.",
    ["modality", "device"])

# -- delivery (scu.py) ----------------------------------------------------------------
DELIVERIES = REGISTRY.counter(
    "dicomnode_deliveries_total", "Results sent successfully, by destination.", ["destination"])
DELIVERY_FAILURES = REGISTRY.counter(
    "dicomnode_delivery_failures_total",
    "Failed delivery attempts, by destination and status (refused, unreachable, 0xA700...).",
    ["destination", "status"])

# -- retention (retention.py) -----------------------------------------------------------
RETENTION_RUNS = REGISTRY.counter(
    "dicomnode_retention_runs_total",
    "Runs of [storage] retention_days by this process, by outcome (ok, error).", ["outcome"])
RETENTION_STUDIES = REGISTRY.counter(
    "dicomnode_retention_studies_removed_total",
    "Studies (instances, results and their rows) removed by retention in this process.")
RETENTION_BYTES = REGISTRY.counter(
    "dicomnode_retention_freed_bytes_total", "Archive bytes freed by retention in this process.")

# -- storage commitment (commitment.py) ------------------------------------------------
COMMITMENT_REQUESTS = REGISTRY.counter(
    "dicomnode_commitment_requests_total",
    "Storage Commitment N-ACTIONs sent, by destination and outcome (requested, failed).",
    ["destination", "outcome"])
COMMITMENT_REPORTS = REGISTRY.counter(
    "dicomnode_commitment_reported_instances_total",
    "Instances settled by N-EVENT-REPORTs received, by reporting AE and outcome.",
    ["reporter", "outcome"])
COMMITMENTS = REGISTRY.gauge(
    "dicomnode_commitments", "Delivered results by storage commitment state (whole store).",
    ["state"])

# -- retrieve and export (the CLI commands; read from the audit trail at scrape time) ----
LAST_RUN_TIMESTAMP = REGISTRY.gauge(
    "dicomnode_last_run_timestamp_seconds",
    "When `dicomnode retrieve` / `export` last finished (Unix time), by activity.",
    ["activity"])
LAST_RUN_STUDIES = REGISTRY.gauge(
    "dicomnode_last_run_studies",
    "Studies in the last retrieve / export, by activity and outcome.",
    ["activity", "outcome"])

# -- queue (read from the database at scrape time) -------------------------------------
QUEUE_DEPTH = REGISTRY.gauge(
    "dicomnode_queue_depth", "Jobs and deliveries by queue and state (whole store).",
    ["queue", "state"])
OLDEST_QUEUED_SECONDS = REGISTRY.gauge(
    "dicomnode_oldest_queued_job_seconds", "Age of the oldest job waiting for a worker.")


def render() -> str:
    return REGISTRY.render()
