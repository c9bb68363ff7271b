"""The console's read queries: the lists and segments to choose from, progress, failures, events.

Each reads only what its page shows; subscriber addresses are read for admins alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from newsletter.db.models import (
    Campaign,
    CampaignStatus,
    Delivery,
    DeliveryStatus,
    Event,
    MailingList,
    Segment,
    Subscriber,
)
from newsletter.db.queries import delivery_counts

RATE_WINDOW = timedelta(minutes=5)  # the send rate is what went out in the last five minutes
PENDING = ("queued", "claimed", "deferred")
FAILURES_SHOWN = 100


@dataclass(frozen=True)
class Progress:
    """A campaign's figures as the dashboard and the watch page show them."""

    id: int
    kind: str
    title: str
    list_slug: str
    status: str
    counts: dict[str, int]
    per_minute: float
    seconds_left: int | None
    training: bool

    @property
    def total(self) -> int:
        """Every delivery of the campaign."""
        return sum(self.counts.values())

    @property
    def pending(self) -> int:
        """Deliveries not yet sent or failed for good."""
        return sum(self.counts.get(s, 0) for s in PENDING)

    def as_json(self) -> dict[str, Any]:
        """The figures /api/progress sends."""
        return {
            "id": self.id,
            "status": self.status,
            "counts": {s: self.counts.get(s, 0) for s in ("sent", *PENDING, "failed")},
            "total": self.total,
            "per_minute": round(self.per_minute, 1),
            "seconds_left": self.seconds_left,
        }


@dataclass(frozen=True)
class Failure:
    """One failed delivery: the relay's reply, and the address for admins only."""

    delivery_id: int
    reply: str
    relay: str
    attempts: int
    email: str | None


def mailing_lists(session: Session) -> list[MailingList]:
    """Every list, by slug."""
    return list(session.scalars(select(MailingList).order_by(MailingList.slug)))


def segment_names(session: Session) -> list[str]:
    """Every segment's name, sorted."""
    return list(session.scalars(select(Segment.name).order_by(Segment.name)))


def campaign_progress(session: Session, campaign: Campaign, *, now: datetime) -> Progress:
    """One campaign's delivery counts, send rate and time left at that rate."""
    counts = delivery_counts(session, campaign.id)
    recent = session.scalar(
        select(func.count())
        .select_from(Delivery)
        .where(
            Delivery.campaign_id == campaign.id,
            Delivery.status == DeliveryStatus.SENT,
            Delivery.sent_at >= now - RATE_WINDOW,
        )
    )
    per_minute = int(recent or 0) / (RATE_WINDOW.total_seconds() / 60)
    pending = sum(counts.get(s, 0) for s in PENDING)
    left = round(pending / per_minute * 60) if per_minute and pending else None
    return Progress(
        id=campaign.id,
        kind=campaign.kind,
        title=campaign.title,
        list_slug=campaign.mailing_list.slug,
        status=campaign.status,
        counts=counts,
        per_minute=per_minute,
        seconds_left=left,
        training=campaign.training,
    )


def campaigns_in(
    session: Session, statuses: tuple[str, ...], *, now: datetime, limit: int = 20
) -> list[Progress]:
    """The newest campaigns in these statuses, with their progress."""
    rows = session.scalars(
        select(Campaign)
        .where(Campaign.status.in_(statuses))
        .order_by(Campaign.id.desc())
        .limit(limit)
    )
    return [campaign_progress(session, c, now=now) for c in rows]


def sending(session: Session, *, now: datetime) -> list[Progress]:
    """The campaigns sending or paused."""
    return campaigns_in(session, (CampaignStatus.RUNNING, CampaignStatus.PAUSED), now=now)


def finished(session: Session, *, now: datetime, limit: int = 10) -> list[Progress]:
    """The last campaigns finished or cancelled."""
    return campaigns_in(
        session, (CampaignStatus.FINISHED, CampaignStatus.CANCELLED), now=now, limit=limit
    )


def failures(session: Session, campaign_id: int, *, with_addresses: bool) -> list[Failure]:
    """A campaign's failed deliveries (the first FAILURES_SHOWN), addresses only when asked."""
    stmt = (
        select(Delivery, Subscriber.email)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.campaign_id == campaign_id, Delivery.status == DeliveryStatus.FAILED)
        .order_by(Delivery.id)
        .limit(FAILURES_SHOWN)
    )
    return [
        Failure(
            d.id, d.last_reply or "", d.relay or "", d.attempts, email if with_addresses else None
        )
        for d, email in session.execute(stmt)
    ]


def events_page(session: Session, *, page: int, size: int) -> tuple[list[Event], bool]:
    """One page of the audit log, newest first, and whether an older page follows."""
    rows = list(
        session.scalars(select(Event).order_by(Event.id.desc()).offset(page * size).limit(size + 1))
    )
    return rows[:size], len(rows) > size


def all_events(session: Session, *, after: int, size: int) -> list[Event]:
    """The next events in id order after `after`, for the CSV export in batches."""
    return list(
        session.scalars(select(Event).where(Event.id > after).order_by(Event.id).limit(size))
    )
