"""Machines that share a database must agree on the time: leases are read by each one's clock."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session, sessionmaker

from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.errors import ConfigError
from newsletter.lock import check_clock, clock_skew


def _ahead(seconds: float) -> Callable[[], float]:
    return lambda: time.time() + seconds


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("offset", [0.0, 120.0, -45.0])
def test_the_skew_to_postgresql_is_read_within_a_second(
    factory: sessionmaker[Session], offset: float
) -> None:
    with unit_of_work(factory) as session:
        skew = clock_skew(session, local=_ahead(offset))
    assert skew is not None and abs(skew - offset) < 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_has_no_other_clock(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        assert clock_skew(session, local=_ahead(3600)) is None
    check_clock(factory, Settings(), local=_ahead(3600))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_clock_off_by_more_than_a_quarter_lease_is_refused_in_one_line(
    factory: sessionmaker[Session],
) -> None:
    settings = Settings()  # leases of 60 s: 15 s allowed
    check_clock(factory, settings, local=_ahead(5))
    check_clock(factory, settings, local=_ahead(-5))
    with pytest.raises(ConfigError) as ahead:
        check_clock(factory, settings, local=_ahead(40))
    assert "s ahead of the database server's (at most 15 s allowed" in str(ahead.value)
    assert "\n" not in str(ahead.value)
    with pytest.raises(ConfigError, match="s behind the database server's"):
        check_clock(factory, settings, local=_ahead(-40))
