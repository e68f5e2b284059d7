"""Storage Commitment Push Model (PS3.4 Annex J) for delivered results.

After the C-STOREs of a delivery round to a destination configured with
``storage_commitment = true``, the node asks it by N-ACTION (Request Storage Commitment) to
commit the instances it accepted. The destination answers later with an N-EVENT-REPORT, on
the same association or on a new one to the node's SCP (as SCP role of the Storage
Commitment class); :func:`report_handler` records it per instance in the store.

The transaction is recorded before the N-ACTION goes out, so a report that arrives at once
(on another association, in another process) always finds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import evt

from dicomnode.identifiers import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from dicomnode.ops import prometheus
from dicomnode.ops.logs import kv

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association

    from storage import DeliveryTask, Store

log = logging.getLogger("dicomnode.commitment")

REQUEST_ACTION_TYPE = 1
EVENT_ALL_COMMITTED = 1
EVENT_FAILURES_EXIST = 2
_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def add_scu_context(ae: AE) -> None:
    """Propose Storage Commitment (node as SCU) on result associations; call first, before
    the 128 requested contexts fill up."""
    if STORAGE_COMMITMENT_PUSH not in {c.abstract_syntax for c in ae.requested_contexts}:
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH, _SYNTAXES)


def add_scp_context(ae: AE) -> None:
    """Accept Storage Commitment on the node's SCP, so that a destination can open an
    association to send its N-EVENT-REPORT (it proposes itself in the SCP role)."""
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH, _SYNTAXES, scu_role=True, scp_role=True)


def request_commitment(assoc: Association, store: Store, destination: str,
                       tasks: Sequence[DeliveryTask]) -> str:
    """N-ACTION for the instances of ``tasks`` (all accepted by the destination); records the
    transaction first, then its failure if the request is refused. The transaction UID."""
    transaction_uid = generate_uid()
    ids = [t.id for t in tasks]
    store.record_commitment_request(ids, transaction_uid, requested=True)
    request = Dataset()
    request.TransactionUID = transaction_uid
    request.ReferencedSOPSequence = []
    for task in tasks:
        item = Dataset()
        item.ReferencedSOPClassUID = task.sop_class_uid
        item.ReferencedSOPInstanceUID = task.sop_instance_uid
        request.ReferencedSOPSequence.append(item)
    failure: str | None = None
    try:
        status, _ = assoc.send_n_action(request, REQUEST_ACTION_TYPE, STORAGE_COMMITMENT_PUSH,
                                        STORAGE_COMMITMENT_INSTANCE)
        code = int(getattr(status, "Status", -1)) if status else -1
        if code == -1:
            failure = "no N-ACTION response"
        elif code != 0x0000:
            failure = f"N-ACTION 0x{code:04X}"
    except (ValueError, RuntimeError) as exc:  # no accepted context: destination lacks it
        failure = f"not negotiated: {exc}"[:64]
    if failure is not None:
        store.record_commitment_request(ids, transaction_uid, requested=False, failure=failure)
    prometheus.COMMITMENT_REQUESTS.inc(destination=destination,
                                    outcome="requested" if failure is None else "failed")
    log.log(logging.INFO if failure is None else logging.WARNING, "event=commitment_request %s",
            kv(destination=destination, transaction_uid=transaction_uid, instances=len(ids),
               error=failure or ""))
    return transaction_uid


def _uids(items: Sequence[Dataset] | None) -> list[str]:
    return [str(i.get("ReferencedSOPInstanceUID", "")) for i in items or []
            if i.get("ReferencedSOPInstanceUID")]


def parse_report(info: Dataset) -> tuple[str, list[str], dict[str, str]]:
    """(transaction UID, committed SOP Instance UIDs, {failed UID: Failure Reason})."""
    failed = {}
    for item in info.get("FailedSOPSequence", None) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid:
            reason = item.get("FailureReason", None)
            failed[uid] = f"0x{int(reason):04X}" if reason is not None else "unspecified"
    return (str(info.get("TransactionUID", "")), _uids(info.get("ReferencedSOPSequence", None)),
            failed)


def report_handler(store: Store) -> Callable[[evt.Event], tuple[int, Dataset | None]]:
    """An EVT_N_EVENT_REPORT handler recording Storage Commitment results in ``store``."""

    def handle(event: evt.Event) -> tuple[int, Dataset | None]:
        if str(event.request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            return 0x0118, None  # no such SOP class
        assoc = event.assoc
        reporter = (assoc.acceptor if assoc.is_requestor else assoc.requestor).ae_title
        reporter = str(reporter).strip()
        try:
            info = event.event_information
            transaction_uid, committed, failed = parse_report(info)
        except Exception:  # noqa: BLE001 - a malformed report must not end the association
            log.exception("event=commitment_report_unreadable %s", kv(reporter=reporter))
            return 0x0110, None
        if not transaction_uid:
            return 0x0115, None  # invalid argument value
        try:
            outcome = store.record_commitment_report(transaction_uid, committed=committed,
                                                     failed=failed, reporter_ae=reporter)
        except Exception:  # database down: the destination may report again
            log.exception("event=commitment_report_failed %s",
                          kv(reporter=reporter, transaction_uid=transaction_uid))
            return 0x0110, None
        prometheus.COMMITMENT_REPORTS.inc(reporter=reporter, outcome="committed",
                                       amount=outcome.committed)
        prometheus.COMMITMENT_REPORTS.inc(reporter=reporter, outcome="failed",
                                       amount=outcome.failed)
        log.log(logging.INFO if not outcome.failed else logging.WARNING,
                "event=commitment_report %s", kv(
                    reporter=reporter, transaction_uid=transaction_uid,
                    event_type=int(event.event_type or 0), committed=outcome.committed,
                    failed=outcome.failed, unknown=outcome.unknown))
        return 0x0000, None

    return handle


def handlers(store: Store) -> list[tuple]:
    """Event handlers to bind on an AE or association that may receive reports."""
    return [(evt.EVT_N_EVENT_REPORT, report_handler(store))]
