"""The database layer: migrations match the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from newsletter.db import make_engine, migrate
from newsletter.db.models import Base


def test_migrations_build_exactly_the_models(database_url: str) -> None:
    """After `migrate`, Alembic finds no difference between the schema and the models."""
    engine = make_engine(database_url)
    try:
        migrate(engine)
        migrate(engine)  # a second run is a no-op
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_url: str) -> None:
    """SQLite connections use WAL and enforce foreign keys."""
    engine = make_engine(sqlite_url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            assert conn.execute(text("pragma journal_mode")).scalar() == "wal"
            assert conn.execute(text("pragma foreign_keys")).scalar() == 1
        assert "deliveries" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
