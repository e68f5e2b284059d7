"""Functions the storage tests run in separate OS processes (multiprocessing "spawn")."""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from storage import Store
from storage.archive import Archive


def hold_job(url: str, archive_dir: str, worker_id: str, lease_seconds: float,
             claimed: Any) -> None:
    """Claim one job, report its id, then 'work' until killed."""
    store = Store(url, archive_dir, create_schema=False)
    job = store.claim_job(worker_id, lease_seconds=lease_seconds)
    claimed.put(None if job is None else job.id)
    time.sleep(120)


def rewrite_forever(url: str, archive_dir: str, args: dict, payloads: list[bytes],
                    started: Any) -> None:
    """Store the same SOP instance over and over with alternating content, and new instances
    in between, until killed: the kill lands somewhere inside a write."""
    store = Store(url, archive_dir, create_schema=False)
    started.put(os.getpid())
    for n in itertools.count():
        store.store_instance(**{**args, "encoded": payloads[n % len(payloads)]})
        store.store_instance(**{**args, "encoded": payloads[0],
                                "sop_instance_uid": f"{args['series_uid']}.{1000 + n}"})


def die_after_rename(url: str, archive_dir: str, args: dict) -> None:
    """Store an instance but die (like SIGKILL: no cleanup, no commit) right after the file
    was renamed into the archive, before the database transaction commits."""
    original = Archive.commit

    def commit_then_die(self: Archive, temp: Any, relative: str) -> Any:
        original(self, temp, relative)
        os._exit(137)

    Archive.commit = commit_then_die  # type: ignore[method-assign]
    Store(url, archive_dir, create_schema=False).store_instance(**args)
