"""Attempts are counted per keyed hash in fixed 15-minute windows, race-safe, and pruned."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter import throttle
from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import RateLimit
from tests.conftest import SECRET

WINDOW = throttle.WINDOW_SECONDS


def test_key_is_a_keyed_hash_without_the_value() -> None:
    """The stored key names neither the kind nor the address, and depends on the secret."""
    key = throttle.limit_key("signin-client", "203.0.113.5", secret=SECRET)
    assert "203.0.113.5" not in key and len(key) == 64
    assert key != throttle.limit_key("signin-client", "203.0.113.5", secret=SECRET + "y")
    assert key != throttle.limit_key("signin-code", "203.0.113.5", secret=SECRET)


def test_retry_after_counts_up_to_the_limit_then_waits_for_the_window(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Under the limit: 0; at it: the seconds left in the window; a new window starts at 0."""
    key = throttle.limit_key("t", "v", secret=SECRET)
    with unit_of_work(factory) as session:
        for _ in range(3):
            assert (
                throttle.retry_after(
                    session, key=key, limit=3, window_seconds=WINDOW, now=clock.now()
                )
                == 0
            )
            throttle.count_attempt(session, key=key, window_seconds=WINDOW, now=clock.now())
        # 09:00:00 is a window start: the whole window is left.
        assert (
            throttle.retry_after(session, key=key, limit=3, window_seconds=WINDOW, now=clock.now())
            == WINDOW
        )
        clock.advance(minutes=10)
        assert (
            throttle.retry_after(session, key=key, limit=3, window_seconds=WINDOW, now=clock.now())
            == 300
        )
        clock.advance(minutes=5)
        assert (
            throttle.retry_after(session, key=key, limit=3, window_seconds=WINDOW, now=clock.now())
            == 0
        )
        throttle.clear(session, key=key)
        assert session.scalars(select(RateLimit)).all() == []


def test_concurrent_counts_are_not_lost(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """Twenty sessions counting the same key at once give twenty (the upsert is atomic)."""
    key = throttle.limit_key("t", "race", secret=SECRET)

    def one() -> None:
        for _ in range(50):
            try:
                with unit_of_work(factory) as session:
                    throttle.count_attempt(session, key=key, window_seconds=WINDOW, now=clock.now())
                return
            except Exception as e:  # SQLite: busy; PostgreSQL never needs this
                if "locked" not in str(e):
                    raise

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: one(), range(20)))
    with unit_of_work(factory) as session:
        assert throttle.attempts(session, key=key, window_seconds=WINDOW, now=clock.now()) == 20


def test_prune_deletes_only_old_windows(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """Windows older than a day go; the current one stays."""
    key = throttle.limit_key("t", "p", secret=SECRET)
    with unit_of_work(factory) as session:
        throttle.count_attempt(
            session, key=key, window_seconds=WINDOW, now=clock.now() - timedelta(days=2)
        )
        throttle.count_attempt(session, key=key, window_seconds=WINDOW, now=clock.now())
        assert throttle.prune(session, now=clock.now()) == 1
        assert throttle.attempts(session, key=key, window_seconds=WINDOW, now=clock.now()) == 1
