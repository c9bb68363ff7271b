"""A named lease in the database, so only one process schedules at a time.

The holder renews the lease well before it ends; if its machine dies, the lease runs out and
another process takes over. This works the same on SQLite and PostgreSQL, and a lost holder is
noticed after `seconds` whatever the network does (a session-level PostgreSQL advisory lock is
only released when the server notices the dead TCP connection, which can take much longer).

Every lease in the database (this one, and the sender's claims) is written and read by the
clock of the machine that runs the command, so machines sharing a PostgreSQL database must
agree on the time: `check_clock` refuses to start a sender or the service on a machine whose
clock is off by more than a quarter of the shortest lease, where it would take over another
machine's claims while they are still being sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import ServiceLock
from newsletter.errors import ConfigError


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


def clock_skew(session: Session, *, local: Callable[[], float] = time.time) -> float | None:
    """How many seconds this machine's clock is ahead of the database server's (behind: less
    than 0); None on SQLite, whose clock is this machine's."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    before = local()
    server = session.scalar(text("SELECT EXTRACT(EPOCH FROM clock_timestamp())"))
    after = local()
    return (before + after) / 2 - float(server)


def check_clock(
    factory: sessionmaker[Session], settings: Settings, *, local: Callable[[], float] = time.time
) -> None:
    """Refuse (ConfigError) a machine whose clock is too far from the database server's."""
    allowed = min(settings.smtp.lease_seconds, settings.schedule.lock_seconds) / 4
    with unit_of_work(factory) as session:
        skew = clock_skew(session, local=local)
    if skew is not None and abs(skew) > allowed:
        way = "ahead of" if skew > 0 else "behind"
        raise ConfigError(
            f"this machine's clock is {abs(skew):.1f} s {way} the database server's (at most"
            f" {allowed:g} s allowed, a quarter of the shortest lease): set the time right"
            " (NTP) and start again"
        )
