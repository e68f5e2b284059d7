"""STOW-RS receiver (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}`` with a
``multipart/related; type="application/dicom"`` body, into the same archive, index and
study completion as C-STORE.

Each part streams to a temporary file under the data directory as it arrives (a 500 MB DBT
never sits in memory), then goes through the SCP's own checks and archive function
(:func:`dicomnode.network.scp.archive_instance`), which storage completes by renaming the file into
the archive, fsyncing and indexing it. The response (application/dicom+json) is sent only
once every part is durable: its Referenced SOP Sequence lists what was stored, its Failed
SOP Sequence what was refused, with the C-STORE status as Failure Reason. 200: all stored;
202: some refused; 409: all refused; 400 malformed; 401/403 not authenticated/authorised;
413 too large; 415 not multipart/related of application/dicom; 503 busy.

Every request authenticates: a bearer token whose sha256 a peer's ``token_sha256`` holds,
or (mutual TLS) a client certificate whose Common Name is a peer's ``tls_common_name``. The
peer's AE title becomes the instances' calling AE, so study completion, per-peer idle times
and result routing work as for that peer's C-STORE.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import ssl
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from dicomnode.dicomweb.multipart import (
    STALE_PART_S,
    BodyReader,
    BodyTooLarge,
    MalformedBody,
    MultipartReader,
    receive_part,
    sweep_stale_parts,
)
from dicomnode.errors import ConfigError, DicomnodeError
from dicomnode.identifiers import RECEIVED_TRANSFER_SYNTAXES
from dicomnode.network.instance_checks import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH,
    EncodedInstance,
    StoreRefused,
)
from dicomnode.network.scp import (
    ReceiverPolicy,
    archive_instance,
    hold_studies,
    server_ssl_context,
)
from dicomnode.ops import prometheus
from dicomnode.ops.logs import kv

if TYPE_CHECKING:
    from dicomnode.config import Config, TLSConfig
    from storage import Store

log = logging.getLogger("dicomnode.stow")

# PS3.18 Table 10.5.3-1 failure reasons beyond the C-STORE statuses
PROCESSING_FAILURE = 0x0110
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

DICOM_JSON = "application/dicom+json"
_PATH = re.compile(r"^(?:/.*)?/studies(?:/(?P<study>[0-9.]{1,64}))?/?$")
INCOMING_DIR = "stow-incoming"
READ_TIMEOUT_S = 120.0  # a client that sends nothing for this long is dropped
# A request refused before its body (auth, media type) still has its body read and dropped
# up to this size, so that the client, still sending, gets to read the answer.
DRAIN_BYTES = 16 * 2**20


def hash_token(token: str) -> str:
    """What a peer's ``token_sha256`` holds for this bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class StowAuth:
    """Who may store: bearer-token hashes and client-certificate Common Names -> AE title."""

    token_hashes: dict[str, str] = field(default_factory=dict)
    common_names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> StowAuth:
        return cls({p.token_sha256.lower(): p.ae_title for p in config.peers if p.token_sha256},
                   {p.tls_common_name: p.ae_title for p in config.peers if p.tls_common_name})

    def for_token(self, token: str) -> str | None:
        digest = hash_token(token)
        found = None
        for known, ae_title in self.token_hashes.items():  # compare every one, in constant time
            if hmac.compare_digest(known, digest):
                found = ae_title
        return found


@dataclass
class PartResult:
    sop_class: str
    sop_instance: str
    failure: int | None = None  # None: stored
    outcome: str = ""  # storage's outcome (stored, duplicate, ...) or the refusal's comment
    study_uid: str = ""
    size: int = 0


@dataclass
class StowResult:
    parts: list[PartResult] = field(default_factory=list)
    error: tuple[int, str] | None = None  # an HTTP status for the whole request, and why

    @property
    def stored(self) -> list[PartResult]:
        return [p for p in self.parts if p.failure is None]

    @property
    def failed(self) -> list[PartResult]:
        return [p for p in self.parts if p.failure is not None]

    @property
    def http_status(self) -> int:
        if self.error is not None:
            return self.error[0]
        if not self.parts:
            return 400
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def response(self) -> Dataset:
        ds = Dataset()
        if self.failed:
            ds.FailedSOPSequence = [_reference(p) for p in self.failed]
        if self.stored:
            ds.ReferencedSOPSequence = [_reference(p) for p in self.stored]
        return ds


