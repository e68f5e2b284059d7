"""Engines for SQLite (default, one machine) and PostgreSQL (several workers, one queue).

SQLite: WAL, a busy timeout, foreign keys on, and every transaction opened with
``BEGIN IMMEDIATE``, so that a transaction that reads and then writes cannot fail half way
with "database is locked" when another process wrote in between: writers queue on the busy
timeout instead. ``synchronous=FULL`` by default because an instance counts as stored only
once its row is durable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from storage.errors import DatabaseUnavailable, InvalidDatabaseURL

SUPPORTED = ("sqlite", "postgresql")
_SQLITE_SYNC = ("OFF", "NORMAL", "FULL", "EXTRA")


def parse_url(url: str | URL) -> URL:
    """Parse a database URL, raising :class:`InvalidDatabaseURL` with what to write instead."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidDatabaseURL(
            f"database URL {mask_url(url)!r} cannot be parsed; use sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DBNAME in [database] url"
        ) from None
    if parsed.get_backend_name() not in SUPPORTED:
        raise InvalidDatabaseURL(
            f"database URL {mask_url(parsed)!r}: engine {parsed.get_backend_name()!r} is not "
            "supported; use sqlite:///PATH or postgresql+psycopg://..."
        )
    return parsed


def mask_url(url: str | URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        text_url = str(url)
        # Unparseable: hide anything between "://user:" and "@" anyway.
        if "://" in text_url and "@" in text_url:
            scheme, rest = text_url.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
        return text_url


def create_storage_engine(url: str | URL, *, busy_timeout_s: float = 30.0,
                          connect_timeout_s: float = 10.0,
                          sqlite_synchronous: str = "FULL") -> Engine:
    """Create an engine with the pragmas and timeouts the store relies on; connects lazily."""
    parsed = parse_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if sqlite_synchronous.upper() not in _SQLITE_SYNC:
            raise ValueError(f"sqlite_synchronous must be one of {', '.join(_SQLITE_SYNC)}")
        _make_sqlite_parent(parsed)
        kwargs["connect_args"] = {"timeout": busy_timeout_s}
    else:
        kwargs["connect_args"] = {"connect_timeout": max(1, int(connect_timeout_s))}
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        raise InvalidDatabaseURL(
            f"database URL {mask_url(parsed)!r}: driver not available ({exc}); for PostgreSQL "
            "use postgresql+psycopg://... and install psycopg[binary] (pip install "
            "'dicomnode[postgres]')"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        _install_sqlite_events(engine, busy_timeout_s, sqlite_synchronous.upper())
    return engine


def _make_sqlite_parent(url: URL) -> None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailable(
            f"cannot create the directory for SQLite database {database}: {exc.strerror}; "
            "set [database] url or node.data_dir to a writable place"
        ) from None


def _install_sqlite_events(engine: Engine, busy_timeout_s: float, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module: we emit BEGIN ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def check_connection(engine: Engine) -> None:
    """Connect once, raising :class:`DatabaseUnavailable` with what to do when that fails."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        raise unavailable(engine.url, exc) from None


def unavailable(url: str | URL, exc: BaseException) -> DatabaseUnavailable:
    reason = str(getattr(exc, "orig", exc)).strip().splitlines()
    short = reason[0] if reason else type(exc).__name__
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        hint = "check that the file's directory exists and is writable, or fix [database] url"
    else:
        hint = ("check that the PostgreSQL server is running and reachable, and that the host, "
                "port, user, password and database in [database] url (or "
                "DICOMNODE_DATABASE_URL) are right")
    return DatabaseUnavailable(f"cannot connect to database {mask_url(url)}: {short}; {hint}")


def url_with_search_path(url: str | URL, schema: str) -> str:
    """A PostgreSQL URL whose connections use ``schema`` (for scratch schemas in tests/bench)."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError("search_path applies to PostgreSQL URLs only")
    return parsed.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False)
