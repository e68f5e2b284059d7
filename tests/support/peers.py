"""Real peers for tests, on 127.0.0.1 only, each stopped by its context manager.

Every wait is a bounded loop: a peer that does not come up fails the test, it never hangs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomnode.external import dcmtk_program, free_port, port_open, stop_process

# Under CI (.ci/run sets DICOMNODE_REQUIRE_PEERS=1) a missing peer fails the test instead of
# skipping it (tests/conftest.py).
REQUIRE_PEERS = os.environ.get("DICOMNODE_REQUIRE_PEERS") == "1"
NODE_AE = "DICOMNODE"  # the node's AE title, as write_config sets it
NO_MODELS = {"dbt": "none", "ffdm": "none", "s2d": "none"}  # write_config's models: none


def dcmtk(tool: str) -> str:
    """dcmtk's program (not pynetdicom's same-named script); "" when dcmtk is missing."""
    return dcmtk_program(tool) or ""


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


_stop = stop_process


@contextmanager
def storescp(out_dir: Path, ae_title: str = "RESULTS") -> Iterator[int]:
    """dcmtk's storescp writing every received object into out_dir; yields its port."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", ae_title, "-od", str(out_dir), "+xa", "-uf", "-fe", ".dcm",
         str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 20, "storescp start")
        if proc.poll() is not None:
            raise RuntimeError(f"storescp exited: {proc.stderr.read().decode()}")
        yield port
    finally:
        _stop(proc)


class OrthancServer:
    def __init__(self, root: Path, ae_title: str, modalities: dict[str, list]) -> None:
        self.root = root
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as rsp:
            return json.loads(rsp.read())

    def post(self, path: str, body: bytes | dict):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=60) as rsp:
            return json.loads(rsp.read())

    def start(self, extra: dict | None = None) -> None:
        config = {
            "Name": "dicomnode-test", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": self.modalities, "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False, "StableAge": 2, "Plugins": [],
            "HttpBindAddress": "127.0.0.1", "DicomServerEnabled": True,
            **(extra or {}),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        log = open(self.root / "orthanc.log", "wb")
        self.proc = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=log)
        wait_for(lambda: port_open(self.http_port) or self.proc.poll() is not None, 60,
                 "Orthanc start")
        if self.proc.poll() is not None:
            raise RuntimeError((self.root / "orthanc.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


# deploy/orthanc as shipped, and Orthanc's DICOMweb plugin (Debian orthanc-dicomweb)
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def deploy_config(root: Path, node_port: int) -> dict:
    """The shipped orthanc.json with this test's paths and ports."""
    text = (DEPLOY / "orthanc.json").read_text()
    config = json.loads(re.sub(r"(?m)^\s*//.*$", "", text))
    config.update({
        "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "LuaScripts": [str(DEPLOY / "dicomnode-route.lua")],
        "StableAge": 2, "Plugins": [], "SaveJobs": False,
    })
    config["DicomModalities"]["dicomnode"]["Port"] = node_port
    for key in ("HttpPort", "DicomPort", "DicomAet"):  # the test server's free ports instead
        del config[key]
    return config


@contextmanager
def orthanc(root: Path, ae_title: str = "ORTHANC", modalities: dict[str, list] | None = None,
            extra: dict | None = None) -> Iterator[OrthancServer]:
    server = OrthancServer(root, ae_title, modalities or {})
    server.start(extra)
    try:
        yield server
    finally:
        server.stop()


def write_config(path: Path, *, data_dir: Path, port: int, peers: list[dict],
                 models: dict[str, str], idle_seconds: float = 2.0,
                 extra: str = "") -> Path:
    lines = [
        "[node]", 'ae_title = "DICOMNODE"', 'host = "127.0.0.1"', f"port = {port}",
        f'data_dir = "{data_dir}"', f"idle_seconds = {idle_seconds}", "",
        "[storage]", "min_free_mb = 0", "",
        "[delivery]", "max_attempts = 3", "backoff_initial_seconds = 0.5",
        "backoff_max_seconds = 2", "",
        "[worker]", "poll_seconds = 0.2", "",
        "[model]", 'device = "cpu"',
        *[f'{m} = "{p}"' for m, p in models.items()], "",
    ]
    for peer in peers:
        lines += ["[[peers]]", *[f"{k} = {json.dumps(v)}" for k, v in peer.items()], ""]
    path.write_text("\n".join(lines) + extra)
    return path


@contextmanager
def node_process(config: Path, command: str = "run", log_path: Path | None = None,
                 port: int | None = None) -> Iterator[subprocess.Popen]:
    """`dicomnode --config CONFIG run` in a subprocess; waits until it listens."""
    log = open(log_path or config.with_suffix(".log"), "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "--config", str(config),
                             command], stdout=log, stderr=log, env=env)
    try:
        if port is not None:
            wait_for(lambda: port_open(port) or proc.poll() is not None, 90, "node start")
            if proc.poll() is not None:
                raise RuntimeError(Path(log.name).read_text()[-3000:])
        yield proc
    finally:
        _stop(proc, timeout=60)


def make_checkpoint(path: Path, modality: str, *, seed: int = 0, num_crops: int = 4) -> Path:
    """A randomly initialised GMIC checkpoint sized for the small synthetic studies."""
    import torch

    from gmic.checkpoint import save_checkpoint
    from gmic.model import GMIC
    from gmic.model_config import GMICConfig

    factory = {"dbt": GMICConfig.dbt, "ffdm": GMICConfig.ffdm, "s2d": GMICConfig.s2d}[modality]
    input_size = (640, 480) if modality == "ffdm" else (448, 320)
    cfg = factory(input_size=input_size, num_crops=num_crops)
    torch.manual_seed(seed)
    save_checkpoint(path, GMIC(cfg), meta={"description": "random weights for tests"})
    return path
