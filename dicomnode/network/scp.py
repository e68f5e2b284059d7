"""The receiving side of the node: a pynetdicom Storage SCP that archives what PACS send.

Fast path: the C-STORE handler writes the bytes exactly as the peer encoded them (the
received dataset buffer behind the file meta, never joined into one copy), so compressed
pixel data is stored as received and nothing is decoded or re-encoded; only the header is
parsed, to check and index the instance. The peer's success status goes out only after
storage has fsynced the file and committed its row. Every refusal is a standard C-STORE
status with an Error Comment, and the handler never raises: the node keeps serving whatever
a peer sends.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from dicomnode.errors import UnusableImageError
from dicomnode.identifiers import BREAST_IMAGE_SOP_CLASSES, RECEIVED_TRANSFER_SYNTAXES
from dicomnode.network import commitment
from dicomnode.network.guard import WireLimits, start_guarded_server, sweep_incoming
from dicomnode.network.instance_checks import (
    CANNOT_UNDERSTAND,
    NOT_AUTHORISED,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    EncodedInstance,
    StoreRefused,
    check_encoding,
    check_instance,
    check_pixel_data,
    parse_header,
)
from dicomnode.ops import prometheus
from dicomnode.ops.logs import kv
from dicomnode.pipeline.images import describe_dataset

if TYPE_CHECKING:
    from dicomnode.config import TLSConfig
    from storage import Store

log = logging.getLogger("dicomnode.scp")


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient, presentation provider, local limit exceeded

# How often the studies of open associations get their idle timers restarted (seconds);
# shorter where a study's idle time is short (wiring.hold_interval).
HOLD_SECONDS = 1.0


@dataclass(frozen=True)
class AllowedPeer:
    ae_title: str
    # "*" (this AE title from any address), an IP address, a CIDR range ("10.1.2.0/24") or a
    # host name (resolved to all its addresses).
    host: str


# How long a peer host name's resolved addresses are trusted before it is resolved again.
RESOLVE_SECONDS = 60.0


class _AddressBook:
    """Host names resolved to every address they have (IPv4 and IPv6), cached a short while
    so that a C-STORE does not wait on DNS; a name that does not resolve matches nothing."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, frozenset]] = {}
        self._lock = threading.Lock()

    def networks(self, host: str) -> frozenset:
        network = _as_network(host)
        if network is not None:
            return frozenset([network])
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        import socket

        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            found = frozenset(ipaddress.ip_network(info[4][0].split("%")[0])
                              for info in infos)
        except (OSError, ValueError) as exc:
            log.warning("event=peer_host_unresolved %s", kv(host=host, error=exc))
            found = frozenset()
        with self._lock:
            self._cache[host] = (now + RESOLVE_SECONDS, found)
        return found


