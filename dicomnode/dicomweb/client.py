"""STOW-RS sender: files POSTed to ``{base}/studies`` as one streamed multipart/related
body (Content-Length computed from the file sizes; nothing is read into memory whole), and
the response read back into a per-instance outcome."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomnode.dicomweb.multipart import body_length, multipart_body, new_boundary

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


@dataclass(frozen=True)
class StowTarget:
    url: str  # the DICOMweb base, e.g. "https://pacs.example.org/dicom-web"
    token: str = ""  # bearer token; empty: none
    ca: str = ""  # CA file for https; empty: the system's
    cert: str = ""  # client certificate and key (mutual TLS)
    key: str = ""
    timeout: float = 300.0


@dataclass(frozen=True)
class StowResponse:
    status: int  # HTTP status; 0 when nothing answered
    stored: frozenset[str]  # SOP Instance UIDs in the Referenced SOP Sequence
    failed: dict[str, int]  # SOP Instance UID -> Failure Reason
    error: str = ""  # what went wrong, for the log and the delivery's last_error

    @property
    def all_stored(self) -> bool:
        return self.status == 200


class StowError(Exception):
    """The request could not be sent or answered at all (connection, TLS, timeout)."""


def ssl_context(target: StowTarget) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=target.ca or None)
    if target.cert:
        context.load_cert_chain(target.cert, target.key or None)
    return context


def post_instances(target: StowTarget, paths: Sequence[Path],
                   study_uid: str | None = None) -> StowResponse:
    """STOW-RS these DICOM files in one request; raises StowError when nothing answers."""
    parts = urllib.parse.urlsplit(target.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StowError(f"{target.url!r} is not an http(s) URL")
    path = parts.path.rstrip("/") + "/studies" + (f"/{study_uid}" if study_uid else "")
    boundary = new_boundary()
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(body_length(paths, boundary)),
        "Accept": "application/dicom+json",
    }
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    try:
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=target.timeout, context=ssl_context(target))
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                              timeout=target.timeout)
        try:
            conn.putrequest("POST", path)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            try:
                for chunk in multipart_body(paths, boundary):
                    conn.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered early (e.g. 401, 413): read what it said
            rsp = conn.getresponse()
            body = rsp.read()
            return parse_response(rsp.status, rsp.getheader("Content-Type") or "", body)
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        raise StowError(f"STOW-RS to {target.url}: {type(exc).__name__}: {exc}") from None


def parse_response(status: int, content_type: str, body: bytes) -> StowResponse:
    stored: set[str] = set()
    failed: dict[str, int] = {}
    error = ""
    if "json" in content_type and body:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict):
            for item in _items(data, REFERENCED_SOP_SEQUENCE):
                stored.add(_value(item, REFERENCED_SOP_INSTANCE_UID))
            for item in _items(data, FAILED_SOP_SEQUENCE):
                reason = _value(item, FAILURE_REASON)
                failed[_value(item, REFERENCED_SOP_INSTANCE_UID)] = \
                    int(reason) if isinstance(reason, int) else 0x0110
            if "error" in data:
                error = str(data["error"])
    if status >= 300 and not error:
        error = body[:300].decode("utf-8", "replace").strip() or f"HTTP {status}"
    return StowResponse(status, frozenset(stored), failed, error)


def _items(data: dict, tag: str) -> list[dict]:
    element = data.get(tag) or {}
    return [i for i in element.get("Value", []) if isinstance(i, dict)]


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or [""]
    return values[0]
