"""QIDO-RS and WADO-RS client (PS3.18 10.6 and 10.4), for `dicomnode retrieve` from a
DICOMweb peer.

One HTTP(S) connection, kept alive between requests, with the peer's bearer token and TLS
settings (those of STOW-RS out, :class:`~dicomnode.dicomweb.client.StowTarget`). A WADO-RS
answer (``multipart/related; type="application/dicom"``) is read as a stream: each part is
written to a temporary file as it arrives and handed to the caller, so a 500 MB DBT never
sits in memory.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Callable
from email.message import Message
from pathlib import Path

from dicomnode.dicomweb.client import StowTarget, ssl_context
from dicomnode.dicomweb.multipart import MalformedBody, MultipartReader, receive_part

DICOM_JSON = "application/dicom+json"
# By default every instance as the peer holds it (transfer-syntax=*): the archive keeps
# what was sent to the PACS.
MULTIPART_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax={}'
PAGE = 1000  # QIDO-RS results asked for per request (limit/offset paging)


class DicomwebError(Exception):
    """A request failed: ``status`` is the HTTP status, 0 when nothing answered (connection,
    TLS, timeout), in which case ``unreachable`` is true."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def unreachable(self) -> bool:
        return self.status == 0


class DicomwebClient:
    """QIDO-RS searches and WADO-RS retrieves against one DICOMweb base URL."""

    def __init__(self, target: StowTarget) -> None:
        parts = urllib.parse.urlsplit(target.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DicomwebError(f"{target.url!r} is not an http(s) URL")
        self.target = target
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._base = parts.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> DicomwebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP -----------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self.target.timeout,
                    context=ssl_context(self.target))
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port,
                                                        timeout=self.target.timeout)
        return self._conn

    def _get(self, path: str, params: dict[str, str] | None, accept: str
             ) -> http.client.HTTPResponse:
        """GET on the kept-alive connection; once more on a new one if the kept one was
        closed by the server meanwhile. The caller reads the response to its end."""
        url = self._base + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        headers = {"Accept": accept}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        for attempt in (1, 2):
            reused = self._conn is not None
            try:
                conn = self._connect()
                conn.request("GET", url, headers=headers)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError
                    ) as exc:
                self.close()
                if not reused or attempt == 2:
                    raise DicomwebError(f"GET {self.target.url}{path}: {type(exc).__name__}: "
                                        f"{exc}") from None
            except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
                self.close()
                raise DicomwebError(f"GET {self.target.url}{path}: {type(exc).__name__}: "
                                    f"{exc}") from None
        raise AssertionError("unreachable")

    def _failed(self, rsp: http.client.HTTPResponse, path: str) -> DicomwebError:
        text = rsp.read(300).decode("utf-8", "replace").strip()
        self.close()  # the rest of the body is not read: the connection cannot be reused
        hint = {401: "; check the peer's token", 403: "; the token is not allowed to read"
                }.get(rsp.status, "")
        return DicomwebError(f"GET {self.target.url}{path}: HTTP {rsp.status} "
                             f"{text[:200] or rsp.reason}{hint}", rsp.status)

    # -- QIDO-RS --------------------------------------------------------------------------

    def search(self, path: str, params: dict[str, str] | None = None) -> list[dict]:
        """The DICOM JSON results of a QIDO-RS search, all pages; [] when none match (or the
        resource does not exist: 404)."""
        results: list[dict] = []
        seen: set[str] = set()
        offset = 0
        while True:
            page = self._search_page(path, {**(params or {}), "limit": str(PAGE),
                                            "offset": str(offset)})
            fresh = [r for r in page if json.dumps(r, sort_keys=True) not in seen]
            seen.update(json.dumps(r, sort_keys=True) for r in fresh)
            results += fresh
            # a server that ignores limit/offset answers everything once: stop when a page
            # brings nothing new, so the loop ends whatever the server does
            if len(page) < PAGE or not fresh:
                return results
            offset += len(page)

    def _search_page(self, path: str, params: dict[str, str]) -> list[dict]:
        try:
            rsp = self._get(path, params, DICOM_JSON)
            if rsp.status in (204, 404):
                rsp.read()
                return []
            if rsp.status != 200:
                raise self._failed(rsp, path)
            body = rsp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise DicomwebError(f"GET {self.target.url}{path}: {type(exc).__name__}: {exc}"
                                ) from None
        try:
            data = json.loads(body or b"[]")
        except ValueError:
            raise DicomwebError(f"GET {self.target.url}{path}: the answer is not DICOM JSON",
                                200) from None
        if not isinstance(data, list):
            raise DicomwebError(f"GET {self.target.url}{path}: the answer is not a list", 200)
        return [d for d in data if isinstance(d, dict)]

    # -- WADO-RS --------------------------------------------------------------------------

    def retrieve(self, path: str, directory: Path, handle: Callable[[Path, bool], None],
                 transfer_syntax: str = "*") -> int:
        """WADO-RS ``path`` (a study, series or instance), in ``transfer_syntax`` ("*": as
        stored; a UID: transcoded by the peer): each part written to a temporary
        file in ``directory`` and passed to ``handle(path, complete)`` (complete: the part
        ended at a boundary, not cut off), which owns the file from then on; the number of
        parts. Raises DicomwebError when the request fails or the body is not multipart."""
        try:
            rsp = self._get(path, None, MULTIPART_DICOM.format(transfer_syntax))
            if rsp.status != 200:
                raise self._failed(rsp, path)
            message = Message()
            message["content-type"] = rsp.getheader("Content-Type") or ""
            boundary = message.get_param("boundary")
            if message.get_content_type() != "multipart/related" or not boundary:
                self.close()
                raise DicomwebError(f"GET {self.target.url}{path}: answered "
                                    f"{message['content-type']!r}, not multipart/related", 200)
            reader = MultipartReader(rsp.read1, str(boundary))
            parts = 0
            while reader.next_part() is not None:
                part, complete = receive_part(reader, directory)
                parts += 1
                handle(part, complete)
            if reader.truncated or rsp.will_close:
                self.close()  # (a server may close after each answer of unknown length)
            else:
                rsp.read()  # the epilogue, within Content-Length or the chunks: reusable
            return parts
        except MalformedBody as exc:
            self.close()
            raise DicomwebError(f"GET {self.target.url}{path}: {exc}", 200) from None
        except (http.client.HTTPException, ssl.SSLError, TimeoutError, ConnectionError
                ) as exc:
            self.close()
            raise DicomwebError(f"GET {self.target.url}{path}: {type(exc).__name__}: {exc}"
                                ) from None
        except BaseException:  # e.g. a part not writable here: the answer is not read out
            self.close()
            raise


def value(item: dict, tag: str) -> str:
    """The first value of a DICOM JSON attribute ("" when absent)."""
    values = (item.get(tag) or {}).get("Value") or [""]
    first = values[0]
    return first if isinstance(first, str) else str(first)
