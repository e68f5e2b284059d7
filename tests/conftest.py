"""Shared test set-up.

Tests that need a real peer carry a marker (dcmtk, dicom3tools, pixelmed, orthanc, postgres).
Here, where the peer is missing, they are skipped; under CI (.ci/run sets
DICOMNODE_REQUIRE_PEERS=1) a missing peer is an error, so nothing is silently skipped there.
Session fixtures the tests only read: synthetic studies (synth_study) and a PKI (pki).
Helpers are in tests/support (tests/README.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import synth
from tests.support.peers import REQUIRE_PEERS, dcmtk
from tests.support.tls import make_pki


def pytest_report_header(config: pytest.Config) -> str:
    # A full run holds about 1 GB of studies, archives and checkpoints at its peak (1,020 MB
    # measured); a disk that runs out shows as hundreds of unrelated errors, so say up front
    # what is free.
    temp = tempfile.gettempdir()
    return f"free disk under {temp}: {shutil.disk_usage(temp).free / 2**30:.1f} GiB " \
           "(a full run needs about 1 GiB at its peak)"


_PEER_CHECKS = {
    "dcmtk": lambda: dcmtk("storescu") and dcmtk("storescp"),
    "dicom3tools": lambda: shutil.which("dciodvfy"),
    "postgres": lambda: os.environ.get("DICOMNODE_TEST_POSTGRES_URL"),
    "orthanc": lambda: shutil.which("Orthanc"),
    "pixelmed": lambda: Path("/usr/share/java/pixelmed.jar").exists() and shutil.which("java"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, available in _PEER_CHECKS.items():
            if marker in item.keywords and not available():
                if REQUIRE_PEERS:
                    item.add_marker(pytest.mark.usefixtures("_missing_peer_" + marker))
                else:
                    item.add_marker(pytest.mark.skip(reason=f"{marker} not available here"))


def _missing(marker: str):
    @pytest.fixture
    def fixture() -> None:
        pytest.fail(f"{marker} is required under DICOMNODE_REQUIRE_PEERS=1 but is missing")

    return fixture


_missing_peer_dcmtk = _missing("dcmtk")
_missing_peer_dicom3tools = _missing("dicom3tools")
_missing_peer_postgres = _missing("postgres")
_missing_peer_pixelmed = _missing("pixelmed")
_missing_peer_orthanc = _missing("orthanc")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    # Two cores here: keep torch from oversubscribing when tests run beside other work.
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and the node's, the PACS's and a stranger's certificates (tests/support/tls.py),
    made once per session: the tests only read them."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def synth_study(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """synth_study(**SynthOptions fields) -> the folder of that synthetic study, generated once
    per session and shared: read it, or copy it first (tests/support/synth.py)."""
    def study(**options: object) -> Path:
        return synth.synth_study(tmp_path_factory, **options)

    return study