def _as_network(host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """An IP literal or CIDR range as a network (a literal is a /32 or /128); else None."""
    try:
        return ipaddress.ip_network(host.strip("[]"), strict=False)
    except ValueError:
        return None


def _as_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.0.0.1 on a dual-stack socket is 10.0.0.1
    return ip


@dataclass
class ReceiverPolicy:
    """What the SCP accepts. Built from the configuration by :func:`policy_from_config`.

    A peer is admitted when its calling AE title is one of ``allowed_peers`` AND its source
    address matches that entry's host. No entry, no admission, unless ``accept_any_peer``
    (the admin's explicit opt-in to any calling AE from any address)."""

    ae_title: str
    allowed_peers: list[AllowedPeer] = field(default_factory=list)
    other_storage: str = "reject"  # "reject" (0x0122) or "store" (archived, not processed)
    max_associations: int = 16
    patient_key_salt: bytes = b""
    accept_any_peer: bool = False
    _addresses: _AddressBook = field(default_factory=_AddressBook, repr=False, compare=False)

    def peer_allowed(self, calling_ae: str, address: str) -> bool:
        if self.accept_any_peer:
            return True
        return any(p.ae_title == calling_ae and self._host_matches(p.host, address)
                   for p in self.allowed_peers)

    def address_known(self, address: str) -> bool:
        """Whether ``address`` is one a configured peer may connect from (whatever its AE
        title): such connections get their own share of the pending-connection slots."""
        if self.accept_any_peer:
            return False
        return any(p.host != "*" and self._host_matches(p.host, address)
                   for p in self.allowed_peers)

    def _host_matches(self, host: str, address: str) -> bool:
        if host == "*":
            return True
        ip = _as_address(address)
        if ip is None:
            return False
        return any(ip in network for network in self._addresses.networks(host))


def hold_studies(store: Store, uids: set[str]) -> None:
    """Restart the idle timers of studies still arriving (C-STORE associations, STOW-RS
    requests); a failure is logged and the next round tries again."""
    if not uids:
        return
    try:
        store.hold_receiving(uids)
    except Exception:  # receiving goes on regardless
        log.exception("event=study_hold_failed")


def patient_key(ds: Dataset, salt: bytes) -> str:
    """Opaque key that groups a patient's studies without storing the name or ID."""
    ident = "|".join(str(ds.get(k, "")) for k in ("PatientID", "IssuerOfPatientID"))
    if not ident.strip("|"):
        ident = "study:" + str(ds.get("StudyInstanceUID", ""))
    return hashlib.sha256(salt + ident.encode()).hexdigest()[:32]


def archive_instance(store: Store, encoded: bytes | EncodedInstance, policy: ReceiverPolicy, *,
                     calling_ae: str | None, sop_class: str | None = None,
                     sop_instance: str = "") -> tuple[str, Dataset]:
    """Check, archive and index one instance given as DICOM file bytes; the storage outcome
    and the parsed header. Raises StoreRefused with the C-STORE status that fits.

    ``sop_class``/``sop_instance`` are what the C-STORE request said (the file's own
    values when importing from disk)."""
    from storage import InsufficientStorage, InvalidUID, StorageError

    if not isinstance(encoded, EncodedInstance):
        encoded = EncodedInstance(encoded)
    ds = parse_header(encoded)
    check_encoding(encoded, str(ds.file_meta.get("TransferSyntaxUID", "")))
    sop_class = sop_class or str(ds.get("SOPClassUID", ""))
    if sop_class not in BREAST_IMAGE_SOP_CLASSES and policy.other_storage == "reject":
        raise StoreRefused(SOP_CLASS_NOT_SUPPORTED, f"SOP Class {sop_class} is not a breast image")
    check_instance(ds, sop_class, sop_instance)
    if "PixelData" in ds:
        check_pixel_data(ds, encoded)
    modality = laterality = view = None
    if sop_class in BREAST_IMAGE_SOP_CLASSES:
        try:
            modality, laterality, view = describe_dataset(ds, "C-STORE")
        except UnusableImageError as exc:  # e.g. a chest DX: not ours to process
            if policy.other_storage == "reject":
                raise StoreRefused(CANNOT_UNDERSTAND, f"not a breast image: {exc}") from None
    try:
        stored = store.store_instance(
            encoded=encoded.storable, sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID), study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            patient_key=patient_key(ds, policy.patient_key_salt), calling_ae=calling_ae,
            modality=modality, laterality=laterality, view=view or None,
            number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
    except InsufficientStorage as exc:
        raise StoreRefused(OUT_OF_RESOURCES, f"out of disk space: {exc}") from None
    except InvalidUID as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, str(exc)) from None
    except StorageError as exc:  # database unavailable or busy: the peer may retry
        raise StoreRefused(OUT_OF_RESOURCES, f"storage unavailable: {exc}") from None
    return str(stored.outcome), ds


