"""Deterministic UIDs: the same seed and names give the same UID in every run."""

from __future__ import annotations

import uuid

# A fixed namespace for name-based (version 5) UUIDs; UIDs are "2.25.<uuid as integer>"
# (PS3.5 B.2), so no organisation root is needed.
_NAMESPACE = uuid.UUID("6f1c3c52-6d0e-5a6b-9d8e-2b1f0f6a7c11")


def make_uid(seed: int, *parts: object) -> str:
    """UID derived from the seed and a path of names, e.g. make_uid(3, "study", 0, "dbt")."""
    name = "/".join(["dicomnode-synth", str(seed), *(str(p) for p in parts)])
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
