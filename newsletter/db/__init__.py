"""Engine, sessions, transactions and migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from newsletter.errors import DatabaseError

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str, *, busy_timeout: float = 30.0) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout (seconds).

    hide_parameters: an error's text never carries the statement's values (subscribers' data).
    """
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    try:
        if url.startswith("sqlite"):
            engine = create_engine(
                url, connect_args={"timeout": busy_timeout}, hide_parameters=True
            )
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "savepoint", _sqlite_savepoint)
        else:
            engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
    except (SQLAlchemyError, ImportError, ValueError) as e:
        raise DatabaseError(f"cannot use database URL {_redact(url)}: {e}") from e
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_savepoint(conn: Connection, _name: str | None) -> None:
    """A savepoint that would open the transaction takes the write lock first (BEGIN IMMEDIATE).

    The sqlite3 module opens a transaction only before a write, so a plain unit of work reads
    outside one and then waits (busy timeout) for the lock. But SQLite's SAVEPOINT opens a
    deferred transaction at once: its first read pins a snapshot, and if another connection
    (the sender's ledger, say) commits before its first write, that write fails at once with
    "database is locked", since no waiting makes a stale snapshot current. Savepoints guard
    writes here (an import chunk, a case number), so taking the lock first costs nothing.
    """
    dbapi_connection = conn.connection.dbapi_connection
    if dbapi_connection is not None and not dbapi_connection.in_transaction:
        dbapi_connection.execute("BEGIN IMMEDIATE")


def _redact(url: str) -> str:
    """Hide a password in a database URL before it is shown."""
    head, sep, tail = url.rpartition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, creds = head.partition("//")
    return f"{scheme}//{creds.split(':', 1)[0]}:***@{tail}"


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit if the block succeeds, roll back if it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as e:
        raise DatabaseError(f"cannot migrate {_redact(str(engine.url))}: {e}") from e


def head_revision() -> str:
    """The newest migration's revision, read from its file: the file that sorts last in
    versions/ (their names start with a running number; tests/test_migrations.py checks that it
    is Alembic's head). Alembic would import itself, Mako and every migration to say so: a
    sixth of a command's start."""
    newest = max((MIGRATIONS / "versions").glob("[0-9]*.py"))
    for line in newest.read_text(encoding="utf-8").splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "revision":
            return value.strip().strip("\"'")
    raise DatabaseError(f"no revision in {newest.name}")


def check_schema(engine: Engine) -> None:
    """Refuse to work on a database that `newsletter init` has not brought up to date."""
    head = head_revision()
    try:
        with engine.connect() as connection:
            current = None
            if inspect(connection).has_table("alembic_version"):
                current = connection.scalar(text("SELECT version_num FROM alembic_version"))
    except SQLAlchemyError as e:
        raise DatabaseError(f"cannot open database {_redact(str(engine.url))}: {e}") from e
    if current != head:
        state = "is not initialised" if current is None else f"is at revision {current}"
        raise DatabaseError(f"the database {state}: run `newsletter init`")
