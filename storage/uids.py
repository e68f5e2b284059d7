"""DICOM UID validation (PS3.5 9.1): the gate in front of every path built from a UID."""

from __future__ import annotations

import re

from storage.errors import InvalidUID

MAX_UID_LENGTH = 64
# ASCII digits only (``\d`` would accept other scripts' digits); a multi-digit component
# does not start with 0. This grammar leaves no room for '/', '..' or any odd character.
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a string that is a syntactically valid DICOM UID."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH
            and _UID.fullmatch(value) is not None)


def validate_uid(value: object, field: str = "UID") -> str:
    """Return ``value`` when it is a valid UID, else raise :class:`InvalidUID` naming ``field``."""
    if not is_valid_uid(value):
        raise InvalidUID(field, value)
    return value  # type: ignore[return-value]
