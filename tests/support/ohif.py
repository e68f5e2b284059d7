"""Headless Chromium driven over the DevTools protocol (CDP), for the OHIF viewer test.

- `ohif_dist()`: the unpacked `@ohif/app` dist/ (DICOMNODE_OHIF_DIST, set by .ci/run);
- `ohif_server()`: deploy/ohif/serve.py in a subprocess: OHIF and Orthanc's DICOMweb on one
  loopback origin;
- `chromium()`: Chromium with its own profile, WebGL through SwiftShader, name resolution of
  every host but 127.0.0.1 refused (a request that tries to leave still shows in the log);
- `Page`: one tab: every request URL (Network domain), every console error and uncaught
  exception, JavaScript evaluation, bounded waits, screenshots as RGB arrays.

Every wait is bounded; every process is stopped by its context manager.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicomnode.external import free_port, port_open
from tests.support.peers import _stop, wait_for

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "deploy" / "ohif" / "serve.py"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def ohif_dist() -> Path | None:
    """The OHIF dist/ folder named by DICOMNODE_OHIF_DIST, when it holds the app."""
    value = os.environ.get("DICOMNODE_OHIF_DIST", "")
    path = Path(value) if value else None
    return path if path is not None and (path / "index.html").is_file() else None


def chromium_binary() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def websocket_client_available() -> bool:
    try:
        import websocket  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def ohif_server(dist: Path, orthanc_url: str, log_path: Path) -> Iterator[str]:
    """deploy/ohif/serve.py on a free loopback port; yields its base URL."""
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, str(SERVE), "--dist", str(dist), "--orthanc",
                             orthanc_url, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=log)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 30, "OHIF server start")
        if proc.poll() is not None:
            raise RuntimeError(log_path.read_text()[-2000:])
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc, timeout=10)
        log.close()


# ---------------------------------------------------------------------------- CDP


class CDPError(RuntimeError):
    pass


@dataclass
class Recorded:
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    failed: list[str] = field(default_factory=list)  # "URL: reason" of failed loads
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, log errors
    warnings: list[str] = field(default_factory=list)


class Page:
    """One page target, over a websocket; a reader thread files answers and events."""

    def __init__(self, ws_url: str, timeout: float = 30.0) -> None:
        import websocket

        self._ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self._ws.settimeout(None)
        self._ids = itertools.count(1)
        self._answers: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.recorded = Recorded()
        self._request_urls: dict[str, str] = {}
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = json.loads(self._ws.recv())
            except Exception:  # closed: wake any waiter
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            if "id" in message:
                with self._cond:
                    self._answers[message["id"]] = message
                    self._cond.notify_all()
            else:
                self._event(message.get("method", ""), message.get("params", {}))

    def _event(self, method: str, params: dict) -> None:
        rec = self.recorded
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            rec.requests.append(url)
            self._request_urls[params["requestId"]] = url
        elif method == "Network.webSocketCreated":
            rec.requests.append(params["url"])
        elif method == "Network.loadingFailed":
            url = self._request_urls.get(params["requestId"], "?")
            if not params.get("canceled"):
                rec.failed.append(f"{url}: {params.get('errorText')}")
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_text(a) for a in params.get("args", []))
            if params.get("type") in ("error", "assert"):
                rec.errors.append(f"console.{params['type']}: {text}")
            elif params.get("type") == "warning":
                rec.warnings.append(text)
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = _remote_text(details.get("exception", {})) or details.get("text", "")
            rec.errors.append(f"exception: {text}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                rec.errors.append(f"log.{entry.get('source')}: {entry.get('text')} "
                                  f"{entry.get('url', '')}".strip())

    def call(self, method: str, params: dict | None = None, *, timeout: float = 60.0) -> dict:
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._answers:
                left = deadline - time.monotonic()
                if self._closed:
                    raise CDPError(f"{method}: the browser closed the connection")
                if left <= 0:
                    raise TimeoutError(f"{method} got no answer within {timeout:.0f} s")
                self._cond.wait(left)
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def evaluate(self, expression: str, timeout: float = 60.0):
        """The value of a JavaScript expression (awaited if a promise), as JSON."""
        result = self.call("Runtime.evaluate", {
            "expression": expression, "awaitPromise": True, "returnByValue": True,
            "timeout": int(timeout * 1000)}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = _remote_text(details.get("exception", {})) or details.get("text")
            raise CDPError(f"JavaScript failed: {text}\n{expression[:300]}")
        return result.get("result", {}).get("value")

    def wait_js(self, expression: str, timeout: float, what: str, interval: float = 0.5):
        """Poll an expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression, timeout=max(5.0, interval * 4))
            except (CDPError, TimeoutError) as exc:
                last = exc
            if last and not isinstance(last, Exception):
                return last
            time.sleep(interval)
        raise TimeoutError(f"{what} did not happen within {timeout:.0f} s (last: {last!r})")

    def navigate(self, url: str, timeout: float = 60.0) -> None:
        self.call("Page.navigate", {"url": url}, timeout=timeout)
        self.wait_js("document.readyState === 'complete'", timeout, f"loading {url}")

    def screenshot(self) -> np.ndarray:
        """The page as an RGB uint8 array (CSS pixels: the device scale factor is 1)."""
        from PIL import Image

        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    def close(self) -> None:
        try:
            self._ws.close()
        except Exception:
            pass


