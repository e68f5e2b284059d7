"""Locating the external DICOM programs the node's benchmarks and checks drive."""

from __future__ import annotations

import os

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
