"""Attempts counted per key in fixed windows, in the database so that every process agrees.

A key is a keyed hash (HMAC-SHA256 with [security] secret) of "kind:value", so the table never
holds an address or an email in the plain. Counting is one upsert, safe when two processes count
the same key at once (PostgreSQL and SQLite both have INSERT ... ON CONFLICT DO UPDATE).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from newsletter.db.models import RateLimit

WINDOW_SECONDS = 15 * 60
# prune() keeps windows that started less than this long ago: the longest window any caller uses.
KEEP_SECONDS = 24 * 3600


def limit_key(kind: str, value: str, *, secret: str) -> str:
    """The keyed hash that stands for "kind:value" in rate_limits."""
    return hmac.new(secret.encode(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def window_start(now: datetime, window_seconds: int) -> datetime:
    """The start of the fixed window `now` falls in (windows are aligned on the epoch)."""
    seconds = math.floor(now.timestamp())
    return datetime.fromtimestamp(seconds - seconds % window_seconds, UTC)


def attempts(session: Session, *, key: str, window_seconds: int, now: datetime) -> int:
    """How many attempts were counted for `key` in the current window."""
    count = session.scalar(
        select(RateLimit.count).where(
            RateLimit.key == key, RateLimit.window_start == window_start(now, window_seconds)
        )
    )
    return count or 0


def retry_after(
    session: Session, *, key: str, limit: int, window_seconds: int, now: datetime
) -> int:
    """Seconds until `key` may try again: 0 while under `limit` in the current window."""
    if attempts(session, key=key, window_seconds=window_seconds, now=now) < limit:
        return 0
    end = window_start(now, window_seconds) + timedelta(seconds=window_seconds)
    return max(1, math.ceil((end - now).total_seconds()))


def count_attempt(session: Session, *, key: str, window_seconds: int, now: datetime) -> None:
    """Count one more attempt for `key` in the current window (one race-safe upsert)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(RateLimit).values(
        key=key, window_start=window_start(now, window_seconds), count=1
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[RateLimit.key, RateLimit.window_start],
            set_={"count": RateLimit.count + 1},
        )
    )


def clear(session: Session, *, key: str) -> None:
    """Forget every window counted for `key` (e.g. after a successful sign-in)."""
    session.execute(delete(RateLimit).where(RateLimit.key == key))


def prune(session: Session, *, now: datetime, keep_seconds: int = KEEP_SECONDS) -> int:
    """Delete windows that started more than `keep_seconds` ago; returns how many."""
    cutoff = now - timedelta(seconds=keep_seconds)
    result = session.execute(delete(RateLimit).where(RateLimit.window_start < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)
