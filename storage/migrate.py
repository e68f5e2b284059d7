"""Alembic migrations shipped inside the package, run programmatically.

Policy (see :class:`storage.Store`): a store refuses a database whose schema revision is not
this code's head, with a message to run ``dicomnode db upgrade``. The one exception is a
brand-new, empty SQLite database, which the store creates itself so that a single machine
needs no set-up step. PostgreSQL is never changed implicitly: several workers may start at
once, and schema changes there are the admin's decision.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from storage.engine import create_storage_engine, mask_url, parse_url, unavailable
from storage.errors import SchemaOutOfDate

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
VERSION_TABLE = "alembic_version"


def alembic_config() -> Config:
    """An Alembic Config pointing at the package's migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None, "storage/migrations has no revisions"
    return head


def known_revisions() -> set[str]:
    return {rev.revision for rev in _script().walk_revisions()}


def current_revision(engine: Engine) -> str | None:
    """The schema revision of the database (None: never migrated)."""
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise unavailable(engine.url, exc) from None


def is_empty(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            return not inspect(conn).get_table_names()
    except OperationalError as exc:
        raise unavailable(engine.url, exc) from None


def upgrade_engine(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade the database behind ``engine``; return (revision before, revision after)."""
    before = current_revision(engine)
    config = alembic_config()
    with _migration_lock(engine.url):
        try:
            with engine.begin() as conn:
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
        except OperationalError as exc:
            raise unavailable(engine.url, exc) from None
    return before, current_revision(engine) or ""


def upgrade(url: str | URL, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade the database at ``url`` to ``revision``; return (before, after)."""
    engine = create_storage_engine(url)
    try:
        return upgrade_engine(engine, revision)
    finally:
        engine.dispose()


def check_schema(engine: Engine, *, create_if_empty: bool) -> None:
    """Raise :class:`SchemaOutOfDate` unless the database is at head (or empty and created)."""
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return
    where = mask_url(engine.url)
    if current is None:
        if is_empty(engine):
            if create_if_empty:
                upgrade_engine(engine)
                return
            raise SchemaOutOfDate(f"database {where} has no dicomnode schema yet; run "
                                  "`dicomnode db upgrade` once to create it")
        raise SchemaOutOfDate(f"database {where} holds tables but no dicomnode schema "
                              "revision; point [database] url at an empty or dicomnode database")
    if current in known_revisions():
        raise SchemaOutOfDate(f"database {where} schema is at revision {current}, this dicomnode "
                              f"needs {head}; run `dicomnode db upgrade`")
    raise SchemaOutOfDate(f"database {where} schema revision {current} is newer than this "
                          f"dicomnode knows ({head}); upgrade dicomnode")


@contextmanager
def _migration_lock(url: URL) -> Iterator[None]:
    """Serialise migrations of one SQLite file between processes (PostgreSQL's DDL is
    transactional and the version row is written in the same transaction)."""
    parsed = parse_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
