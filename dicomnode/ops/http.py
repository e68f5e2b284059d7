"""Health and Prometheus metrics over HTTP (stdlib http.server, one background thread).

Off unless ``[http] listen`` is set. ``"8080"`` or ``":8080"`` bind to loopback; bind to
another address only by naming it (``"0.0.0.0:8080"``): the endpoint has no authentication.

- ``GET /health/live``: 200 while the process serves requests at all.
- ``GET /health/ready``: 200 when the database answers, the SCP listens (serve/run) and the
  archive has free space above the watermark; 503 with the failing checks otherwise.
- ``GET /metrics``: Prometheus text format 0.0.4 (see :mod:`dicomnode.ops.prometheus`).
- ``GET /status``: the process status as JSON (what ``dicomnode status`` shows).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dicomnode.errors import ConfigError
from dicomnode.ops import prometheus
from dicomnode.ops.logs import kv

log = logging.getLogger("dicomnode.http")

# name -> (ok, detail); each check must be quick (it runs on every /health/ready)
ReadyCheck = Callable[[], dict[str, tuple[bool, str]]]


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"``, ``":port"`` or ``"port"`` (loopback) -> (host, port)."""
    text = listen.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"[http] listen = {listen!r}: expected host:port, e.g. "
                          "\"127.0.0.1:8080\" (empty switches the endpoint off)")
    return host, port


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/health/live":
            self._send(200, "text/plain; charset=utf-8", b"ok\n")
        elif path == "/health/ready":
            checks = self.server.run_checks()
            ok = all(passed for passed, _ in checks.values())
            body = {"ready": ok, "checks": {k: {"ok": p, "detail": d}
                                             for k, (p, d) in checks.items()}}
            self._send(200 if ok else 503, "application/json",
                       json.dumps(body).encode() + b"\n")
        elif path == "/metrics":
            self._send(200, "text/plain; version=0.0.4; charset=utf-8",
                       self.server.registry.render().encode())
        elif path == "/status" and self.server.status is not None:
            self._send(200, "application/json", json.dumps(self.server.status()).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # scrapes every few seconds would flood the log


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], ready: ReadyCheck,
                 registry: prometheus.Registry, status: Callable[[], dict] | None) -> None:
        super().__init__(address, _Handler)
        self.ready = ready
        self.registry = registry
        self.status = status

    def run_checks(self) -> dict[str, tuple[bool, str]]:
        try:
            return self.ready()
        except Exception as exc:  # a check that raises is a failed check
            return {"checks": (False, f"{type(exc).__name__}: {exc}")}


class HealthServer:
    """The endpoint; ``start()`` binds (raising a DicomnodeError if it cannot) and serves in
    a daemon thread, ``stop()`` shuts it down."""

    def __init__(self, listen: str, ready: ReadyCheck, *,
                 registry: prometheus.Registry = prometheus.REGISTRY,
                 status: Callable[[], dict] | None = None) -> None:
        self.host, self.port = parse_listen(listen)
        self._ready = ready
        self._registry = registry
        self._status = status
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from dicomnode.errors import DicomnodeError

        try:
            self._server = _Server((self.host, self.port), self._ready, self._registry,
                                   self._status)
        except OSError as exc:
            raise DicomnodeError(f"[http] cannot listen on {self.host}:{self.port} "
                                 f"({exc.strerror or exc}); choose a free port") from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http",
                                        kwargs={"poll_interval": 0.5}, daemon=True)
        self._thread.start()
        log.info("event=http_listening %s", kv(host=self.host, port=self.port))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
