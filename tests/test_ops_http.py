"""dicomnode.ops.http: the listen addresses (loopback by default) and the HTTP endpoint's
/health/live, /health/ready, /metrics and /status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from dicomnode.errors import ConfigError
from dicomnode.ops import prometheus as metrics
from dicomnode.ops.http import HealthServer, parse_listen


def test_listen_addresses_default_to_loopback() -> None:
    assert parse_listen("8080") == ("127.0.0.1", 8080)
    assert parse_listen(":9100") == ("127.0.0.1", 9100)
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    for bad in ("localhost:http", "127.0.0.1:70000", "x"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.headers["Content-Type"], rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_http_endpoint_health_ready_metrics_status() -> None:
    registry = metrics.Registry()
    registry.counter("h_total", "h").inc(4)
    checks = {"database": (True, "ok"), "disk": (True, "plenty")}
    server = HealthServer("127.0.0.1:0", lambda: dict(checks), registry=registry,
                          status=lambda: {"role": "serve"})
    server.start()
    try:
        assert _get(server.url + "/health/live")[0] == 200
        code, _, body = _get(server.url + "/health/ready")
        assert code == 200 and json.loads(body)["ready"] is True
        checks["disk"] = (False, "2 MB free, watermark 1024 MB")
        code, _, body = _get(server.url + "/health/ready")
        assert code == 503 and json.loads(body)["checks"]["disk"]["ok"] is False
        code, content_type, body = _get(server.url + "/metrics")
        assert code == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert "h_total 4" in body
        assert json.loads(_get(server.url + "/status")[2]) == {"role": "serve"}
        assert _get(server.url + "/nothing")[0] == 404
    finally:
        server.stop()
