"""UID validation and the archive path built from UIDs."""

from __future__ import annotations

import pytest
from pydicom.uid import BreastTomosynthesisImageStorage

from storage.archive import Archive
from storage.errors import InvalidUID
from storage.uids import is_valid_uid, validate_uid

VALID = ["1", "0", BreastTomosynthesisImageStorage, "2.25.329800735698586629295641978511506172918",
         "1.0.2", "9" * 64]
INVALID = ["", "1.", ".1", "1..2", "1.02", "01.2", "1.2.a", "1.2 3", "1.2/3", "../1.2", "1.2\x00",
           " 1.2", "1.2\n", "1" + ".1" * 32, "１.２", None, 12, b"1.2"]


@pytest.mark.parametrize("uid", VALID)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)
    assert validate_uid(uid) == uid


@pytest.mark.parametrize("uid", INVALID)
def test_invalid_uids_are_named_errors(uid: object) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUID) as info:
        validate_uid(uid, "Study Instance UID")
    assert "Study Instance UID" in str(info.value) and "fix" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_archive_path_is_built_from_validated_uids_only() -> None:
    assert Archive.relative_path("1.2", "1.2.3", "1.2.3.4") == "1.2/1.2.3/1.2.3.4.dcm"
    assert Archive.relative_path("1.2", "1.2.3", "1.2.3.4", version="ab12") == \
        "1.2/1.2.3/1.2.3.4_ab12.dcm"
    for bad in ("..", "1.2/../../etc", "/etc", "1.2\\3"):
        with pytest.raises(InvalidUID):
            Archive.relative_path(bad, "1.2.3", "1.2.3.4")
        with pytest.raises(InvalidUID):
            Archive.relative_path("1.2", "1.2.3", bad)
    with pytest.raises(ValueError):
        Archive.relative_path("1.2", "1.2.3", "1.2.3.4", version="../x")
