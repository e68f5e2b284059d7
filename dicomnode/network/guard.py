"""The node's listening socket, hardened against what a hospital network may send it.

pynetdicom hands every accepted connection to an association thread that waits for the
A-ASSOCIATE-RQ and then reads each PDU by its length header, in full, into memory. A peer
that announces a 4 GB PDU, sends half a header, or nothing at all, holds that thread (and
pynetdicom's association count) for as long as it likes, and one that streams zeros after
a 4 GB header grows the node's memory without bound. So, before pynetdicom sees anything:

- the pending connections (accepted, not yet associated) are counted at accept, in two
  pools: addresses a configured peer may connect from, and the rest; the rest are capped in
  total and per address, so unknown hosts cannot take the configured peers' slots;
- the connection's TLS handshake and its whole A-ASSOCIATE-RQ must arrive within
  ``request_seconds`` of the accept, as a PDU of type 0x01 no larger than
  ``max_request_pdu``, else the connection is closed; this is read here, in the
  connection's own thread, and only a complete request becomes a pynetdicom association;
- once associated, a PDU announcing more than ``max_pdu`` (what the node negotiated) is
  refused before one byte of its body is read: A-ABORT, connection closed; a PDU must
  complete within ``idle_seconds``;
- what pynetdicom writes while a C-STORE dataset arrives goes to ``incoming_dir`` (under
  the node's data_dir, not $TMPDIR), and whatever the association left there when its
  thread ends (an aborted transfer, a malformed request) is removed;
- a DIMSE message pynetdicom cannot decode aborts the association cleanly (A-ABORT) instead
  of killing its reader thread, and the node's association bookkeeping is settled when the
  thread ends whatever events did or did not fire.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import TYPE_CHECKING

from pynetdicom import dimse_messages, evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicomnode.leftovers import remove_file, remove_stale
from dicomnode.ops import prometheus
from dicomnode.ops.logs import kv

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger("dicomnode.scp")

A_ASSOCIATE_RQ = 0x01
# A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value), PS3.8 9.3.8
_A_ABORT_INVALID_PARAMETER = bytes.fromhex("0700000000040000" "0206")
_CHUNK = 65536


@dataclass(frozen=True)
class WireLimits:
    """What a connection may cost the node; [node] settings of the same meaning."""

    request_seconds: float = 10.0  # accept -> complete A-ASSOCIATE-RQ (TLS handshake included)
    max_pending: int = 32  # pending connections per pool (unknown addresses / peers' addresses)
    max_pending_per_address: int = 4  # pending connections from one unknown address
    max_request_pdu: int = 262144  # bytes of the A-ASSOCIATE-RQ's variable part
    max_pdu: int = 4194304  # the maximum PDU length negotiated, enforced on every PDU
    idle_seconds: float = 60.0  # no PDU (or one PDU not complete) for this long: abort


class WireRefused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _RateLimitedLog:
    """One warning line per reason per interval, with how many were refused meanwhile, so a
    flood of hostile connections cannot flood the log too."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warning(self, reason: str, **fields: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self.interval:
                self._suppressed[reason] += 1
                return
            self._last[reason] = now
            suppressed, self._suppressed[reason] = self._suppressed[reason], 0
        log.warning("event=connection_refused %s",
                    kv(reason=reason, **fields, similar_since_last=suppressed))


