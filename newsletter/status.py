"""`newsletter status`: what is scheduled next, what is sending, each source's last poll, and
the messages sent today (UTC day) by the recipients' provider."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.complaints import complaint_counts
from newsletter.config import Settings
from newsletter.db.models import Campaign, CampaignStatus
from newsletter.db.queries import delivery_counts
from newsletter.lock import lock_holder
from newsletter.metrics import ProviderDay, SourceState, provider_day, source_states
from newsletter.schedule import LOCK_NAME, digest_trigger

STALE_AFTER = timedelta(hours=1)  # a source not polled for this long is marked stale
UNFINISHED = (CampaignStatus.RUNNING, CampaignStatus.PAUSED, CampaignStatus.DRAFT)


@dataclass(frozen=True)
class ServiceStatus:
    scheduler: str  # who holds the scheduler lock, or "not running"
    next_digest: datetime | None
    poll_minutes: int
    campaigns: list[dict[str, Any]]  # id, kind, list, status, delivery counts, complaints
    sources: list[SourceState]
    now: datetime
    providers: ProviderDay  # messages sent today (UTC) by the recipients' provider

    def is_stale(self, source: SourceState) -> bool:
        """Whether a source's last successful poll is older than STALE_AFTER."""
        fetched = source.last_fetched_at
        return fetched is not None and self.now - fetched > STALE_AFTER

    def as_json(self) -> dict[str, Any]:
        """The report as `status --json` prints it."""
        return {
            "scheduler": self.scheduler,
            "next_digest": self.next_digest.isoformat() if self.next_digest else None,
            "next_poll_within_minutes": self.poll_minutes,
            "campaigns": self.campaigns,
            "sources": [
                {
                    "url": s.url,
                    "last_fetched_at": s.last_fetched_at.isoformat() if s.last_fetched_at else None,
                    "last_error": s.last_error,
                }
                for s in self.sources
            ],
            "providers_today": self.providers.as_json(),
        }


def service_status(session: Session, *, settings: Settings, now: datetime) -> ServiceStatus:
    """The service's state now: scheduler, next digest, unfinished campaigns, sources."""
    unfinished = list(session.scalars(select(Campaign).where(Campaign.status.in_(UNFINISHED))))
    complaints = complaint_counts(session, [c.id for c in unfinished])
    campaigns = [
        {
            "id": c.id,
            "kind": c.kind,
            "list": c.mailing_list.slug,
            "status": c.status,
            **delivery_counts(session, c.id),
            "complaints": complaints.get(c.id, 0),
            "pause_reason": c.pause_reason,
        }
        for c in unfinished
    ]
    return ServiceStatus(
        scheduler=lock_holder(session, LOCK_NAME) or "not running",
        next_digest=digest_trigger(settings).get_next_fire_time(None, now),
        poll_minutes=settings.schedule.poll_minutes,
        campaigns=campaigns,
        sources=source_states(session),
        now=now,
        providers=provider_day(session, now=now),
    )
