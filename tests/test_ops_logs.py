"""The node's log lines: key=value events, and no dataset value quoted by a library."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from dicomnode.logs import configure_logging, kv


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
