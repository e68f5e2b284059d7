"""The external DICOM programs the node's benchmarks and checks drive, and reaching them on
loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

# dcmtk installs here on Debian. Searching PATH would find pynetdicom's own `storescu`,
# `storescp` and `echoscu` scripts first inside a virtual environment.
_DCMTK_FOLDERS = ("/usr/bin", "/usr/local/bin")


def dcmtk_program(name: str) -> str | None:
    """Path of dcmtk's program `name`, or None when dcmtk is not installed."""
    for folder in _DCMTK_FOLDERS:
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, timeout: float = 20) -> None:
    """Wait, at most ``timeout`` seconds, until 127.0.0.1:port accepts connections."""
    from dicomnode.errors import DicomnodeError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.1)
    raise DicomnodeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a child process and wait for it; SIGKILL when it outlives timeout."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
