"""Console sessions, kept in the database: revocable at once, idle and absolute expiry.

The cookie holds a random value; the table keeps only its sha256, so a leaked table gives no
working cookie. Every request re-reads the account: a disabled or reset account's sessions stop
working at once, whatever the cookie says.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_
from sqlalchemy.orm import Session

from newsletter.audit import record_event
from newsletter.config import Settings
from newsletter.db.models import Staff, StaffSession
from newsletter.staff import StaffView, end_sessions, hash_token, is_active, view_of

# StaffSession.client is String(64): an IPv6 address with a zone fits.
CLIENT_LENGTH = 64


@dataclass(frozen=True)
class SessionInfo:
    """A live session: who, its form token, and when it ends at the latest."""

    session_id: str
    staff: StaffView
    csrf_token: str
    expires_at: datetime


def _info(row: StaffSession, staff: Staff) -> SessionInfo:
    return SessionInfo(row.id, view_of(staff), row.csrf_token, row.expires_at)


def start_session(
    session: Session, *, staff_id: int, client: str, now: datetime, settings: Settings
) -> tuple[str, SessionInfo]:
    """A new session for a signed-in account: (cookie value, its info)."""
    staff = session.get(Staff, staff_id)
    if staff is None or not is_active(staff):
        raise ValueError(f"start_session: staff {staff_id} may not sign in")
    cookie = secrets.token_urlsafe(32)
    row = StaffSession(
        id=hash_token(cookie),
        staff_id=staff_id,
        csrf_token=secrets.token_urlsafe(32),
        client=client[:CLIENT_LENGTH],
        created_at=now,
        last_seen_at=now,
        expires_at=now + timedelta(hours=settings.console.max_hours),
    )
    session.add(row)
    session.flush()
    return cookie, _info(row, staff)


def _live(row: StaffSession | None, staff: Staff | None, now: datetime, idle: timedelta) -> bool:
    if row is None or staff is None or not is_active(staff):
        return False
    if staff.enrolled_at is not None and row.created_at < staff.enrolled_at:
        return False  # from before a reset and a new enrolment
    return row.revoked_at is None and now < row.expires_at and now - row.last_seen_at <= idle


def current_session(
    session: Session, *, cookie: str, now: datetime, settings: Settings, activity: bool = True
) -> SessionInfo | None:
    """The live session this cookie names, its last use moved to now by `activity`; else None.

    A page's own polling (live figures) is not activity: a console left open on a watch page
    must still go idle and sign itself out.
    """
    if not cookie:
        return None
    row = session.get(StaffSession, hash_token(cookie))
    staff = session.get(Staff, row.staff_id) if row is not None else None
    if not _live(row, staff, now, timedelta(minutes=settings.console.idle_minutes)):
        return None
    assert row is not None and staff is not None
    if activity:
        row.last_seen_at = now
    return _info(row, staff)


def end_session(session: Session, *, cookie: str, now: datetime) -> None:
    """Sign out: this session stops working at once."""
    row = session.get(StaffSession, hash_token(cookie)) if cookie else None
    if row is None or row.revoked_at is not None:
        return
    row.revoked_at = now
    staff = session.get(Staff, row.staff_id)
    actor = staff.email if staff is not None else "unknown"
    record_event(session, now=now, actor=actor, action="staff.signed_out", client=row.client)


def revoke_sessions(
    session: Session,
    *,
    staff_id: int | None,
    now: datetime,
    actor: str,
    except_session: str | None = None,
) -> int:
    """End one account's sessions (None: everyone's), maybe but one; returns how many."""
    staff = session.get(Staff, staff_id) if staff_id is not None else None
    ended = end_sessions(session, staff_id=staff_id, now=now, except_session=except_session)
    record_event(
        session,
        now=now,
        actor=actor,
        action="staff.sessions_revoked",
        staff=staff.email if staff is not None else "all" if staff_id is None else staff_id,
        sessions_ended=ended,
        kept_current=except_session is not None,
    )
    return ended


def prune_sessions(session: Session, *, now: datetime, settings: Settings) -> int:
    """Delete sessions that can no longer be used (past their end, revoked, or idle too long);
    the events keep who signed in and out. Returns how many."""
    idle_since = now - timedelta(minutes=settings.console.idle_minutes)
    result = session.execute(
        delete(StaffSession).where(
            or_(
                StaffSession.expires_at < now,
                StaffSession.revoked_at.is_not(None),
                StaffSession.last_seen_at < idle_since,
            )
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)
