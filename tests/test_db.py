"""The database layer: migrations match the models, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work
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


def test_a_transaction_a_savepoint_opens_on_sqlite_waits_for_the_lock_instead_of_failing(
    sqlite_url: str,
) -> None:
    """A savepoint (begin_nested) opens the transaction, it reads, another connection commits a
    write, then it writes. Opened as a plain deferred transaction, its read would pin a snapshot
    that the other commit made stale, and its write would fail at once with "database is
    locked" (the busy timeout cannot help a stale snapshot). It takes the write lock first
    instead: the other writer waits for it, and both writes land."""
    engine, other = make_engine(sqlite_url), make_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("create table t (x integer)"))
        factory = make_sessionmaker(engine)
        with unit_of_work(factory) as session, session.begin_nested():
            assert session.execute(text("select count(*) from t")).scalar() == 0
            writer = threading.Thread(target=_insert, args=(other, 1))
            writer.start()
            writer.join(timeout=0.5)  # it waits for our write lock (or is done, before)
            session.execute(text("insert into t values (2)"))
        writer.join(timeout=30)
        assert not writer.is_alive()
        with engine.connect() as conn:
            assert sorted(conn.execute(text("select x from t")).scalars()) == [1, 2]
    finally:
        engine.dispose()
        other.dispose()


def _insert(engine: Engine, value: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("insert into t values (:x)"), {"x": value})