def _reference(part: PartResult) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = part.sop_class
    item.ReferencedSOPInstanceUID = part.sop_instance
    if part.failure is not None:
        item.FailureReason = part.failure
    return item


class StowReceiver:
    """Stores the parts of STOW-RS bodies: the HTTP-independent half of the receiver."""

    def __init__(self, store: Store, policy: ReceiverPolicy, data_dir: Path) -> None:
        self.store = store
        self.policy = policy
        self.incoming = Path(data_dir) / INCOMING_DIR
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.sweep()
        self._lock = threading.Lock()
        self._studies: dict[int, set[str]] = {}  # open request -> studies it stored to
        self.requests = 0
        self.instances_received = 0
        self.bytes_received = 0

    def sweep(self, older_than_s: float = STALE_PART_S) -> int:
        """Remove parts a killed process left behind; how many."""
        return sweep_stale_parts(self.incoming, older_than_s)

    def receive(self, reader: MultipartReader, calling_ae: str, study_uid: str | None,
                request_id: int) -> StowResult:
        """Receive and archive every part. A part is archived (checked, fsynced, indexed) on
        a second thread while the next one arrives: the disk flush of one DBT overlaps the
        network transfer of the next. At most two parts are on disk in the incoming area."""
        result = StowResult()
        archiving: Future[PartResult] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="stow-archive") as pool:
            try:
                while (headers := reader.next_part()) is not None:
                    path, complete = self._receive_body(reader)
                    if archiving is not None:
                        result.parts.append(archiving.result())
                    archiving = pool.submit(self._archive_part, path, complete,
                                            headers.get("content-type", "application/dicom"),
                                            calling_ae, study_uid, request_id)
                if archiving is not None:
                    result.parts.append(archiving.result())
                    archiving = None
                if reader.truncated and not result.parts:
                    result.error = (400, "body ended before its first part")
            except BodyTooLarge as exc:
                result.error = (413, str(exc))
            except MalformedBody as exc:
                result.error = (400, str(exc))
            except TimeoutError:
                result.error = (408, f"no body bytes for {READ_TIMEOUT_S:.0f} s")
            except ConnectionError as exc:
                result.error = (400, f"connection lost: {exc}")
            except OSError as exc:  # a part could not be written (disk full, permissions)
                log.exception("event=stow_write_failed")
                result.error = (503, f"cannot write the part: {exc.strerror or exc}")
            finally:
                if archiving is not None:
                    result.parts.append(archiving.result())
                with self._lock:
                    self._studies.pop(request_id, None)
        return result

    def _receive_body(self, reader: MultipartReader) -> tuple[Path, bool]:
        """The part's content, written to a temporary file as it arrives; whether it was
        complete (False: the body ended inside it)."""
        return receive_part(reader, self.incoming)

    def _archive_part(self, path: Path, complete: bool, content_type: str, calling_ae: str,
                      study_uid: str | None, request_id: int) -> PartResult:
        try:
            media = content_type.split(";", 1)[0].strip().lower()
            if media != "application/dicom":
                prometheus.STOW_INSTANCES.inc(result=f"0x{CANNOT_UNDERSTAND:04X}")
                return PartResult("", "", CANNOT_UNDERSTAND,
                                  f"part of type {media} (only application/dicom is accepted)")
            return self._store_file(path, complete, calling_ae, study_uid, request_id)
        finally:
            path.unlink(missing_ok=True)  # gone already where storage took it over

    def _store_file(self, path: Path, complete: bool, calling_ae: str, study_uid: str | None,
                    request_id: int) -> PartResult:
        sop_class = sop_instance = ""
        size = path.stat().st_size
        try:
            try:
                meta = read_file_meta_info(path)
            except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
                raise StoreRefused(CANNOT_UNDERSTAND, f"not a DICOM file (PS3.10): {exc}"
                                   ) from None
            sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
            sop_instance = str(meta.get("MediaStorageSOPInstanceUID", ""))
            if not complete:
                raise StoreRefused(CANNOT_UNDERSTAND, "part truncated: the body ended in it")
            syntax = str(meta.get("TransferSyntaxUID", ""))
            if syntax not in RECEIVED_TRANSFER_SYNTAXES:
                raise StoreRefused(TRANSFER_SYNTAX_NOT_SUPPORTED,
                                   f"transfer syntax {syntax or '(none)'} is not accepted")
            if study_uid is not None:
                found = _study_uid(path)
                if found != study_uid:
                    raise StoreRefused(DATASET_DOES_NOT_MATCH,
                                       f"instance of study {found} posted to study {study_uid}")
            encoded = EncodedInstance.from_file(path)
            try:
                outcome, ds = archive_instance(self.store, encoded, self.policy,
                                               calling_ae=calling_ae, sop_class=sop_class or None,
                                               sop_instance=sop_instance)
            finally:
                encoded.close()
        except StoreRefused as refused:
            prometheus.STOW_INSTANCES.inc(result=f"0x{refused.status:04X}")
            log.warning("event=stow_refused %s", kv(
                calling_ae=calling_ae, status=f"0x{refused.status:04X}", reason=refused.comment,
                sop_instance_uid=sop_instance))
            return PartResult(sop_class, sop_instance, refused.status, refused.comment, size=size)
        except Exception:  # a bug must not take the request, or the node, down
            prometheus.STOW_INSTANCES.inc(result=f"0x{PROCESSING_FAILURE:04X}")
            log.exception("event=stow_error %s", kv(calling_ae=calling_ae,
                                                    sop_instance_uid=sop_instance))
            return PartResult(sop_class, sop_instance, PROCESSING_FAILURE,
                              "internal error while storing", size=size)
        study = str(ds.StudyInstanceUID)
        with self._lock:
            self._studies.setdefault(request_id, set()).add(study)
            self.instances_received += 1
            self.bytes_received += size
        prometheus.STOW_INSTANCES.inc(result=outcome)
        prometheus.INSTANCES_RECEIVED.inc(outcome=outcome)
        prometheus.BYTES_RECEIVED.inc(size)
        log.info("event=stored %s", kv(
            protocol="stow-rs", calling_ae=calling_ae, study_uid=study,
            sop_instance_uid=str(ds.SOPInstanceUID), outcome=outcome, bytes=size))
        return PartResult(str(ds.SOPClassUID), str(ds.SOPInstanceUID), None, outcome, study,
                          size)

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def hold_open_studies(self) -> None:
        """Restart the idle timers of the studies of requests still being received (as the
        SCP does for open associations): a study is not complete while its body streams."""
        with self._lock:
            uids = set().union(*self._studies.values())
        hold_studies(self.store, uids)

    def audit(self, event: str, calling_ae: str | None, peer: str, *, count: int | None = None,
              status: str | None = None, detail: str | None = None) -> None:
        try:
            self.store.audit(event, calling_ae=calling_ae, called_ae=self.policy.ae_title,
                             peer=peer, count=count, status=status, detail=detail)
        except Exception:  # the audit trail must never break receiving
            log.exception("event=audit_failed")


