"""Bad input and a hostile environment give named errors that say what to do: invalid UIDs,
unusable database URLs, full disks, a schema that does not match, a locked SQLite file."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text

from storage import Store, migrate
from storage import tables as m
from storage.engine import create_storage_engine
from storage.errors import (
    DatabaseBusy,
    DatabaseUnavailable,
    InsufficientStorage,
    InvalidDatabaseURL,
    InvalidUID,
    SchemaOutOfDate,
    StorageError,
)
from storage.testing import scratch_schema
from tests.support import storage as support
from tests.support.storage import archive_files, instance_args

db_url, make_store, store = support.db_url, support.make_store, support.store  # fixtures

UID_FIELDS = {
    "sop_instance_uid": "SOP Instance UID", "sop_class_uid": "SOP Class UID",
    "study_uid": "Study Instance UID", "series_uid": "Series Instance UID",
    "transfer_syntax": "Transfer Syntax UID",
}


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1.2.03", "1" * 65])
@pytest.mark.parametrize("field", list(UID_FIELDS))
def test_invalid_uid_never_reaches_the_disk(store: Store, tmp_path: Path, field: str,
                                            bad: str) -> None:
    with pytest.raises(InvalidUID) as info:
        store.store_instance(**{**instance_args(), field: bad})
    assert UID_FIELDS[field] in str(info.value)
    assert list((tmp_path / "archive").rglob("*")) == [tmp_path / "archive" / ".tmp"]
    with store.engine.connect() as conn:
        assert conn.execute(select(m.Instance.id)).all() == []


def test_unreachable_postgres_is_named_and_masks_the_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg://dicomnode:s3cret@127.0.0.1:1/dicomnode"
    with pytest.raises(DatabaseUnavailable) as info:
        Store(url, tmp_path / "archive", connect_timeout_s=2)
    message = str(info.value)
    assert "s3cret" not in message and "127.0.0.1:1" in message
    assert "check that the PostgreSQL server is running" in message


def test_unusable_sqlite_location(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DatabaseUnavailable, match="writable"):
        Store(f"sqlite:///{blocker}/sub/db.sqlite", tmp_path / "archive")


@pytest.mark.parametrize("url, fix", [
    ("not a url", "sqlite:///PATH"),
    ("mysql://root@localhost/db", "not supported"),
    ("postgresql+nosuchdriver://u@localhost/db", "psycopg"),
])
def test_bad_database_urls_are_configuration_errors(tmp_path: Path, url: str, fix: str) -> None:
    with pytest.raises(InvalidDatabaseURL, match=fix) as info:
        Store(url, tmp_path / "archive")
    assert info.value.exit_code == 2


def test_watermark_refuses_received_data_but_not_results(make_store, tmp_path: Path) -> None:
    store = make_store()
    store.store_instance(**instance_args(number=1))
    store.archive.min_free_bytes = store.archive.free_bytes() + 2**40
    with pytest.raises(InsufficientStorage) as info:
        store.store_instance(**instance_args(number=2))
    assert "storage.min_free_mb" in str(info.value) and info.value.free_bytes is not None
    assert len(archive_files(tmp_path / "archive")) == 1
    assert len(store.study_instances(instance_args()["study_uid"])) == 1
    study = instance_args()["study_uid"]
    store.store_result(encoded=b"SR", sop_instance_uid=f"{study}.9.1", sop_class_uid="1.2.3",
                       study_uid=study, series_uid=f"{study}.9", transfer_syntax="1.2.3",
                       kind="sr")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full disk (ENOSPC), not a simulated one."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount permission): "
                    f"{done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_is_insufficient_storage(small_disk: Path, tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", small_disk / "archive")
    try:
        big = b"x" * (3 << 20)
        # Size known in advance: refused before writing.
        with pytest.raises(InsufficientStorage, match="free disk space"):
            store.store_instance(**instance_args(number=1, content=big))
        # Size unknown (a stream): the disk fills up during the write.
        with pytest.raises(InsufficientStorage, match="is full") as info:
            store.store_instance(**{**instance_args(number=2), "encoded": io.BytesIO(big)})
        assert isinstance(info.value, StorageError)
        assert list((small_disk / "archive").rglob("*.part")) == []   # no partial file left
        with store.engine.connect() as conn:
            assert conn.execute(select(m.Instance.id)).all() == []
        # Space is back once the partial file is gone: small instances still go in.
        assert store.store_instance(**instance_args(number=3)).path.exists()
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_without_schema_says_run_db_upgrade(tmp_path: Path) -> None:
    with scratch_schema(os.environ["DICOMNODE_TEST_POSTGRES_URL"], "dicomnode_test") as url:
        with pytest.raises(SchemaOutOfDate, match="run `dicomnode db upgrade`"):
            Store(url, tmp_path / "archive")
        assert migrate.upgrade(url) == (None, migrate.head_revision())
        Store(url, tmp_path / "archive").close()


def test_fresh_sqlite_is_created_and_foreign_revision_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'db.sqlite'}"
    Store(url, tmp_path / "archive").close()
    engine = create_storage_engine(url)
    try:
        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    finally:
        engine.dispose()
    with pytest.raises(SchemaOutOfDate, match="newer than this dicomnode"):
        Store(url, tmp_path / "archive")


def test_sqlite_with_foreign_tables_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE something_else (id INTEGER)")
    with pytest.raises(SchemaOutOfDate, match="no dicomnode schema revision"):
        Store(f"sqlite:///{path}", tmp_path / "archive")


def test_sqlite_locked_too_long_is_database_busy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url, tmp_path / "archive", busy_timeout_s=0.2)
    blocker = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(DatabaseBusy, match="busy timeout"):
            store.store_instance(**instance_args())
    finally:
        blocker.close()
        store.close()
