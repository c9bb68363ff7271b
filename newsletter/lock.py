"""A named lease in the database, so only one process schedules at a time.

The holder renews the lease well before it ends; if its machine dies, the lease runs out and
another process takes over. This works the same on SQLite and PostgreSQL, and a lost holder is
noticed after `seconds` whatever the network does (a session-level PostgreSQL advisory lock is
only released when the server notices the dead TCP connection, which can take much longer).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from newsletter.db.models import ServiceLock


def acquire_lock(session: Session, *, name: str, holder: str, now: datetime, seconds: int) -> bool:
    """Take or renew the lease `name` for `holder`; False while another holder's lease runs."""
    expires = now + timedelta(seconds=seconds)
    taken = session.execute(
        update(ServiceLock)
        .where(
            ServiceLock.name == name,
            or_(ServiceLock.holder == holder, ServiceLock.expires_at < now),
        )
        .values(holder=holder, expires_at=expires)
        .returning(ServiceLock.name)
        .execution_options(synchronize_session=False)
    ).scalar()
    if taken is not None:
        return True
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(
        insert(ServiceLock)
        .values(name=name, holder=holder, expires_at=expires)
        .on_conflict_do_nothing()
    )
    return lock_holder(session, name) == holder


def lock_holder(session: Session, name: str) -> str | None:
    """Who holds the lease now (expired or not)."""
    return session.scalar(select(ServiceLock.holder).where(ServiceLock.name == name))


def release_lock(session: Session, *, name: str, holder: str) -> None:
    """Give the lease up at once, so another process need not wait for it to run out."""
    session.execute(
        delete(ServiceLock).where(ServiceLock.name == name, ServiceLock.holder == holder)
    )
