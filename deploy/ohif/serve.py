#!/usr/bin/env python3
"""Serve the OHIF v3 viewer and Orthanc's DICOMweb from one origin (standard library only).

OHIF's prebuilt app (npm `@ohif/app`, its `dist/` folder) is static; Orthanc sends no CORS
headers, so the viewer and DICOMweb must share an origin. This server:

- serves DIST at the web root (OHIF's index.html hard-codes "/"), with a fallback to
  index.html for the app's routes (/viewer, /segmentation, ...), and the headers that make
  the page cross-origin isolated (COOP/COEP: OHIF's codecs use SharedArrayBuffer);
- serves /app-config.js from --app-config (default: app-config.js next to this script),
  so DIST stays as unpacked;
- proxies /dicom-web/ and /wado to Orthanc (--orthanc), passing the client's Host header,
  so the URLs Orthanc writes into its answers (BulkDataURI) point back here.

    python3 serve.py --dist /opt/ohif/package/dist --orthanc http://127.0.0.1:8042 --port 3000

It binds 127.0.0.1 unless --host says otherwise. It has no authentication: anyone who can
reach it reads the PACS. Put it behind your site's reverse proxy and login for real use.
"""

from __future__ import annotations

import argparse
import http.client
import mimetypes
import posixpath
import shutil
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROXIED = ("/dicom-web/", "/dicom-web?", "/wado")
# Request and response headers relayed as they are (hop-by-hop headers are not).
_REQUEST_HEADERS = ("accept", "accept-encoding", "content-type", "range", "if-none-match",
                    "if-modified-since", "authorization")
_RESPONSE_SKIP = {"connection", "keep-alive", "transfer-encoding", "proxy-authenticate",
                  "proxy-authorization", "te", "trailer", "upgrade"}
_ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


class OhifHandler(BaseHTTPRequestHandler):
    server_version = "dicomnode-ohif"
    protocol_version = "HTTP/1.1"
    dist: Path
    app_config: Path | None
    orthanc: urllib.parse.SplitResult
    timeout_s: float = 120.0
    quiet: bool = False

    # ------------------------------------------------------------------ dispatch

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head=True)

    def do_POST(self) -> None:  # noqa: N802 (STOW-RS; QIDO/WADO are GETs)
        if self.path.startswith(PROXIED):
            self._proxy()
        else:
            self.send_error(405)

    def _dispatch(self, head: bool) -> None:
        if self.path.startswith(PROXIED):
            self._proxy()
        else:
            self._static(head)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if not self.quiet:
            sys.stderr.write(f"ohif-serve {self.address_string()} {format % args}\n")

    # ------------------------------------------------------------------ static files

    def _file_for(self, url_path: str) -> Path | None:
        path = posixpath.normpath(urllib.parse.unquote(url_path.split("?", 1)[0]))
        if path == "/app-config.js" and self.app_config is not None:
            return self.app_config
        parts = [p for p in path.split("/") if p and p not in (".", "..")]
        candidate = self.dist.joinpath(*parts) if parts else self.dist / "index.html"
        if candidate.is_dir():
            candidate = candidate / "index.html"
        try:
            candidate.resolve().relative_to(self.dist.resolve())
        except ValueError:
            return None
        if candidate.is_file():
            return candidate
        # an app route (/viewer?..., /segmentation) gets the app; a missing asset a 404
        last = parts[-1] if parts else ""
        return None if "." in last else self.dist / "index.html"

    def _static(self, head: bool) -> None:
        path = self._file_for(self.path)
        if path is None or not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size))
        # index.html and app-config.js change with the deployment; hashed bundles do not
        cache = "no-cache" if path.suffix == ".html" or path.name == "app-config.js" \
            else "public, max-age=3600"
        self.send_header("Cache-Control", cache)
        for key, value in _ISOLATION.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            with open(path, "rb") as fh:
                shutil.copyfileobj(fh, self.wfile, 1 << 20)

    # ------------------------------------------------------------------ proxy

    def _proxy(self) -> None:
        target = self.orthanc
        conn_cls = http.client.HTTPSConnection if target.scheme == "https" \
            else http.client.HTTPConnection
        conn = conn_cls(target.hostname, target.port, timeout=self.timeout_s)
        headers = {k: v for k, v in self.headers.items() if k.lower() in _REQUEST_HEADERS}
        # Orthanc's DICOMweb plugin builds BulkDataURIs from the Host header (unless its
        # "Host" option is set): keep the client's, so they point at this server.
        headers["Host"] = self.headers.get("Host", f"{target.hostname}:{target.port}")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        base = target.path.rstrip("/")
        try:
            conn.request(self.command, base + self.path, body=body, headers=headers)
            rsp = conn.getresponse()
        except OSError as exc:
            conn.close()
            self.send_error(502, f"Orthanc at {target.geturl()} did not answer: {exc}")
            return
        try:
            self.send_response(rsp.status, rsp.reason)
            for key, value in rsp.getheaders():
                if key.lower() not in _RESPONSE_SKIP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            declared = rsp.getheader("Content-Length")
            if declared is not None:
                self.send_header("Content-Length", declared)
                self.end_headers()
                if self.command != "HEAD":
                    shutil.copyfileobj(rsp, self.wfile, 1 << 20)
            else:  # Orthanc answered chunked: relay it chunked
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while self.command != "HEAD":
                    block = rsp.read(1 << 16)
                    if not block:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                if self.command != "HEAD":
                    self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser went away (cancelled request)
        finally:
            conn.close()


def make_server(dist: Path, orthanc: str, *, host: str = "127.0.0.1", port: int = 3000,
                app_config: Path | None = HERE / "app-config.js",
                quiet: bool = False) -> ThreadingHTTPServer:
    """The server, bound but not yet serving (call serve_forever, e.g. in a thread)."""
    dist = Path(dist)
    if not (dist / "index.html").is_file():
        raise FileNotFoundError(f"{dist} has no index.html: point --dist at the dist/ folder "
                                "of the unpacked @ohif/app tarball")
    if app_config is not None and not Path(app_config).is_file():
        raise FileNotFoundError(f"app config {app_config} does not exist")
    handler = type("Handler", (OhifHandler,), {
        "dist": dist, "app_config": Path(app_config) if app_config else None,
        "orthanc": urllib.parse.urlsplit(orthanc.rstrip("/")), "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(dist: Path, orthanc: str, **kwargs) -> tuple[ThreadingHTTPServer,
                                                                threading.Thread]:
    """Start the server in a daemon thread; stop it with server.shutdown()."""
    server = make_server(dist, orthanc, **kwargs)
    thread = threading.Thread(target=server.serve_forever, name="ohif-serve", daemon=True)
    thread.start()
    return server, thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", required=True, type=Path,
                        help="the dist/ folder of the unpacked @ohif/app tarball")
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042",
                        help="Orthanc's HTTP root (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=3000, help="port (%(default)s)")
    parser.add_argument("--app-config", type=Path, default=HERE / "app-config.js",
                        help="OHIF configuration served as /app-config.js (%(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no access log")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.dist, args.orthanc, host=args.host, port=args.port,
                             app_config=args.app_config, quiet=args.quiet)
    except (FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"OHIF on http://{args.host}:{server.server_address[1]}/ , DICOMweb from "
          f"{args.orthanc}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
