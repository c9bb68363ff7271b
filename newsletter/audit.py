"""The audit trail: one helper writes every event (who did what, when, with which details)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from newsletter.db.models import Event


def record_event(
    session: Session, *, now: datetime, actor: str, action: str, **detail: object
) -> Event:
    """Add one event to the session, not flushed (tests read action names and detail keys)."""
    event = Event(at=now, actor=actor, action=action, detail=dict(detail))
    session.add(event)
    return event