def _read_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    out = bytearray()
    while len(out) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WireRefused("request_timeout", f"{len(out)} of {size} bytes in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(size - len(out), _CHUNK))
        except TimeoutError:
            raise WireRefused("request_timeout", f"{len(out)} of {size} bytes in time") from None
        except OSError as exc:
            raise WireRefused("closed", f"connection error: {exc}") from None
        if not chunk:
            raise WireRefused("closed", f"closed after {len(out)} of {size} bytes")
        out += chunk
    return bytes(out)


def read_association_request(sock: socket.socket, deadline: float, max_bytes: int) -> bytes:
    """The first PDU, which must be an A-ASSOCIATE-RQ of at most ``max_bytes`` (its length
    field), complete before ``deadline``; its bytes, header included. Never reads more than
    the header of a PDU it refuses."""
    header = _read_exact(sock, 6, deadline)
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type != A_ASSOCIATE_RQ:
        raise WireRefused("not_association_request", f"first PDU has type 0x{pdu_type:02X}")
    if length > max_bytes:
        raise WireRefused("request_too_large",
                          f"A-ASSOCIATE-RQ announces {length} bytes (limit {max_bytes})")
    return header + _read_exact(sock, length, deadline)


def _close(sock: socket.socket, farewell: bytes = b"") -> None:
    try:
        if farewell:
            sock.settimeout(1.0)
            sock.sendall(farewell)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class GuardedSocket(AssociationSocket):
    """pynetdicom's association socket, serving first the A-ASSOCIATE-RQ already read by the
    guard, then refusing any PDU longer than the limit before reading its body and giving up
    on a PDU not complete within ``read_seconds``. Installed on the socket pynetdicom made
    (``guard``), so that its constructor's transport event is not queued twice."""

    _buffer: bytearray
    max_read: int
    read_seconds: float

    @classmethod
    def guard(cls, sock: AssociationSocket, first_pdu: bytes, max_read: int,
              read_seconds: float) -> GuardedSocket:
        sock.__class__ = cls
        assert isinstance(sock, GuardedSocket)
        sock._buffer = bytearray(first_pdu)
        sock.max_read = max_read
        sock.read_seconds = read_seconds
        return sock

    @property
    def ready(self) -> bool:
        return bool(self._buffer) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        out = bytearray()
        if self._buffer:
            out += self._buffer[:nr_bytes]
            del self._buffer[:len(out)]
            if len(out) == nr_bytes:
                return out
        raw = self.socket
        if raw is None:
            return out
        if nr_bytes > self.max_read:
            # pynetdicom asks for a PDU's whole body at once: refuse it unread. The short
            # read makes pynetdicom end the association (transport closed: A-P-ABORT).
            prometheus.CONNECTIONS_REFUSED.inc(reason="pdu_too_large")
            assoc = self.assoc
            log.warning("event=pdu_refused %s", kv(
                reason="pdu_too_large", announced=nr_bytes, limit=self.max_read,
                calling_ae=_calling(assoc), peer=assoc.requestor.address))
            _close(raw, _A_ABORT_INVALID_PARAMETER)
            return out
        deadline = time.monotonic() + self.read_seconds
        try:
            while len(out) < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("event=pdu_timeout %s", kv(
                        received=len(out), expected=nr_bytes, seconds=self.read_seconds,
                        peer=self.assoc.requestor.address))
                    break
                raw.settimeout(remaining)
                chunk = raw.recv(min(nr_bytes - len(out), _CHUNK))
                if not chunk:
                    break
                out += chunk
        except OSError:  # timeout, reset: the short read ends the association
            pass
        finally:
            try:
                raw.settimeout(self.read_seconds)  # what sends are bounded by
            except OSError:
                pass
        return out


def _calling(assoc: Association) -> str:
    primitive = assoc.requestor.primitive
    return primitive.calling_ae_title.strip() if primitive is not None else ""


class GuardedRequestHandler(RequestHandler):
    """One accepted connection: the guard's pre-association phase, then pynetdicom's
    association in its own thread, joined here so that its end is always seen."""

    server: GuardedServer

    def handle(self) -> None:
        server = self.server
        address = str(self.client_address[0])
        deadline = time.monotonic() + server.limits.request_seconds
        raw = self.request
        try:
            sock = server.secure(raw, deadline)
            first = read_association_request(sock, deadline, server.limits.max_request_pdu)
        except WireRefused as refused:
            prometheus.CONNECTIONS_REFUSED.inc(reason=refused.reason)
            server.refusals.warning(refused.reason, peer=address, detail=str(refused))
            _close(raw)
            return
        finally:
            server.pending_done(raw, address)
        self.request = sock
        assoc = self._create_association()
        dul_socket = assoc.dul.socket
        assert dul_socket is not None   # _create_association gave it the accepted socket
        GuardedSocket.guard(dul_socket, first, server.limits.max_pdu,
                            server.limits.idle_seconds)
        sock.settimeout(server.limits.idle_seconds)
        _guard_dimse(assoc)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        try:
            assoc.join()
        finally:
            server.association_ended(assoc)


def _guard_dimse(assoc: Association) -> None:
    """A DIMSE message pynetdicom cannot decode (e.g. a C-STORE-RQ without Affected SOP
    Instance UID) raises in the reader thread, which then dies without an A-ABORT and
    leaves the association half-dead. Catch it: drop the message, abort cleanly."""
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def receive_primitive(primitive) -> None:
        try:
            receive(primitive)
        except Exception as exc:
            message, dimse.message = dimse.message, None
            data_file = getattr(message, "_data_set_file", None)
            if data_file is not None:
                data_file.close()
                remove_file(Path(data_file.name), "incoming_unlink_failed")
            prometheus.CONNECTIONS_REFUSED.inc(reason="malformed_dimse")
            log.warning("event=dimse_malformed %s", kv(
                calling_ae=_calling(assoc), peer=assoc.requestor.address,
                error=f"{type(exc).__name__}: {exc}"[:200]))
            assoc.dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT, then close

    dimse.receive_primitive = receive_primitive  # type: ignore[method-assign]


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the guard: admission of pending connections at
    accept, TLS and the A-ASSOCIATE-RQ under a deadline in the connection's thread."""

    daemon_threads = True  # stop() never waits for a connection's thread

    def __init__(self, ae, address, ae_title, contexts, ssl_context=None, evt_handlers=None, *,
                 limits: WireLimits, known_address: Callable[[str], bool],
                 incoming_dir: Path | None = None,
                 on_association_end: Callable[[Association], None] | None = None) -> None:
        self.limits = limits
        self.known_address = known_address
        self.incoming_dir = incoming_dir
        self.on_association_end = on_association_end
        self.refusals = _RateLimitedLog()
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()  # by pool: "peer" and "other"
        self._pending_by_address: Counter[str] = Counter()
        self._pending_sockets: dict[int, str] = {}
        self._temp_files: dict[int, list[Path]] = {}
        super().__init__(ae, address, ae_title, contexts, ssl_context,
                         evt_handlers=evt_handlers, request_handler=GuardedRequestHandler)

    # -- accept ---------------------------------------------------------------------------

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # No TLS handshake here, in the one accepting thread: a peer that never completes it
        # would stop every other connection. GuardedRequestHandler does it, under a deadline.
        assert self.socket is not None
        return self.socket.accept()

    def verify_request(self, request, client_address) -> bool:
        address = str(client_address[0])
        pool = "peer" if self.known_address(address) else "other"
        with self._lock:
            full = self._pending[pool] >= self.limits.max_pending
            crowded = pool == "other" and \
                self._pending_by_address[address] >= self.limits.max_pending_per_address
            if not (full or crowded):
                self._pending[pool] += 1
                self._pending_by_address[address] += 1
                self._pending_sockets[id(request)] = pool
                return True
        reason = "pending_per_address" if crowded else "pending_limit"
        prometheus.CONNECTIONS_REFUSED.inc(reason=reason)
        self.refusals.warning(reason, peer=address, pool=pool)
        return False  # socketserver closes it

    def pending_done(self, request, address: str) -> None:
        with self._lock:
            pool = self._pending_sockets.pop(id(request), None)
            if pool is None:
                return
            self._pending[pool] -= 1
            self._pending_by_address[address] -= 1
            if self._pending_by_address[address] <= 0:
                del self._pending_by_address[address]

    @property
    def pending_connections(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    def secure(self, sock: socket.socket, deadline: float) -> socket.socket:
        if self.ssl_context is None:
            return sock
        import ssl

        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            tls = self.ssl_context.wrap_socket(sock, server_side=True,
                                               do_handshake_on_connect=False)
            tls.do_handshake()  # the socket's timeout bounds the whole handshake
            return tls
        except TimeoutError:
            raise WireRefused("request_timeout", "TLS handshake not complete in time") from None
        except (ssl.SSLError, OSError) as exc:
            raise WireRefused("tls_handshake", f"TLS handshake failed: {exc}") from None

    # -- temporary files of incoming datasets -----------------------------------------------

    def temp_file_for(self, assoc: Association, **kwargs):
        """pynetdicom's NamedTemporaryFile for a C-STORE dataset, in incoming_dir, tracked
        so that what the association leaves behind is removed when it ends."""
        handle = NamedTemporaryFile(dir=self.incoming_dir, **kwargs)  # noqa: SIM115
        with self._lock:
            self._temp_files.setdefault(id(assoc), []).append(Path(handle.name))
        return handle

    def association_ended(self, assoc: Association) -> None:
        with self._lock:
            leftovers = self._temp_files.pop(id(assoc), [])
        removed = sum(remove_file(path, "incoming_unlink_failed") for path in leftovers)
        if removed:
            log.info("event=incoming_removed %s", kv(files=removed, peer=assoc.requestor.address))
        if self.on_association_end is not None:
            try:
                self.on_association_end(assoc)
            except Exception:  # bookkeeping must not take the connection thread's error path
                log.exception("event=association_end_failed")


def sweep_incoming(directory: Path, older_than_s: float = 3600.0) -> int:
    """Remove datasets a previous process left half-received in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    return remove_stale(directory, "*.dcm", older_than_s)


def _named_temporary_file(*args, **kwargs):
    """Installed as pynetdicom's NamedTemporaryFile: within a guarded server's association
    (called from its reader thread), the server's incoming_dir; elsewhere pynetdicom's own."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    server = getattr(assoc, "_server", None)
    if isinstance(server, GuardedServer) and "dir" not in kwargs:
        return server.temp_file_for(assoc, **kwargs)
    return NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115


def install_temp_file_hook() -> None:
    dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[attr-defined]


def start_guarded_server(ae, address: tuple[str, int], *, evt_handlers: list, ssl_context,
                         limits: WireLimits, known_address: Callable[[str], bool],
                         incoming_dir: Path | None,
                         on_association_end: Callable[[Association], None]) -> GuardedServer:
    """Like AE.start_server(block=False), with the guard."""
    install_temp_file_hook()
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=GuardedServer, limits=limits,
                            known_address=known_address, incoming_dir=incoming_dir,
                            on_association_end=on_association_end)
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{os.getpid()}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)
    return server
