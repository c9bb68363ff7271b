"""A key's judgement made again once a self-signature dated later counts, and written back:
readers.recheck_key, with keys made by gpg, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pysequoia
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.db import unit_of_work
from newsletter.db.models import ReaderKey, Subscriber
from newsletter.readers import recheck_key, set_key
from tests.gpg_keys import GpgHome, gpg_time


@pytest.fixture
def home(tmp_path: Path) -> Iterator[GpgHome]:
    gpg = GpgHome.make(tmp_path / "gnupg")
    yield gpg
    gpg.close()


def key_with_new_expiry(home: GpgHome, email: str, signed: datetime, expire: str) -> str:
    """The reader's key holding both its first self-signature and a new expiry dated `signed`."""
    fpr = home.generate(f"Reader <{email}>")
    home.add_key(fpr)
    before = pysequoia.Cert.from_bytes(home.export(fpr).encode())
    home.run("--faked-system-time", gpg_time(signed) + "!", "--quick-set-expire", fpr, expire)
    return str(before.merge(pysequoia.Cert.from_bytes(home.export(fpr).encode())))


def stored(factory: sessionmaker[Session], sid: int) -> ReaderKey:
    with factory() as session:
        return session.scalars(select(ReaderKey).where(ReaderKey.subscriber_id == sid)).one()


def test_a_recheck_writes_its_judgement_back(factory: sessionmaker[Session], home: GpgHome) -> None:
    """Two readers' keys each carry a new expiry signed two seconds ahead: two days for one,
    two seconds for the other. Once it counts, recheck_key stores the new expiry (or the key as
    expired from then) and clears recheck_at: the sender's next message takes the quick path."""
    now = datetime.now(UTC)
    later = now + timedelta(seconds=2)
    given = {
        "longer@example.org": key_with_new_expiry(home, "longer@example.org", later, "2d"),
        "shorter@example.org": key_with_new_expiry(home, "shorter@example.org", later, "seconds=2"),
    }
    ids = {}
    with unit_of_work(factory) as session:
        for email, armored in given.items():
            sub = Subscriber(email=email, created_at=now)
            session.add(sub)
            session.flush()
            set_key(session, subscriber_id=sub.id, data=armored, now=now, actor="t", confirmed=True)
            ids[email] = sub.id
    for sid in ids.values():
        row = stored(factory, sid)
        assert row.recheck_at is not None and abs((row.recheck_at - later).total_seconds()) < 2
        assert row.expires_at is not None and row.expires_at > now + timedelta(days=300)
    time.sleep(max(0.0, (later - datetime.now(UTC)).total_seconds()) + 4)

    checked = datetime.now(UTC).replace(microsecond=0)
    found = {}
    with unit_of_work(factory) as session:
        for email, sid in ids.items():
            row = stored(factory, sid)
            found[email] = recheck_key(
                session,
                subscriber_id=sid,
                fingerprint=row.fingerprint,
                armored=row.armored,
                email=email,
                now=checked,
            )
    assert found["longer@example.org"] is None
    longer = stored(factory, ids["longer@example.org"])
    assert longer.recheck_at is None and longer.expires_at is not None
    assert abs((longer.expires_at - later - timedelta(days=2)).total_seconds()) < 5
    problem = found["shorter@example.org"]
    assert problem is not None and problem.code == "expired"
    shorter = stored(factory, ids["shorter@example.org"])
    assert (shorter.expires_at, shorter.recheck_at) == (checked, None)

    with unit_of_work(factory) as session:  # a text no longer stored (replaced meanwhile)
        assert recheck_key(
            session,
            subscriber_id=ids["longer@example.org"],
            fingerprint=longer.fingerprint,
            armored=given["longer@example.org"],
            email="longer@example.org",
            now=checked + timedelta(days=3),
        )
    assert stored(factory, ids["longer@example.org"]).expires_at == longer.expires_at
