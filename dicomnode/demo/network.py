"""The demo's side of the network, all on 127.0.0.1: the node as a subprocess (`dicomnode
run`, as it is deployed), a PACS-like C-STORE SCU that sends the study, and a C-STORE SCP
that receives the results. pynetdicom only: no dcmtk needed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MammographyCADSRStorage,
    ParametricMapStorage,
    SegmentationStorage,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicomnode.config import ModelConfig, ResultsConfig
from dicomnode.demo.errors import DemoFailed
from dicomnode.external import port_open, stop_process

HOST = "127.0.0.1"
NODE_AE = "DICOMNODE"
# The demo's PACS: it sends the study and receives the results under one AE title, as a
# PACS that routes a study to the node does.
PACS_AE = "DEMOPACS"
# Result classes a receiver must accept (pynetdicom's default storage list lacks some).
RESULT_SOP_CLASSES = (ParametricMapStorage, SegmentationStorage, Comprehensive3DSRStorage,
                      MammographyCADSRStorage)
_LISTENING = re.compile(r"listening as \S+ on [\w.:-]+:(\d+)")


@dataclass(frozen=True)
class Received:
    path: Path
    sop_class_uid: str
    at: float  # time.monotonic() when it arrived


class ResultReceiver:
    """A C-STORE SCP on 127.0.0.1 (any free port) writing each object it receives to
    `folder/<SOP Instance UID>.dcm`."""

    def __init__(self, folder: Path, ae_title: str = PACS_AE) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = 0
        self._server = None
        self._lock = threading.Lock()
        self._received: list[Received] = []

    def start(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        ae.require_called_aet = True
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        known = {c.abstract_syntax for c in ae.supported_contexts}
        for uid in RESULT_SOP_CLASSES:
            if uid not in known:
                ae.add_supported_context(uid)
        try:
            self._server = ae.start_server((HOST, 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        except OSError as exc:
            raise DemoFailed("start the results receiver",
                             f"cannot listen on {HOST} ({exc.strerror or exc})") from None
        self.port = int(self._server.server_address[1])
        return self.port

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if not re.fullmatch(r"[0-9.]{1,64}", uid):
            return 0xA900  # not a UID: do not make a file name of it
        path = self.folder / f"{uid}.dcm"
        tmp = path.with_suffix(".part")
        try:
            tmp.write_bytes(event.encoded_dataset(include_meta=True))
            tmp.replace(path)
        except OSError:
            return 0xA700
        with self._lock:
            self._received.append(Received(path, str(event.request.AffectedSOPClassUID),
                                           time.monotonic()))
        return 0x0000

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def send_study(files: list[Path], port: int, *, progress: Callable[[int, int], None],
               calling_ae: str = PACS_AE, called_ae: str = NODE_AE) -> None:
    """C-STORE every file to the node over one association; raises DemoFailed."""
    step = "send the study"
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = 30
    ae.network_timeout = 120
    ae.dimse_timeout = 120
    for sop_class in sorted({str(h.SOPClassUID) for h in headers}):
        syntaxes = {str(h.file_meta.TransferSyntaxUID) for h in headers
                    if str(h.SOPClassUID) == sop_class}
        ae.add_requested_context(sop_class, sorted(syntaxes) + [
            s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s not in syntaxes])
    assoc = ae.associate(HOST, port, ae_title=called_ae)
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "did not accept"
        raise DemoFailed(step, f"the node at {HOST}:{port} {how} the association from "
                               f"{calling_ae}; see its log")
    try:
        for n, path in enumerate(files, 1):
            if not assoc.is_established:
                raise DemoFailed(step, f"the node ended the association after {n - 1} of "
                                       f"{len(files)} instances; see its log")
            rsp = assoc.send_c_store(path)
            status = int(getattr(rsp, "Status", -1)) if rsp else -1
            if status not in (0x0000, 0xB000, 0xB006, 0xB007):
                comment = str(getattr(rsp, "ErrorComment", "") or "") if rsp else ""
                what = "no response" if status == -1 else f"status 0x{status:04X}"
                raise DemoFailed(step, f"the node refused {path.name} ({what}"
                                       f"{': ' + comment if comment else ''})")
            progress(n, len(files))
    finally:
        if assoc.is_established:
            assoc.release()


def _toml(value: object) -> str:
    """A TOML scalar: JSON's strings, numbers and booleans are TOML's."""
    return json.dumps(value)


def node_config_text(*, data_dir: Path, receiver_port: int, model: ModelConfig,
                     results: ResultsConfig, idle_seconds: float = 2.0) -> str:
    """The node's configuration: loopback, any free port, results to the demo's PACS."""
    lines = [
        "# written by `dicomnode demo`",
        "[node]", f"ae_title = {_toml(NODE_AE)}", f"host = {_toml(HOST)}", "port = 0",
        f"data_dir = {_toml(str(data_dir))}", f"idle_seconds = {idle_seconds}", "",
        "[storage]", "min_free_mb = 64", "",
        "[delivery]", "max_attempts = 4", "backoff_initial_seconds = 0.5",
        "backoff_max_seconds = 2.0", "",
        "[worker]", "poll_seconds = 0.2", "",
        "[model]", *[f"{key} = {_toml(getattr(model, key))}"
                     for key in ("device", "dbt", "ffdm", "s2d")], "",
        "[results]", *[f"{key} = {_toml(getattr(results, key))}"
                       for key in ("benign_operating_point", "malignant_operating_point",
                                   "segmentation", "max_array_mb", "cad_sr",
                                   "cad_operating_points", "cad_presentation_required")], "",
        "[[peers]]", f"ae_title = {_toml(PACS_AE)}", f"host = {_toml(HOST)}",
        f"port = {receiver_port}", "send_results = true", "",
    ]
    return "\n".join(lines)


class NodeProcess:
    """`python -m dicomnode.cli --config CONFIG run`, its output in a log file."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout: float) -> int:
        """Start the node and wait (at most `timeout` s) until it listens; its port."""
        step = "start the node"
        # The demo's configuration file decides everything: a DICOMNODE_* variable meant
        # for another node (DICOMNODE_NODE_PORT, DICOMNODE_CONFIG...) must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomnode.cli", "--config", str(self.config_path),
                 "run"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoFailed(step, f"the node exited with status {self.proc.returncode}: "
                                       f"{self.last_error()} (log: {self.log_path})")
            match = _LISTENING.search(self._log_text())
            if match and port_open(int(match.group(1))):
                self.port = int(match.group(1))
                return self.port
            time.sleep(0.1)
        raise DemoFailed(step, f"the node did not listen within {timeout:.0f} s "
                               f"(log: {self.log_path}); raise --timeout on a slow machine")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_lines(self) -> list[str]:
        return self._log_text().splitlines()

    def last_error(self) -> str:
        """The node's last `error: ...` line, else its last error log event, else its last
        line."""
        lines = [line.strip() for line in self.log_lines() if line.strip()]
        for line in reversed(lines):
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        for line in reversed(lines):
            if " level=error " in line or " level=critical " in line:
                return line.split(" logger=", 1)[-1][:400]
        return lines[-1][:400] if lines else "no output"

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)
