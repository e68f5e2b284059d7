"""Fixtures and helpers shared by the storage tests (imported by tests/test_storage_*.py).

Every store test runs on SQLite and, with the ``postgres`` marker, on the PostgreSQL server
in $DICOMNODE_TEST_POSTGRES_URL, each test in a scratch schema dropped afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation, ExplicitVRLittleEndian

from storage import Store, migrate
from storage.testing import scratch_schema

ENGINES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]

T0 = datetime(2026, 1, 5, 9, 0, 0, tzinfo=UTC)
MG = DigitalMammographyXRayImageStorageForPresentation
EXPLICIT_LE = ExplicitVRLittleEndian


def at(seconds: float) -> datetime:
    """T0 plus ``seconds``: the stores' clock in the tests."""
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL with the schema at head, private to this test."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'dicomnode.db'}"
        migrate.upgrade(url)
        yield url
        return
    with scratch_schema(os.environ["DICOMNODE_TEST_POSTGRES_URL"], "dicomnode_test") as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def make_store(db_url: str, tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """Build stores on this test's database (closed at teardown)."""
    opened: list[Store] = []

    def factory(**kwargs: object) -> Store:
        store = Store(db_url, kwargs.pop("archive_dir", tmp_path / "archive"), **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    return make_store()


def instance_args(study: int = 1, series: int = 1, number: int = 1, *,
                  content: bytes | None = None, calling_ae: str = "PACS",
                  patient: str = "patient-key-1") -> dict:
    """Keyword arguments for Store.store_instance for a small synthetic instance."""
    study_uid = f"1.2.826.0.1.3680043.10.1.{study}"
    return dict(
        encoded=content if content is not None else f"DICM {study}.{series}.{number}".encode(),
        sop_instance_uid=f"{study_uid}.{series}.{number}",
        sop_class_uid=MG,
        study_uid=study_uid,
        series_uid=f"{study_uid}.{series}",
        transfer_syntax=EXPLICIT_LE,
        patient_key=patient,
        calling_ae=calling_ae,
        modality="MG",
        laterality="L",
        view="CC",
    )


def archive_files(root: Path) -> list[Path]:
    """Archived files (not the temporary directory)."""
    return sorted(p for p in root.rglob("*.dcm") if ".tmp" not in p.parts)
