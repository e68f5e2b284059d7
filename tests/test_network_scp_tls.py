"""TLS on the receiver: mutual TLS accepts a client with a certificate from the CA and
refuses one without; a bad key path is a configuration error."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.config import Config, TLSConfig
from dicomnode.errors import ConfigError
from dicomnode.network.scp import AllowedPeer, ReceiverPolicy, StorageSCP
from dicomnode.wiring import ssl_context_from_config
from storage import Store
from tests.support.tls import client_context


def test_mutual_tls(tmp_path: Path, pki: Path) -> None:
    config = Config()
    config.node.tls = TLSConfig(cert=str(pki / "node.crt"), key=str(pki / "node.key"),
                                ca=str(pki / "ca.crt"), require_client_cert=True)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "archive")
    scp = StorageSCP(store, ReceiverPolicy("DICOMNODE", [AllowedPeer("PACS", "127.0.0.1")]),
                     "127.0.0.1", 0, ssl_context_from_config(config))
    scp.start()
    try:
        ae = AE(ae_title="PACS")
        ae.acse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        good = ae.associate("127.0.0.1", scp.port, ae_title="DICOMNODE",
                            tls_args=(client_context(pki, True), "localhost"))
        assert good.is_established
        assert good.send_c_echo().Status == 0
        good.release()
        no_cert = ae.associate("127.0.0.1", scp.port, ae_title="DICOMNODE",
                               tls_args=(client_context(pki, False), "localhost"))
        assert not no_cert.is_established
        plain = ae.associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
        assert not plain.is_established
    finally:
        scp.stop()
        store.close()


def test_unreadable_key_is_a_configuration_error(tmp_path: Path, pki: Path) -> None:
    config = Config()
    config.node.tls = TLSConfig(cert=str(pki / "node.crt"), key=str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match=r"\[node.tls\]"):
        ssl_context_from_config(config)
