"""Sending results back: C-STORE SCU driven by the storage delivery queue.

Each round claims the due deliveries, groups them by destination and sends each group on
its own thread over one association, so one slow or dead destination never holds up the
others. Failures go back to the queue, which backs off with jitter and dead-letters after
the configured number of attempts (`dicomnode jobs retry` sends them again).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom import _config as _pynetdicom_config

from dicomnode import metrics
from dicomnode.logs import kv

if TYPE_CHECKING:
    from dicomnode.config import Config, PeerConfig
    from storage import Store
    from storage.records import DeliveryTask

log = logging.getLogger("dicomnode.scu")

# Result SOP classes, added to pynetdicom's storage contexts (which lack Parametric Map).
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
MAMMOGRAPHY_CAD_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.50"
RESULT_SOP_CLASSES = (PARAMETRIC_MAP_STORAGE, SEGMENTATION_STORAGE,
                      COMPREHENSIVE_3D_SR_STORAGE, MAMMOGRAPHY_CAD_SR_STORAGE)
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
# Results the node may write deflated (ResultOptions.deflate): proposed in a context of
# their own with deflate alone, so a peer that takes it cannot pick Explicit VR instead.
DEFLATABLE = (PARAMETRIC_MAP_STORAGE, SEGMENTATION_STORAGE)


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int


def destinations_from_config(config: Config) -> dict[str, Destination]:
    """Result destinations by AE title: the configured peers that accept results."""
    return {p.ae_title: Destination(p.ae_title, p.host, p.port)
            for p in config.peers if p.send_results}


def destination_for(peer: PeerConfig) -> Destination:
    return Destination(peer.ae_title, peer.host, peer.port)


def build_scu(ae_title: str) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 15
    ae.network_timeout = 60
    ae.dimse_timeout = 120
    ae.maximum_pdu_size = 0
    # send_files passes a path only when the file goes as stored: stream it (process-wide
    # pynetdicom setting; it changes nothing for datasets passed decoded)
    _pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    # pynetdicom allows 128 requested contexts: the result classes come first so they always
    # fit, then the common storage classes.
    for uid in RESULT_SOP_CLASSES:
        if uid in DEFLATABLE:
            ae.add_requested_context(uid, [DEFLATED_LE])
        ae.add_requested_context(uid, [EXPLICIT_LE, IMPLICIT_LE])
    for context in StoragePresentationContexts:
        if len(ae.requested_contexts) >= 128:
            break
        if context.abstract_syntax not in RESULT_SOP_CLASSES:
            ae.add_requested_context(context.abstract_syntax, [EXPLICIT_LE, IMPLICIT_LE])
    return ae


@dataclass(frozen=True)
class SendOutcome:
    ok: bool
    status: str  # "0x0000", "0xA700", "refused", "unreachable", ...
    error: str | None = None


def send_files(ae: AE, destination: Destination, tasks: list[DeliveryTask]
               ) -> list[SendOutcome]:
    """C-STORE each task's file to the destination over one association."""
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        status = "refused" if assoc.is_rejected else "unreachable"
        why = (f"association {status} by {destination.ae_title} at "
               f"{destination.host}:{destination.port}")
        return [SendOutcome(False, status, why) for _ in tasks]
    outcomes: list[SendOutcome] = []
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
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


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
    if ds.file_meta.get("TransferSyntaxUID") != DEFLATED_LE:
        return
    sop_class = str(ds.SOPClassUID)
    if not any(c.abstract_syntax == sop_class and c.transfer_syntax[0] == DEFLATED_LE
               for c in assoc.accepted_contexts):
        ds.file_meta.TransferSyntaxUID = EXPLICIT_LE


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
        if destination is None:
            outcomes = [SendOutcome(False, "unknown-destination",
                                    f"{name} is not a configured peer with send_results")
                        ] * len(tasks)
        else:
            try:
                outcomes = send_files(self.ae, destination, tasks)
            except Exception as exc:  # network errors of any kind: retry later
                log.exception("event=delivery_error %s", kv(destination=name))
                outcomes = [SendOutcome(False, "error", str(exc))] * len(tasks)
        for task, outcome in zip(tasks, outcomes, strict=True):
            from storage.errors import LeaseLost

            try:
                update = self.store.record_delivery_attempt(
                    task.id, self.worker_id, ok=outcome.ok, status=outcome.status,
                    error=outcome.error)
            except LeaseLost:
                continue
            if outcome.ok:
                self.sent += 1
                metrics.DELIVERIES.inc(destination=name)
            else:
                self.failures += 1
                metrics.DELIVERY_FAILURES.inc(destination=name, status=outcome.status)
            log.log(logging.INFO if outcome.ok else logging.WARNING, "event=delivery %s", kv(
                destination=name, study_uid=task.study_uid, sop_instance_uid=task.sop_instance_uid,
                status=outcome.status, state=str(update.state), attempts=update.attempts,
                error=outcome.error or ""))
