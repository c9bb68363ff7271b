"""The audit trail: one helper writes every event (who did what, when, with which details).

An edge may say where the request came from for everything recorded while it runs
(`recorded_from`): the console sets the client address once per request, so every event its
pages cause (a draft, an approval, a pause) names it without each step taking a parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime

from sqlalchemy.orm import Session

from newsletter.db.models import Event

# A context variable, not a global: each request (and the worker thread it runs steps in, which
# gets a copy of the request's context) sees only its own origin.
_ORIGIN: ContextVar[dict[str, str] | None] = ContextVar("audit_origin", default=None)


@contextmanager
def recorded_from(**origin: str) -> Iterator[None]:
    """Add these details (e.g. client="203.0.113.5") to every event recorded inside the block."""
    token = _ORIGIN.set(origin)
    try:
        yield
    finally:
        _ORIGIN.reset(token)


def record_event(
    session: Session, *, now: datetime, actor: str, action: str, **detail: object
) -> Event:
    """Add one event to the session, not flushed (tests read action names and detail keys)."""
    event = Event(at=now, actor=actor, action=action, detail={**(_ORIGIN.get() or {}), **detail})
    session.add(event)
    return event
