"""Sending results back: C-STORE SCU driven by the storage delivery queue.

Each round claims the due deliveries, groups them by destination and sends each group on
its own thread over one association (or, for a peer with ``dicomweb_url``, one STOW-RS
request), so one slow or dead destination never holds up the others. Failures go back to
the queue, which backs off with jitter and dead-letters after the configured number of
attempts (`dicomnode jobs retry` sends them again).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom import _config as _pynetdicom_config

from dicomnode.dicomweb.client import StowError, StowTarget, post_instances
from dicomnode.identifiers import DEFLATABLE_SOP_CLASSES, RESULT_SOP_CLASSES
from dicomnode.network import commitment
from dicomnode.ops import prometheus
from dicomnode.ops.logs import kv

if TYPE_CHECKING:
    from storage import DeliveryTask, Store

log = logging.getLogger("dicomnode.scu")


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    storage_commitment: bool = False  # ask it to commit what it accepted (N-ACTION)
    # STOW-RS instead of C-STORE when set (the peer's dicomweb_url and credentials)
    stow: StowTarget | None = None


def build_scu(ae_title: str) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 15
    ae.network_timeout = 60
    ae.dimse_timeout = 120
    ae.maximum_pdu_size = 0
    # send_files passes a path only when the file goes as stored: stream it (process-wide
    # pynetdicom setting; it changes nothing for datasets passed decoded)
    _pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    # pynetdicom allows 128 requested contexts: storage commitment and the result classes
    # come first so they always fit, then the common storage classes.
    commitment.add_scu_context(ae)
    for uid in RESULT_SOP_CLASSES:
        if uid in DEFLATABLE_SOP_CLASSES:
            ae.add_requested_context(uid, [DeflatedExplicitVRLittleEndian])
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for context in StoragePresentationContexts:
        if len(ae.requested_contexts) >= 128:
            break
        if context.abstract_syntax is not None and \
                context.abstract_syntax not in RESULT_SOP_CLASSES:
            ae.add_requested_context(context.abstract_syntax,
                                     [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


@dataclass(frozen=True)
class SendOutcome:
    ok: bool
    status: str  # "0x0000", "0xA700", "refused", "unreachable", ...
    error: str | None = None


def send_files(ae: AE, destination: Destination, tasks: list[DeliveryTask],
               on_outcome: Callable[[DeliveryTask, SendOutcome], None] | None = None,
               store: Store | None = None) -> list[SendOutcome]:
    """C-STORE each task's file to the destination over one association; then, where the
    destination is configured for it and a ``store`` records it, request storage commitment
    of the instances it accepted (its report may come on this association too).
    ``on_outcome`` is called with each task's outcome as soon as it is known (the Deliverer
    records it then, so a node killed mid-group re-sends only what was in flight, not what
    had arrived)."""
    handlers = commitment.handlers(store) if store is not None else []
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=handlers)
    if not assoc.is_established:
        failure = "refused" if assoc.is_rejected else "unreachable"
        why = (f"association {failure} by {destination.ae_title} at "
               f"{destination.host}:{destination.port}")
        outcomes = [SendOutcome(False, failure, why) for _ in tasks]
        if on_outcome is not None:
            for task, outcome in zip(tasks, outcomes, strict=True):
                on_outcome(task, outcome)
        return outcomes
    outcomes = _Outcomes(tasks, on_outcome)
    try:
        for task in tasks:
            if not assoc.is_established:
                outcomes.append(SendOutcome(False, "aborted", "association ended"))
                continue
            try:
                meta = read_file_meta_info(task.path)
                if _accepted(assoc, meta.get("MediaStorageSOPClassUID"),
                             meta.get("TransferSyntaxUID")):
                    # as stored: streamed from the file, never decoded and re-encoded (a
                    # deflated map would be inflated and deflated again: most of the send)
                    dataset: Dataset | Path = Path(task.path)
                else:
                    dataset = dcmread(task.path)
                    _uncompressed_unless_accepted(assoc, dataset)
            except (OSError, InvalidDicomError) as exc:
                outcomes.append(SendOutcome(False, "unreadable", f"{task.path}: {exc}"))
                continue
            try:
                rsp = _send(assoc, dataset)
            except (ValueError, RuntimeError) as exc:  # e.g. no accepted presentation context
                outcomes.append(SendOutcome(False, "no-context", str(exc)))
                continue
            status = int(getattr(rsp, "Status", -1)) if rsp else -1
            if status == -1:
                outcomes.append(SendOutcome(False, "no-response", "no C-STORE response"))
            elif status in (0x0000, 0xB000, 0xB006, 0xB007):  # success or warning
                outcomes.append(SendOutcome(True, f"0x{status:04X}"))
            else:
                comment = str(getattr(rsp, "ErrorComment", "") or "")
                outcomes.append(SendOutcome(False, f"0x{status:04X}", comment or None))
        accepted = [t for t, o in zip(tasks, outcomes, strict=True) if o.ok]
        if destination.storage_commitment and store is not None and accepted \
                and assoc.is_established:
            commitment.request_commitment(assoc, store, destination.ae_title, accepted)
    finally:
        if assoc.is_established:
            assoc.release()
    return list(outcomes)


class _Outcomes(list):
    """The outcomes of a group in task order, each handed on as it is appended."""

    def __init__(self, tasks: list[DeliveryTask],
                 on_outcome: Callable[[DeliveryTask, SendOutcome], None] | None) -> None:
        super().__init__()
        self.tasks, self.on_outcome = tasks, on_outcome

    def append(self, outcome: SendOutcome) -> None:
        task = self.tasks[len(self)]
        super().append(outcome)
        if self.on_outcome is not None:
            self.on_outcome(task, outcome)


# Largest STOW-RS request body the sender builds: results of a full-size DBT (float maps of
# about 1 GB) go in several requests, each answered well within the delivery lease.
STOW_REQUEST_BYTES = 512 * 2**20


def send_stow(target: StowTarget, tasks: list[DeliveryTask], *,
              max_request_bytes: int = STOW_REQUEST_BYTES) -> list[SendOutcome]:
    """STOW-RS the tasks' files to the destination, as few requests as the size cap allows
    (they may span studies: POST /studies, each instance carries its own Study UID)."""
    outcomes: dict[int, SendOutcome] = {}
    batch: list[DeliveryTask] = []
    batch_bytes = 0
    for task in tasks:
        try:
            size = task.path.stat().st_size
        except OSError as exc:
            outcomes[task.id] = SendOutcome(False, "unreadable", f"{task.path}: {exc}")
            continue
        if batch and batch_bytes + size > max_request_bytes:
            outcomes.update(_stow_batch(target, batch))
            batch, batch_bytes = [], 0
        batch.append(task)
        batch_bytes += size
    if batch:
        outcomes.update(_stow_batch(target, batch))
    return [outcomes[t.id] for t in tasks]


def _stow_batch(target: StowTarget, tasks: list[DeliveryTask]) -> dict[int, SendOutcome]:
    try:
        rsp = post_instances(target, [t.path for t in tasks])
    except StowError as exc:
        return {t.id: SendOutcome(False, "unreachable", str(exc)) for t in tasks}
    return {t.id: _stow_outcome(rsp, t.sop_instance_uid) for t in tasks}


def _stow_outcome(rsp, sop_instance_uid: str) -> SendOutcome:
    if sop_instance_uid in rsp.failed:
        return SendOutcome(False, f"0x{rsp.failed[sop_instance_uid]:04X}",
                           f"STOW-RS HTTP {rsp.status}: failed ({rsp.error or 'no reason'})")
    if rsp.status == 200 or (rsp.status == 202 and sop_instance_uid in rsp.stored):
        return SendOutcome(True, f"http-{rsp.status}")
    return SendOutcome(False, f"http-{rsp.status}", rsp.error or f"STOW-RS HTTP {rsp.status}")


def _accepted(assoc, sop_class: str | None, transfer_syntax: str | None) -> bool:
    """Whether the association has a context for exactly this class and transfer syntax."""
    return any(c.abstract_syntax == sop_class and c.transfer_syntax[0] == transfer_syntax
               for c in assoc.accepted_contexts)


def _send(assoc, dataset: Dataset | Path):
    """C-STORE a dataset, or a file's encoded bytes as they are: with pynetdicom's
    STORE_SEND_CHUNKED_DATASET (set in build_scu) a path is streamed after its file meta,
    in the transfer syntax it is stored in."""
    return assoc.send_c_store(dataset)


def _uncompressed_unless_accepted(assoc, ds) -> None:
    """A deflated result to a peer that did not accept deflate for its class: send it as
    Explicit VR Little Endian (dcmread has inflated it: only the label changes)."""
    if ds.file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    sop_class = str(ds.SOPClassUID)
    if not any(c.abstract_syntax == sop_class
               and c.transfer_syntax[0] == DeflatedExplicitVRLittleEndian
               for c in assoc.accepted_contexts):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


class Deliverer:
    """Sends due deliveries; call :meth:`run_once` from a worker loop."""

    def __init__(self, store: Store, ae_title: str, destinations: dict[str, Destination],
                 worker_id: str, *, max_parallel: int = 4) -> None:
        self.store = store
        self.ae = build_scu(ae_title)
        self.destinations = destinations
        self.worker_id = worker_id
        self.max_parallel = max_parallel
        self.failures = 0
        self.sent = 0

    def run_once(self, limit: int = 64) -> int:
        """Send what is due now; how many deliveries were attempted."""
        tasks = self.store.claim_due_deliveries(self.worker_id, limit=limit)
        if not tasks:
            return 0
        by_destination: dict[str, list[DeliveryTask]] = defaultdict(list)
        for task in tasks:
            by_destination[task.destination].append(task)
        with ThreadPoolExecutor(max_workers=min(self.max_parallel, len(by_destination))) as pool:
            for name, group in by_destination.items():
                pool.submit(self._deliver_group, name, group)
        return len(tasks)

    def _deliver_group(self, name: str, tasks: list[DeliveryTask]) -> None:
        destination = self.destinations.get(name)
        recorded: set[int] = set()

        def record(task: DeliveryTask, outcome: SendOutcome) -> None:
            recorded.add(task.id)
            self._record(name, task, outcome)

        if destination is None:
            outcome = SendOutcome(False, "unknown-destination",
                                  f"{name} is not a configured peer with send_results")
        else:
            try:
                if destination.stow is not None:
                    for task, sent in zip(tasks, send_stow(destination.stow, tasks),
                                          strict=True):
                        record(task, sent)
                else:
                    send_files(self.ae, destination, tasks, on_outcome=record,
                               store=self.store)
                return
            except Exception as exc:  # network errors of any kind: retry later
                log.exception("event=delivery_error %s", kv(destination=name))
                outcome = SendOutcome(False, "error", str(exc))
        for task in tasks:
            if task.id not in recorded:
                self._record(name, task, outcome)

    def _record(self, name: str, task: DeliveryTask, outcome: SendOutcome) -> None:
        """Record one attempt now: a kill after this never sends that delivery again."""
        from storage import LeaseLost

        try:
            update = self.store.record_delivery_attempt(
                task.id, self.worker_id, ok=outcome.ok, status=outcome.status,
                error=outcome.error)
        except LeaseLost:
            return
        if outcome.ok:
            self.sent += 1
            prometheus.DELIVERIES.inc(destination=name)
        else:
            self.failures += 1
            prometheus.DELIVERY_FAILURES.inc(destination=name, status=outcome.status)
        log.log(logging.INFO if outcome.ok else logging.WARNING, "event=delivery %s", kv(
            destination=name, study_uid=task.study_uid, sop_instance_uid=task.sop_instance_uid,
            status=outcome.status, state=str(update.state), attempts=update.attempts,
            error=outcome.error or ""))