def _remote_text(obj: dict) -> str:
    """Text of a CDP RemoteObject (console argument, exception)."""
    if "value" in obj:
        return str(obj["value"])
    return str(obj.get("description") or obj.get("unserializableValue") or obj.get("type", ""))


def save_png(array: np.ndarray, path: Path, colours: int | None = None) -> Path:
    """An RGB array as PNG; `colours` reduces it to a palette of that many colours."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if colours:
        image = image.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(path, optimize=True)
    return path


# ---------------------------------------------------------------------------- Chromium


@contextmanager
def chromium(log_path: Path, *, width: int = 1400, height: int = 900,
             timeout: float = 60.0) -> Iterator[Page]:
    """Headless Chromium with a throwaway profile; yields its first page, with the
    Network, Runtime, Log and Page domains enabled."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH (Debian package chromium)")
    profile = Path(tempfile.mkdtemp(prefix="dicomnode-chromium-"))
    port = free_port()
    args = [
        binary, "--headless=new", f"--remote-debugging-port={port}",
        "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
        f"--window-size={width},{height}", "--force-device-scale-factor=1",
        # WebGL2 in software: OHIF's renderer (cornerstone3D, vtk.js) needs WebGL.
        "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--ignore-gpu-blocklist",
        # nothing but 127.0.0.1 resolves, so nothing can leave the machine; the attempt is
        # still a request in the Network log, where the test looks for it
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps",
        "--disable-domain-reliability", "--disable-client-side-phishing-detection",
        "--disable-features=OptimizationHints,MediaRouter,Translate,InterestFeedContentSuggestions",
        "--metrics-recording-only", "--mute-audio", "--disable-dev-shm-usage",
        "about:blank",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
    log = open(log_path, "wb")
    # its singleton socket directory too goes under the profile (TMPDIR), removed below,
    # not left in the system's temporary directory at every run
    proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(profile)})
    page = None
    try:
        def targets() -> list[dict]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                            timeout=5) as rsp:
                    return [t for t in json.loads(rsp.read()) if t.get("type") == "page"]
            except OSError:
                return []

        wait_for(lambda: bool(targets()) or proc.poll() is not None, timeout, "Chromium start")
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited: {log_path.read_text()[-2000:]}")
        page = Page(targets()[0]["webSocketDebuggerUrl"], timeout=timeout)
        for domain in ("Network", "Runtime", "Log", "Page"):
            page.call(f"{domain}.enable")
        page.call("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        yield page
    finally:
        if page is not None:
            page.close()
        _stop_group(proc)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """Chromium and its helper processes (its own session, started above)."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    else:  # the browser is gone; its helpers may not be
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
