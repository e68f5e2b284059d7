"""dicomnode.ops.logs: the node's log lines are key=value events, quote no dataset value from a
library, and carry UIDs but never patient names or IDs (nor does the audit trail)."""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.network.scp import AllowedPeer, ReceiverPolicy, StorageSCP
from dicomnode.ops.logs import configure_logging, kv
from storage import Store
from tests.support.ops import scu
from tests.support.synth import SMALL


@pytest.fixture
def node_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with warnings.catch_warnings():  # as an earlier run of the node in this process leaves it
        configure_logging("INFO")
    configure_logging("INFO")
    out = io.StringIO()
    root.handlers[0].setStream(out)
    yield out
    logging.captureWarnings(False)
    root.handlers[:], level = saved
    root.setLevel(level)


def test_library_messages_and_warnings_lose_their_quoted_values(node_logging) -> None:
    logging.getLogger("pydicom").warning(
        "Invalid value for VR PN: 'SMITH^JANE' (value length 10)")
    warnings.warn("Invalid value for VR LO: \"PID-12345\"", UserWarning, stacklevel=1)
    logging.getLogger("dicomnode.scp").warning("event=store_refused %s",
                                               kv(reason="bad 'quoted' text"))
    err = node_logging.getvalue()
    assert "SMITH^JANE" not in err and "PID-12345" not in err
    assert "Invalid value for VR PN: '<value>'" in err
    assert "logger=py.warnings" in err  # warnings go through the same handler
    # the node's own events are left as they are
    assert "reason=\"bad 'quoted' text\"" in err


@pytest.fixture(scope="module")
def image(synth_study) -> Path:
    return sorted(synth_study(**SMALL).glob("*/s2d/*.dcm"))[0]


def test_logs_and_audit_carry_uids_never_patient_names_or_ids(
        tmp_path: Path, image: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "archive")
    policy = ReceiverPolicy("DICOMNODE", [AllowedPeer("PACS", "127.0.0.1")],
                            patient_key_salt=b"s")
    scp = StorageSCP(store, policy, "127.0.0.1", 0)
    scp.start()
    ds = dcmread(image)
    ds.PatientName, ds.PatientID, ds.OtherPatientIDs = "Secretname^Jane", "PID-93471", "OPID-1"
    try:
        with caplog.at_level(logging.INFO, logger="dicomnode"):
            ae = scu()
            ae.add_requested_context(ds.SOPClassUID)
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOMNODE")
            assert assoc.send_c_store(ds).Status == 0
            assoc.release()
            time.sleep(0.5)  # the close event is handled on the association's thread
        audit = store.audit_trail()
    finally:
        scp.stop()
        store.close()
    text = caplog.text + repr(audit)
    assert str(ds.SOPInstanceUID) in caplog.text and str(ds.StudyInstanceUID) in caplog.text
    for secret in ("Secretname", "PID-93471", "OPID-1"):
        assert secret not in text
    assert any(a.event == "association" and a.count == 1 for a in audit)