class Receiver:
    """Handlers for one AE: C-ECHO, C-STORE and association events, bound to a store."""

    def __init__(self, store: Store, policy: ReceiverPolicy) -> None:
        self.store = store
        self.policy = policy
        self._counts: dict[int, int] = {}
        # Associations admitted under [node] max_associations, by id: counted here, at
        # A-ASSOCIATE-RQ, because pynetdicom's own limit counts every association in
        # negotiation, so a burst above the limit would have all of them rejected.
        self._admitted: dict[int, object] = {}
        # Studies each open association has stored to: held receiving until it closes
        # (hold_open_studies), as its next instance may be a DBT still on the wire.
        self._studies: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self.instances_received = 0
        self.bytes_received = 0

    # -- association events ------------------------------------------------------------

    def handle_requested(self, event: evt.Event) -> None:
        """Reject peers not in the allow-list (by AE title and address) and wrong called AEs."""
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = rq.calling_ae_title.strip()
        called = rq.called_ae_title.strip()
        address = assoc.requestor.address
        reason = None
        if called != self.policy.ae_title:
            reason, rsd = "called_ae", REJECT_CALLED_AE
        elif not self.policy.peer_allowed(calling, address):
            reason, rsd = "calling_ae", REJECT_CALLING_AE
        elif not self._admit(assoc):
            reason, rsd = "busy", REJECT_BUSY
        if reason is None:
            return
        prometheus.ASSOCIATION_REFUSALS.inc(reason=reason)
        log.warning("event=association_rejected %s",
                    kv(reason=reason, calling_ae=calling, called_ae=called, peer=address))
        self._audit("association_rejected", calling, called, address, status=reason)
        assoc.acse.send_reject(*rsd)
        assoc.is_rejected = True
        assoc.kill()

    def _admit(self, assoc) -> bool:
        with self._lock:
            # an association whose thread ended without a close event still frees its slot
            for key in [k for k, a in self._admitted.items() if not a.is_alive()]:
                del self._admitted[key]
            if len(self._admitted) >= self.policy.max_associations:
                return False
            self._admitted[id(assoc)] = assoc
            return True

    def handle_connection_closed(self, event: evt.Event) -> None:
        with self._lock:
            self._admitted.pop(id(event.assoc), None)
            self._studies.pop(id(event.assoc), None)

    def association_ended(self, assoc) -> None:
        """The association's thread has ended: whatever events fired or not (pynetdicom ends
        some associations without EVT_ABORTED, e.g. when its reader thread fails), its slot,
        its studies and its place in open_associations are released."""
        with self._lock:
            self._admitted.pop(id(assoc), None)
            self._studies.pop(id(assoc), None)
            count = self._counts.pop(id(assoc), None)
        if count is None:
            return  # closed through handle_closed, or never accepted
        prometheus.ASSOCIATIONS.inc(outcome="aborted")
        log.warning("event=association_closed %s", kv(
            calling_ae=assoc.requestor.ae_title.strip(), peer=assoc.requestor.address,
            instances=count, outcome="aborted", detail="ended without a close event"))
        self._audit("association", assoc.requestor.ae_title.strip(), self.policy.ae_title,
                    assoc.requestor.address, count=count, status="aborted")

    def handle_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejections (those of handle_requested never get here): its
        backstop association limit, or a failed user identity negotiation."""
        assoc = event.assoc
        busy = sum(a.is_acceptor for a in assoc.ae.active_associations) > \
            assoc.ae.maximum_associations
        reason = "busy" if busy else "other"
        prometheus.ASSOCIATION_REFUSALS.inc(reason=reason)
        rq = assoc.requestor.primitive
        calling = rq.calling_ae_title.strip() if rq is not None else ""
        log.warning("event=association_rejected %s", kv(
            reason=reason, calling_ae=calling, peer=assoc.requestor.address,
            max_associations=assoc.ae.maximum_associations))
        self._audit("association_rejected", calling, self.policy.ae_title,
                    assoc.requestor.address, status=reason)

    def handle_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._counts[id(event.assoc)] = 0

    def handle_closed(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            count = self._counts.pop(id(assoc), None)
            self._studies.pop(id(assoc), None)
        if count is None:
            return  # rejected, or never accepted
        prometheus.ASSOCIATIONS.inc(outcome="aborted" if assoc.is_aborted else "released")
        calling = assoc.requestor.ae_title.strip()
        log.info("event=association_closed %s", kv(
            calling_ae=calling, peer=assoc.requestor.address, instances=count,
            outcome="aborted" if assoc.is_aborted else "released"))
        self._audit("association", calling, self.policy.ae_title, assoc.requestor.address,
                    count=count, status="aborted" if assoc.is_aborted else "released")

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    # -- C-STORE -----------------------------------------------------------------------

    def handle_store(self, event: evt.Event) -> Dataset | int:
        started = time.perf_counter()
        calling = event.assoc.requestor.ae_title.strip()
        try:
            outcome, ds, size = self._store(event, calling)
        except StoreRefused as refused:
            prometheus.STORE_REFUSALS.inc(status=f"0x{refused.status:04X}")
            log.warning("event=store_refused %s", kv(
                calling_ae=calling, status=f"0x{refused.status:04X}", reason=refused.comment,
                sop_instance_uid=str(event.request.AffectedSOPInstanceUID or "")))
            status = Dataset()
            status.Status = refused.status
            status.ErrorComment = refused.comment
            return status
        except Exception:  # a bug must not take the association, or the node, down
            prometheus.STORE_REFUSALS.inc(status=f"0x{CANNOT_UNDERSTAND:04X}")
            log.exception("event=store_error %s", kv(calling_ae=calling))
            status = Dataset()
            status.Status = CANNOT_UNDERSTAND
            status.ErrorComment = "internal error while storing"
            return status
        with self._lock:
            self._counts[id(event.assoc)] = self._counts.get(id(event.assoc), 0) + 1
            self._studies.setdefault(id(event.assoc), set()).add(str(ds.StudyInstanceUID))
            self.instances_received += 1
            self.bytes_received += size
        elapsed = time.perf_counter() - started
        prometheus.INSTANCES_RECEIVED.inc(outcome=outcome)
        prometheus.BYTES_RECEIVED.inc(size)
        prometheus.STORE_SECONDS.observe(elapsed)
        log.info("event=stored %s", kv(
            calling_ae=calling, study_uid=ds.StudyInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID, outcome=outcome, bytes=size,
            ms=round(1000 * elapsed, 1)))
        return SUCCESS

    def _store(self, event: evt.Event, calling: str) -> tuple[str, Dataset, int]:
        if not self.policy.peer_allowed(calling, event.assoc.requestor.address):
            raise StoreRefused(NOT_AUTHORISED, f"{calling} may not store here")
        if not str(event.request.AffectedSOPInstanceUID or "").strip():  # PS3.7 9.3.1.1
            raise StoreRefused(CANNOT_UNDERSTAND, "C-STORE-RQ without Affected SOP Instance UID")
        encoded = EncodedInstance.from_c_store(event)
        try:
            outcome, ds = archive_instance(
                self.store, encoded, self.policy, calling_ae=calling,
                sop_class=str(event.context.abstract_syntax),
                sop_instance=str(event.request.AffectedSOPInstanceUID or ""))
            return outcome, ds, len(encoded)
        finally:
            encoded.close()

    def hold_open_studies(self) -> None:
        """Restart the idle timers of the studies open associations are sending.

        A C-STORE's dataset reaches the handler only once it is complete, so without this a
        study whose next instance takes longer than idle_seconds on the wire would start
        without it (and run again when it lands). It is complete when its association
        closes, or idle_seconds after its last instance, whichever is later."""
        with self._lock:
            uids = set().union(*self._studies.values())
        hold_studies(self.store, uids)

    def _audit(self, event: str, calling: str, called: str, peer: str, *,
               count: int | None = None, status: str | None = None) -> None:
        try:
            self.store.audit(event, calling_ae=calling, called_ae=called, peer=peer,
                             count=count, status=status)
        except Exception:  # the audit trail must never break receiving
            log.exception("event=audit_failed")

    @property
    def open_associations(self) -> int:
        with self._lock:
            return len(self._counts)

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_CONN_CLOSE, self.handle_connection_closed),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_RELEASED, self.handle_closed),
            (evt.EVT_ABORTED, self.handle_closed),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
        ]


def build_ae(policy: ReceiverPolicy, limits: WireLimits | None = None) -> AE:
    limits = limits or WireLimits()
    ae = AE(ae_title=policy.ae_title)
    # The limit is enforced by Receiver.handle_requested; pynetdicom's is only a backstop.
    ae.maximum_associations = 2 * policy.max_associations + 32
    # Announced to peers and enforced on every PDU before it is read (guard.py): large
    # enough that a DBT costs few round trips, bounded so no PDU can claim gigabytes.
    ae.maximum_pdu_size = limits.max_pdu
    ae.require_called_aet = True
    ae.acse_timeout = limits.request_seconds
    # An association without a PDU for this long is aborted and its slot freed.
    ae.network_timeout = limits.idle_seconds
    ae.dimse_timeout = limits.idle_seconds
    ae.add_supported_context(Verification)
    # All storage classes are negotiated, so a non-breast C-STORE gets a proper 0x0122
    # status from the handler instead of a bare presentation-context refusal.
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, RECEIVED_TRANSFER_SYNTAXES)
    for uid in BREAST_IMAGE_SOP_CLASSES:
        if uid not in {c.abstract_syntax for c in ae.supported_contexts}:
            ae.add_supported_context(uid, RECEIVED_TRANSFER_SYNTAXES)
    return ae


def server_ssl_context(tls: TLSConfig, section: str, *,
                       optional_client_cert: bool = False) -> ssl.SSLContext:
    """A listening side's TLS context from a TLS table (`section` names it in errors):
    client certificates required with require_client_cert; else, where a CA is given and
    `optional_client_cert`, verified when a client presents one; else not asked for."""
    from dicomnode.errors import ConfigError

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.ca:
            context.load_verify_locations(tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{section}: cannot load certificate/key/CA ({exc}); "
                          "check the cert, key and ca paths") from None
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif optional_client_cert and tls.ca:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


class StorageSCP:
    """The running receiver: ``start()`` listens in background threads, ``stop()`` shuts down."""

    def __init__(self, store: Store, policy: ReceiverPolicy, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None,
                 hold_seconds: float = HOLD_SECONDS, limits: WireLimits | None = None,
                 incoming_dir: Path | None = None) -> None:
        self.receiver = Receiver(store, policy)
        self.limits = limits or WireLimits()
        self.ae = build_ae(policy, self.limits)
        commitment.add_scp_context(self.ae)  # destinations report storage commitment here
        # Datasets being received: beside the archive (data_dir/incoming), so storage
        # takes them over by a rename, and never in $TMPDIR.
        self.incoming_dir = incoming_dir or Path(store.archive.root).parent / "incoming"
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self._server = None
        self.hold_seconds = hold_seconds
        self._stopping = threading.Event()
        self._hold_thread: threading.Thread | None = None

    def start(self) -> None:
        from dicomnode.errors import DicomnodeError

        # pynetdicom then writes each incoming dataset to a temporary file (in incoming_dir)
        # as its PDUs arrive: the write overlaps the network transfer, memory stays flat
        # however large the DBT, and storage takes the file over by a rename when
        # incoming_dir is on the archive's file system (else it copies).
        _config.STORE_RECV_CHUNKED_DATASET = True
        sweep_incoming(self.incoming_dir)

        try:
            self._server = start_guarded_server(
                self.ae, (self.host, self.port),
                evt_handlers=[*self.receiver.handlers(),
                              *commitment.handlers(self.receiver.store)],
                ssl_context=self.ssl_context, limits=self.limits,
                known_address=self.receiver.policy.address_known,
                incoming_dir=self.incoming_dir,
                on_association_end=self.receiver.association_ended)
        except OSError as exc:
            raise DicomnodeError(
                f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); "
                "choose a free port with [node] port or DICOMNODE_NODE_PORT") from None
        self.port = self._server.server_address[1]
        self._stopping.clear()
        self._hold_thread = threading.Thread(target=self._hold_studies, name="study-hold",
                                             daemon=True)
        self._hold_thread.start()
        log.info("event=listening %s", kv(ae_title=self.ae.ae_title, host=self.host,
                                          port=self.port, tls=self.ssl_context is not None))

    @property
    def listening(self) -> bool:
        return self._server is not None

    def _hold_studies(self) -> None:
        while not self._stopping.wait(self.hold_seconds):
            self.receiver.hold_open_studies()

    def stop(self) -> None:
        self._stopping.set()
        if self._hold_thread is not None:
            self._hold_thread.join()
            self._hold_thread = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
