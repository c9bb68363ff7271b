"""readers.py's rules for keys, on SQLite and PostgreSQL with keys made by gpg: an admin's
removal stays on record, a reader's own revocation is learnt, and no event names a key."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.db import unit_of_work
from newsletter.db.models import Event, ReaderKey, Subscriber
from newsletter.openpgp import KeyProblem
from newsletter.readers import confirm_key, key_view, remove_key, set_key
from tests.gpg_keys import GpgHome

EMAIL = "reader@example.org"
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[GpgHome]:
    gpg = GpgHome.make(tmp_path / "gnupg")
    yield gpg
    gpg.close()


def new_key(home: GpgHome, label: str) -> tuple[str, str]:
    fpr = home.generate(f"{label} <{EMAIL}>")
    home.add_key(fpr)
    return fpr, home.export(fpr)


def reader(factory: sessionmaker[Session]) -> int:
    with unit_of_work(factory) as session:
        sub = Subscriber(email=EMAIL, created_at=NOW)
        session.add(sub)
        session.flush()
        return sub.id


def rows(factory: sessionmaker[Session], sid: int) -> list[tuple[str, str]]:
    with factory() as session:
        found = session.execute(
            select(ReaderKey.status, ReaderKey.fingerprint).where(ReaderKey.subscriber_id == sid)
        )
        return sorted((str(s), f) for s, f in found)


def test_an_admin_removal_stays_on_record_whatever_follows(
    factory: sessionmaker[Session], home: GpgHome
) -> None:
    """Removed by an admin, then a new key given (pending) and removed again by an admin: the
    removed mark stays (on_key_problem still applies); the reader's own removal clears all."""
    sid = reader(factory)
    first, first_key = new_key(home, "One")
    second, second_key = new_key(home, "Two")
    with unit_of_work(factory) as session:
        set_key(session, subscriber_id=sid, data=first_key, now=NOW, actor="t", confirmed=True)
        assert remove_key(session, subscriber_id=sid, now=NOW, actor="t", by_reader=False)
        set_key(session, subscriber_id=sid, data=second_key, now=NOW, actor="t")
    assert rows(factory, sid) == sorted([("removed", first), ("pending", second)])
    with unit_of_work(factory) as session:
        assert remove_key(session, subscriber_id=sid, now=NOW, actor="t", by_reader=False)
        assert not remove_key(session, subscriber_id=sid, now=NOW, actor="t", by_reader=False)
        assert key_view(session, sid).removed
    assert rows(factory, sid) == [("removed", first)]
    with unit_of_work(factory) as session:
        assert remove_key(session, subscriber_id=sid, now=NOW, actor="t", by_reader=True)
    assert rows(factory, sid) == []


def test_the_revocation_of_ones_own_key_is_learnt_and_names_no_key_in_events(
    factory: sessionmaker[Session], home: GpgHome
) -> None:
    """The active key pasted with its revocation: marked revoked (never used again), a pending
    key with it dropped; another reader's revoked key is refused; no event holds a fingerprint."""
    sid = reader(factory)
    fpr, armored = new_key(home, "Mine")
    with unit_of_work(factory) as session:
        set_key(session, subscriber_id=sid, data=armored, now=NOW, actor="t")
        confirm_key(session, subscriber_id=sid, fingerprint=fpr, now=NOW)
    home.revoke(fpr)
    revoked = home.export(fpr)
    with unit_of_work(factory) as session:
        info = set_key(session, subscriber_id=sid, data=revoked, now=NOW, actor="t")
    assert info.revoked and info.fingerprint == fpr
    assert rows(factory, sid) == [("revoked", fpr)]
    with unit_of_work(factory) as session:
        view = key_view(session, sid)
        assert view.revoked_fingerprint == fpr and not view.active_fingerprint
        other = Subscriber(email="other@example.org", created_at=NOW)
        session.add(other)
        session.flush()
        with pytest.raises(KeyProblem) as refused:
            set_key(session, subscriber_id=other.id, data=revoked, now=NOW, actor="t")
        assert refused.value.code == "revoked"
    with factory() as session:
        details = [str(e.detail) for e in session.scalars(select(Event))]
    assert details and not any(fpr in d or fpr.lower() in d for d in details)


def test_the_same_key_given_again_is_updated_or_learnt_unusable(
    factory: sessionmaker[Session], home: GpgHome
) -> None:
    """The active key with a new encryption subkey replaces the stored one at once (no new
    proof); the active key whose encryption subkeys are all revoked is learnt unusable."""
    sid = reader(factory)
    fpr, armored = new_key(home, "Mine")
    with unit_of_work(factory) as session:
        set_key(session, subscriber_id=sid, data=armored, now=NOW, actor="t", confirmed=True)
    home.add_key(fpr)  # a second encryption subkey
    newer = home.export(fpr)
    with unit_of_work(factory) as session:
        info = set_key(session, subscriber_id=sid, data=newer, now=NOW, actor="t")
        assert not info.revoked
    with factory() as session:
        [row] = session.scalars(select(ReaderKey).where(ReaderKey.subscriber_id == sid))
        assert (row.status, row.fingerprint, row.armored) == ("active", fpr, info.armored)
    home.revoke_subkey(fpr, 1)
    home.revoke_subkey(fpr, 2)
    with unit_of_work(factory) as session:
        learnt = set_key(session, subscriber_id=sid, data=home.export(fpr), now=NOW, actor="t")
    assert learnt.revoked
    assert rows(factory, sid) == [("revoked", fpr)]
