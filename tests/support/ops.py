"""Helpers for the operations and fault tests: many small instances, storescu's verbose
output, raw C-STOREs of hand-broken files, process memory."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

from tests.support.peers import NODE_AE, wait_for


def copies_of(source: Path, out: Path, count: int, *, study_uid: str | None = None
              ) -> tuple[list[Path], str]:
    """``count`` copies of one image with new SOP Instance UIDs in one new study (one series
    per copy, as single-image series are what a PACS forwards most); the study UID."""
    ds = dcmread(source)
    study_uid = study_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = out / f"img{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, study_uid


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
               .SOPInstanceUID)


_SENDING = re.compile(r"Sending file: (\S+)")
_RESPONSE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")


def acknowledged(storescu_output: str) -> list[Path]:
    """Files that dcmtk storescu (-v) saw a Success response for: each "Sending file" line is
    followed by one "Received Store Response (Success)" line when the peer acknowledged it."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1))
        elif (m := _RESPONSE.search(line)) and current is not None:
            if (m.group(1) or "").startswith("Success"):
                acked.append(current)
            current = None
    return acked


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def scu(calling: str = "PACS") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    return ae


def send_raw(port: int, files: list[Path], contexts: list[tuple[str, str]]) -> list[int | None]:
    """C-STORE files as their bytes are (a broken body is sent as it is, never re-encoded);
    the status of each (None: no response, e.g. the association was aborted)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = scu()
    for abstract, transfer in contexts:
        ae.add_requested_context(abstract, [transfer])
    statuses: list[int | None] = []
    try:
        for path in files:  # one association each: a refusal must not hide the next case
            assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
            assert assoc.is_established, "node refused the association"
            try:
                rsp = assoc.send_c_store(path)
                statuses.append(int(rsp.Status) if rsp and "Status" in rsp else None)
            finally:
                if assoc.is_established:
                    assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


__all__ = ["NODE_AE", "acknowledged", "copies_of", "kill", "rss_mb", "scu",
           "send_raw", "sop_uid", "wait_for"]
