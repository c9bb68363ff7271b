"""Console sessions: idle and absolute expiry on the injected clock, revocation, disabled staff."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Event, StaffSession
from newsletter.staff import disable_staff, reset_staff
from newsletter.staff_sessions import (
    SessionInfo,
    current_session,
    end_session,
    prune_sessions,
    revoke_sessions,
    start_session,
)
from tests.test_staff import enrol, settings_of


def start(factory: sessionmaker[Session], clock: FrozenClock, staff_id: int) -> str:
    with unit_of_work(factory) as session:
        cookie, info = start_session(
            session,
            staff_id=staff_id,
            client="198.51.100.7",
            now=clock.now(),
            settings=settings_of(factory),
        )
    assert info.expires_at == clock.now() + timedelta(hours=settings_of(factory).console.max_hours)
    return cookie


def current(factory: sessionmaker[Session], clock: FrozenClock, cookie: str) -> SessionInfo | None:
    with unit_of_work(factory) as session:
        return current_session(
            session, cookie=cookie, now=clock.now(), settings=settings_of(factory)
        )


def test_session_is_stored_as_a_hash_with_its_form_token(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """The table keeps the cookie's sha256, not the cookie; each session has its own csrf token."""
    who = enrol(factory, clock)
    one, two = start(factory, clock, who.id), start(factory, clock, who.id)
    info = current(factory, clock, one)
    assert info is not None and info.staff.email == who.email
    with unit_of_work(factory) as session:
        rows = session.scalars(select(StaffSession)).all()
        assert {r.id for r in rows} == {info.session_id, current(factory, clock, two).session_id}  # type: ignore[union-attr]
        assert one not in {r.id for r in rows} and rows[0].client == "198.51.100.7"
        assert len({r.csrf_token for r in rows}) == 2
    assert current(factory, clock, "not-a-cookie") is None and current(factory, clock, "") is None


def test_idle_timeout_and_use_keeps_it_alive(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Each request moves last use on; idle_minutes without one ends the session."""
    who = enrol(factory, clock)
    idle = settings_of(factory).console.idle_minutes
    cookie = start(factory, clock, who.id)
    for _ in range(3):
        clock.advance(minutes=idle - 1)
        assert current(factory, clock, cookie) is not None
    clock.advance(minutes=idle, seconds=1)
    assert current(factory, clock, cookie) is None


def test_absolute_lifetime_ends_even_a_busy_session(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """However often it is used, a session ends max_hours after sign-in."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    cookie = start(factory, clock, who.id)
    info = current(factory, clock, cookie)
    assert info is not None
    for _ in range(settings.console.max_hours * 60 // 20 - 1):
        clock.advance(minutes=20)
        assert current(factory, clock, cookie) is not None
    clock.advance(minutes=20)
    assert clock.now() >= info.expires_at and current(factory, clock, cookie) is None


def test_sign_out_and_revoke_one_or_all(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """Sign-out ends one session; revoking an account's or everyone's ends them, maybe but one."""
    ola = enrol(factory, clock)
    ana = enrol(factory, clock, email="ana@example.org")
    a1, a2, a3 = (start(factory, clock, ola.id) for _ in range(3))
    b1 = start(factory, clock, ana.id)
    with unit_of_work(factory) as session:
        end_session(session, cookie=a1, now=clock.now())
    assert current(factory, clock, a1) is None and current(factory, clock, a2) is not None
    keep = current(factory, clock, a2)
    assert keep is not None
    with unit_of_work(factory) as session:
        n = revoke_sessions(
            session,
            staff_id=ola.id,
            now=clock.now(),
            actor=ola.email,
            except_session=keep.session_id,
        )
    assert (
        n == 1 and current(factory, clock, a3) is None and current(factory, clock, a2) is not None
    )
    assert current(factory, clock, b1) is not None
    with unit_of_work(factory) as session:
        assert revoke_sessions(session, staff_id=None, now=clock.now(), actor="cli:t") == 2
    assert current(factory, clock, a2) is None and current(factory, clock, b1) is None
    with unit_of_work(factory) as session:
        events = session.scalars(
            select(Event).where(Event.action.in_(["staff.signed_out", "staff.sessions_revoked"]))
        ).all()
        assert [(e.action, e.detail.get("sessions_ended")) for e in events] == [
            ("staff.signed_out", None),
            ("staff.sessions_revoked", 1),
            ("staff.sessions_revoked", 2),
        ]


def test_disabled_or_reset_account_loses_its_live_session_at_once(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Disable or reset: the very next request with a live cookie is refused."""
    ola = enrol(factory, clock)
    ana = enrol(factory, clock, email="ana@example.org")
    cookies = start(factory, clock, ola.id), start(factory, clock, ana.id)
    with unit_of_work(factory) as session:
        disable_staff(session, email=ola.email, now=clock.now(), actor="cli:t")
        reset_staff(
            session, email=ana.email, now=clock.now(), actor="cli:t", settings=settings_of(factory)
        )
    assert [current(factory, clock, c) for c in cookies] == [None, None]


def test_disabled_account_refused_even_if_its_sessions_were_not_revoked(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """current_session reads the account on every request, not only the session row."""
    ola = enrol(factory, clock)
    cookie = start(factory, clock, ola.id)
    with unit_of_work(factory) as session:
        disable_staff(session, email=ola.email, now=clock.now(), actor="cli:t")
        for row in session.scalars(select(StaffSession)):
            row.revoked_at = None  # as if revocation had been missed
    assert current(factory, clock, cookie) is None


def test_prune_deletes_only_sessions_that_can_no_longer_be_used(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Idle, revoked and ended sessions go; a live one stays and still works."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    idle = start(factory, clock, who.id)
    revoked = start(factory, clock, who.id)
    with unit_of_work(factory) as session:
        end_session(session, cookie=revoked, now=clock.now())
    clock.advance(minutes=settings.console.idle_minutes - 5)
    live = start(factory, clock, who.id)
    clock.advance(minutes=10)  # `idle` has now been idle too long; `live` has not
    with unit_of_work(factory) as session:
        assert prune_sessions(session, now=clock.now(), settings=settings) == 2
    with unit_of_work(factory) as session:
        assert session.query(StaffSession).count() == 1
    assert current(factory, clock, live) is not None and current(factory, clock, idle) is None
