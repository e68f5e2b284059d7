"""The hand-written Alembic migrations produce exactly the schema the models describe."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from storage import migrate
from storage.engine import create_storage_engine
from storage.tables import Base
from tests.support import storage as support

db_url = support.db_url  # fixture: schema already upgraded to head


def test_migrated_schema_matches_models(db_url: str) -> None:
    engine = create_storage_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert context.get_current_revision() == migrate.head_revision()
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_downgrade_works(db_url: str) -> None:
    head = migrate.head_revision()
    assert migrate.upgrade(db_url) == (head, head)
    engine = create_storage_engine(db_url)
    try:
        config = migrate.alembic_config()
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    assert migrate.upgrade(db_url) == (None, head)


def test_migrations_ship_inside_the_package() -> None:
    assert (migrate.MIGRATIONS_DIR / "env.py").is_file()
    assert (migrate.MIGRATIONS_DIR / "script.py.mako").is_file()
    assert migrate.MIGRATIONS_DIR.parent.name == "storage"
    assert migrate.known_revisions() == {"0001", "0002"}
