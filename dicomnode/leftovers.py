"""Files a killed process left half-written in a receive directory (DIMSE C-STORE datasets,
STOW-RS and WADO-RS parts), removed when a server starts."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dicomnode.ops.logs import kv

log = logging.getLogger(__name__)


def remove_file(path: Path, event: str = "leftover_unlink_failed") -> bool:
    """Remove one file; False, without raising, where it is already gone (another process
    swept it first) or cannot be removed (logged as `event`)."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("event=%s %s", event, kv(path=path.name, error=exc))
        return False


def remove_stale(directory: Path, pattern: str, older_than_s: float) -> int:
    """Remove the files matching `pattern` in `directory` last modified over `older_than_s`
    ago; not younger ones, which may be another live process's on a shared data directory.
    How many were removed."""
    cutoff = time.time() - older_than_s
    removed = 0
    for path in directory.glob(pattern):
        try:
            old = path.stat().st_mtime < cutoff
        except FileNotFoundError:
            continue  # another process swept it first
        if old and remove_file(path):
            removed += 1
    return removed
