"""A throwaway PKI for the TLS tests, made with openssl: a CA and, signed by it, the node's
certificate and two clients' (the PACS's and a stranger's). Every certificate names
127.0.0.1 and localhost; the Common Names differ (STOW-RS maps a client's Common Name to a
peer)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

# file stem -> Common Name
CERTIFICATES = {"node": "localhost", "pacs": "pacs.hospital", "other": "stranger"}


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> Path:
    """ca.crt/ca.key and <name>.crt/<name>.key for each of CERTIFICATES, in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    for name, cn in CERTIFICATES.items():
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-copy_extensions", "copy", "-out", str(d / f"{name}.crt"))
    return d


def client_context(pki: Path, with_cert: bool) -> ssl.SSLContext:
    """A client's context trusting the CA; with the PACS's certificate when ``with_cert``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if with_cert:
        context.load_cert_chain(str(pki / "pacs.crt"), str(pki / "pacs.key"))
    return context
