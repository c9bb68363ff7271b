"""What the running service reports: Prometheus text for /metrics, a summary for `status`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from newsletter.db.models import (
    Campaign,
    CampaignStatus,
    Delivery,
    DeliveryStatus,
    Source,
    Subscriber,
)
from newsletter.db.queries import PENDING_STATUSES, delivery_counts


@dataclass(frozen=True)
class SourceState:
    url: str
    last_fetched_at: datetime | None
    last_error: str | None


def delivery_totals(session: Session) -> dict[tuple[str, str], int]:
    """Deliveries by (campaign kind, status)."""
    stmt = (
        select(Campaign.kind, Delivery.status, func.count())
        .join(Campaign, Campaign.id == Delivery.campaign_id)
        .group_by(Campaign.kind, Delivery.status)
    )
    return {(str(kind), str(status)): int(n) for kind, status, n in session.execute(stmt)}


def queue_depth(session: Session) -> int:
    """Deliveries of running campaigns not yet in a final state."""
    stmt = (
        select(func.count())
        .select_from(Delivery)
        .join(Campaign, Campaign.id == Delivery.campaign_id)
        .where(Campaign.status == CampaignStatus.RUNNING, Delivery.status.in_(PENDING_STATUSES))
    )
    return int(session.scalar(stmt) or 0)


def source_states(session: Session) -> list[SourceState]:
    """Each source's last successful fetch and last error."""
    rows = session.execute(
        select(Source.url, Source.last_fetched_at, Source.last_error).order_by(Source.url)
    )
    return [SourceState(url, fetched, error) for url, fetched, error in rows]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render_metrics(session: Session, *, scheduler_active: bool) -> str:
    """The Prometheus text exposition of the service's counters and gauges."""
    lines = [
        "# HELP newsletter_deliveries Deliveries by campaign kind and status.",
        "# TYPE newsletter_deliveries gauge",
    ]
    for (kind, status), n in sorted(delivery_totals(session).items()):
        lines.append(f'newsletter_deliveries{{kind="{kind}",status="{status}"}} {n}')
    lines += [
        "# HELP newsletter_queue_depth Deliveries of running campaigns still to send.",
        "# TYPE newsletter_queue_depth gauge",
        f"newsletter_queue_depth {queue_depth(session)}",
        "# HELP newsletter_source_last_poll_timestamp_seconds Last successful poll per source.",
        "# TYPE newsletter_source_last_poll_timestamp_seconds gauge",
    ]
    for state in source_states(session):
        if state.last_fetched_at is not None:
            value = state.last_fetched_at.timestamp()
            lines.append(
                f'newsletter_source_last_poll_timestamp_seconds{{source="{_label(state.url)}"}}'
                f" {value:.0f}"
            )
    lines += [
        "# HELP newsletter_scheduler_active 1 if this process holds the scheduler lock.",
        "# TYPE newsletter_scheduler_active gauge",
        f"newsletter_scheduler_active {int(scheduler_active)}",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CampaignProgress:
    counts: dict[str, int]
    per_minute: int
    time_left: timedelta | None

    @property
    def pending(self) -> int:
        return sum(self.counts.get(s, 0) for s in PENDING_STATUSES)


def campaign_progress(session: Session, campaign_id: int, *, now: datetime) -> CampaignProgress:
    """A campaign's counts, its sending rate over the last minute and the time that leaves."""
    counts = delivery_counts(session, campaign_id)
    recent = select(func.count()).where(
        Delivery.campaign_id == campaign_id, Delivery.sent_at >= now - timedelta(minutes=1)
    )
    per_minute = int(session.scalar(recent) or 0)
    pending = sum(counts.get(s, 0) for s in PENDING_STATUSES)
    left = timedelta(minutes=pending / per_minute) if per_minute and pending else None
    return CampaignProgress(counts, per_minute, left)


def campaign_failures(session: Session, campaign_id: int, *, limit: int) -> list[tuple[str, str]]:
    """Failed deliveries of a campaign: the address and the last SMTP reply."""
    stmt = (
        select(Subscriber.email, Delivery.last_reply)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.campaign_id == campaign_id, Delivery.status == DeliveryStatus.FAILED)
        .order_by(Delivery.id)
        .limit(limit)
    )
    return [(email, reply or "") for email, reply in session.execute(stmt)]