def _study_uid(path: Path) -> str:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"cannot parse dataset: {exc}") from None
    return str(ds.get("StudyInstanceUID", ""))


# -- HTTP --------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = READ_TIMEOUT_S

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # each request logs one structured event instead

    # Expect: 100-continue: refuse before the client sends a body we would not take
    def handle_expect_100(self) -> bool:
        self._expecting = True  # the client holds its body until 100 Continue
        if self._precheck() is None:
            return False
        self._expecting = False
        return super().handle_expect_100()

    def handle_one_request(self) -> None:
        self._expecting = False
        self._checked: tuple[str, str, str, BodyReader] | None = None
        self._body_started = False
        super().handle_one_request()

    def do_GET(self) -> None:  # noqa: N802
        self._error(405, "only POST (STOW-RS) is served here", {"Allow": "POST"})

    do_PUT = do_DELETE = do_GET  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802
        started = time.perf_counter()
        checked = self._checked or self._precheck()
        if checked is None:
            return
        calling_ae, study_uid, boundary, body = checked
        if not self.server.slots.acquire(blocking=False):
            self._refuse(503, "busy: too many STOW-RS requests at once", calling_ae,
                         retry_after="5")
            return
        request_id = id(self) ^ threading.get_ident()
        self._body_started = True
        try:
            reader = MultipartReader(body.read, boundary)
            result = self.server.receiver.receive(reader, calling_ae, study_uid, request_id)
        except MalformedBody as exc:
            result = StowResult(error=(400, str(exc)))
        except Exception:  # a bug must not take the endpoint down: answer, log, go on
            log.exception("event=stow_error %s", kv(calling_ae=calling_ae))
            result = StowResult(error=(500, "internal error while receiving"))
        finally:
            self.server.slots.release()
        if result.error is not None or not body.complete:
            self.close_connection = True  # what is left of the body is not read
        status = result.http_status
        payload = json.dumps(result.response().to_json_dict()).encode()
        # counted, logged and audited before the answer: whoever reads the answer sees them
        elapsed = time.perf_counter() - started
        prometheus.STOW_REQUESTS.inc(status=str(status))
        prometheus.STOW_BYTES.inc(body.received)
        prometheus.STOW_SECONDS.observe(elapsed)
        self.server.receiver.count_request()
        detail = result.error[1] if result.error else (
            "; ".join(sorted({f"0x{p.failure:04X} {p.outcome}" for p in result.failed}))[:500]
            or None)
        (log.info if status == 200 else log.warning)("event=stow %s", kv(
            calling_ae=calling_ae, peer=self.client_address[0], status=status,
            stored=len(result.stored), failed=len(result.failed), bytes=body.received,
            ms=round(1000 * elapsed, 1), detail=detail or ""))
        self.server.receiver.audit("stow", calling_ae, self.client_address[0],
                                   count=len(result.stored), status=str(status), detail=detail)
        self._send(status, payload, DICOM_JSON)

    def _precheck(self) -> tuple[str, str | None, str, BodyReader] | None:
        """Path, authentication, media type and size: the answer to a request refused
        before its body, or what receiving it needs. Sends the refusal itself."""
        match = _PATH.match(self.path.split("?", 1)[0])
        if self.command != "POST" or match is None:
            self._error(404, "not found: STOW-RS is POST /studies or POST /studies/{study}")
            return None
        calling_ae = self._authenticate()
        if calling_ae is None:
            return None
        message = Message()
        message["content-type"] = self.headers.get("Content-Type", "")
        media = message.get_content_type()
        part_type = str(message.get_param("type") or "application/dicom").lower()
        boundary = message.get_param("boundary")
        if media != "multipart/related" or part_type != "application/dicom":
            self._refuse(415, f"unsupported media type {self.headers.get('Content-Type')!r}: "
                         'send multipart/related; type="application/dicom"', calling_ae)
            return None
        if not boundary:
            self._refuse(400, "multipart/related without a boundary", calling_ae)
            return None
        limit = self.server.max_body_bytes
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length_text = self.headers.get("Content-Length")
        length = None
        if not chunked:
            try:
                length = int(length_text or "")
            except ValueError:
                self._refuse(411 if length_text is None else 400,
                             "a body needs Content-Length or chunked transfer coding", calling_ae)
                return None
            if length > limit:
                self._refuse(413, f"body of {length} bytes exceeds [dicomweb] max_body_mb "
                             f"({limit // 2**20} MB)", calling_ae)
                return None
        body = BodyReader(self.rfile, length=length, chunked=chunked, limit=limit)
        checked = (calling_ae, match.group("study"), str(boundary), body)
        self._checked = checked
        return checked

    def _authenticate(self) -> str | None:
        auth = self.server.auth
        header = self.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if header:
            ae_title = auth.for_token(credentials.strip()) if scheme.lower() == "bearer" \
                else None
            if ae_title is None:
                self._refuse(401, "unknown bearer token" if scheme.lower() == "bearer"
                             else f"unsupported authorization scheme {scheme!r}", None,
                             authenticate='Bearer error="invalid_token"')
            return ae_title
        cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) \
            else None
        if cert:
            common_name = _common_name(cert)
            ae_title = auth.common_names.get(common_name)
            if ae_title is None:
                self._refuse(403, f"client certificate {common_name!r} is no peer's "
                             "tls_common_name", None, who=common_name)
            return ae_title
        self._refuse(401, "authentication required: a bearer token or a client certificate",
                     None, authenticate="Bearer")
        return None

    def _refuse(self, status: int, reason: str, calling_ae: str | None, *,
                authenticate: str | None = None, retry_after: str | None = None,
                who: str | None = None) -> None:
        prometheus.STOW_REQUESTS.inc(status=str(status))
        log.warning("event=stow_refused_request %s", kv(
            status=status, reason=reason, calling_ae=calling_ae or who or "",
            peer=self.client_address[0]))
        self.server.receiver.audit("stow_rejected", calling_ae, self.client_address[0],
                                   status=str(status), detail=reason)
        headers = {}
        if authenticate:
            headers["WWW-Authenticate"] = authenticate
        if retry_after:
            headers["Retry-After"] = retry_after
        self._error(status, reason, headers)

    def _error(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        # the body of a refused request is not read: the connection cannot be reused
        self.close_connection = True
        if not self._body_started and not self._expecting:
            self._drain()
        payload = json.dumps({"status": status, "error": reason}).encode()
        self._send(status, payload, "application/json", headers)

    def _drain(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        if not 0 < length <= DRAIN_BYTES:
            return
        try:
            while length > 0 and (data := self.rfile.read1(min(length, 1 << 20))):
                length -= len(data)
        except OSError:
            pass

    def _send(self, status: int, payload: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client went away; nothing to tell it
            self.close_connection = True


def _common_name(cert: dict) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], receiver: StowReceiver, auth: StowAuth,
                 max_body_bytes: int, max_requests: int,
                 ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(address, _Handler)
        self.receiver = receiver
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.slots = threading.BoundedSemaphore(max_requests)
        self.ssl_context = ssl_context

    def finish_request(self, request, client_address) -> None:
        # TLS handshake here, on the request's own thread: a slow client never stalls accept
        if self.ssl_context is not None:
            request.settimeout(30)
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("event=stow_tls_refused %s", kv(peer=client_address[0],
                                                           reason=str(exc)[:200]))
                self.receiver.audit("stow_rejected", None, client_address[0], status="tls",
                                    detail=str(exc)[:200])
                request.close()
                return
            request.settimeout(READ_TIMEOUT_S)
            try:
                super().finish_request(request, client_address)
            finally:
                request.close()
            return
        super().finish_request(request, client_address)

    def shutdown_request(self, request) -> None:
        try:
            super().shutdown_request(request)
        except OSError:
            pass


def stow_ssl_context(tls: TLSConfig | None) -> ssl.SSLContext | None:
    """The server context of [dicomweb.tls]: mutual TLS when require_client_cert is set; a
    client certificate, where one is presented and a CA is given, names the peer."""
    if tls is None:
        return None
    return server_ssl_context(tls, "[dicomweb.tls]", optional_client_cert=True)


class StowServer:
    """The running STOW-RS endpoint: ``start()`` binds and serves on daemon threads."""

    def __init__(self, store: Store, policy: ReceiverPolicy, data_dir: Path, listen: str, *,
                 auth: StowAuth, max_body_mb: int = 4096, max_requests: int = 8,
                 ssl_context: ssl.SSLContext | None = None, hold_seconds: float = 1.0) -> None:
        from dicomnode.ops.http import parse_listen

        try:
            self.host, self.port = parse_listen(listen)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("[http]", "[dicomweb]")) from None
        self.receiver = StowReceiver(store, policy, data_dir)
        self.auth = auth
        self.max_body_bytes = max_body_mb * 2**20
        self.max_requests = max_requests
        self.ssl_context = ssl_context
        self.hold_seconds = hold_seconds
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @classmethod
    def from_config(cls, config: Config, store: Store, policy: ReceiverPolicy,
                    hold_seconds: float = 1.0) -> StowServer:
        web = config.dicomweb
        return cls(store, policy, config.data_path, web.listen, auth=StowAuth.from_config(config),
                   max_body_mb=web.max_body_mb, max_requests=web.max_requests,
                   ssl_context=stow_ssl_context(web.tls), hold_seconds=hold_seconds)

    def start(self) -> None:
        try:
            self._server = _Server((self.host, self.port), self.receiver, self.auth,
                                   self.max_body_bytes, self.max_requests, self.ssl_context)
        except OSError as exc:
            raise DicomnodeError(f"[dicomweb] cannot listen on {self.host}:{self.port} "
                                 f"({exc.strerror or exc}); choose a free port") from None
        self.port = self._server.server_address[1]
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._server.serve_forever, name="stow-rs",
                             kwargs={"poll_interval": 0.5}, daemon=True),
            threading.Thread(target=self._hold, name="stow-hold", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("event=stow_listening %s", kv(host=self.host, port=self.port,
                                               tls=self.ssl_context is not None))

    def _hold(self) -> None:
        while not self._stopping.wait(self.hold_seconds):
            self.receiver.hold_open_studies()

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

