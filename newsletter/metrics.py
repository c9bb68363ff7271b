"""What the running service reports: Prometheus text for /metrics, a summary for `status`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from newsletter.db.models import (
    Campaign,
    CampaignStatus,
    Delivery,
    DeliveryStatus,
    Event,
    Source,
    Subscriber,
)
from newsletter.db.queries import PENDING_STATUSES, delivery_counts

# The big providers by the recipient's registrable domain: a provider's name as the first label
# and, after it, exactly one of these public suffixes (a short explicit list, so that
# live.example.org or yahoo.evil.example count as "others"); "others" is everything else.
PUBLIC_SUFFIXES = (
    "com", "net", "org", "fr", "de", "co.uk", "uk", "it", "es", "ca", "com.au", "ru", "by",
    "lt", "lv", "ee", "pl", "ua", "kz", "be", "nl", "at", "ch", "se", "dk", "no", "fi", "ie",
    "pt", "gr", "cz", "sk", "hu", "ro", "bg", "co.jp", "jp", "co.in", "in", "co.nz",
    "co.za", "com.br", "com.ar", "com.mx", "com.tr", "com.sg", "com.hk", "com.tw", "cn",
)  # fmt: skip
PROVIDER_NAMES: dict[str, tuple[str, ...]] = {
    "outlook": ("outlook", "hotmail", "live", "msn", "windowslive"),
    "yahoo": ("yahoo", "ymail", "aol", "rocketmail"),
}
# Every domain counted for a provider, spelled out: Gmail is gmail.com and googlemail.com only.
PROVIDER_DOMAINS: dict[str, frozenset[str]] = {
    "gmail": frozenset(("gmail.com", "googlemail.com")),
    **{
        provider: frozenset(f"{name}.{suffix}" for name in names for suffix in PUBLIC_SUFFIXES)
        for provider, names in PROVIDER_NAMES.items()
    },
}
PROVIDERS = (*PROVIDER_DOMAINS, "others")
# Gmail's and Outlook.com's bulk-sender threshold: past it a day, the stricter rules apply.
BULK_SENDER_DAILY = 5000
BULK_PROVIDERS = ("gmail", "outlook")
DOCTOR_CHECKED = "doctor.checked"  # the audit event `newsletter doctor` records, {"passed": bool}


@dataclass(frozen=True)
class ProviderDay:
    """Messages sent to each provider since the start of the UTC day, and whether to warn."""

    day_start: datetime
    counts: dict[str, int]
    doctor_passed: bool | None  # the latest `newsletter doctor` verdict; None: never run

    @property
    def over_bulk(self) -> list[str]:
        """Gmail or Outlook when past the bulk-sender threshold today."""
        return [p for p in BULK_PROVIDERS if self.counts.get(p, 0) >= BULK_SENDER_DAILY]

    @property
    def warning(self) -> bool:
        """Past the bulk-sender threshold while `newsletter doctor` is not known to pass."""
        return bool(self.over_bulk) and self.doctor_passed is not True

    def as_json(self) -> dict[str, Any]:
        """The counts as `status --json` prints them."""
        return {
            "day_start": self.day_start.isoformat(),
            "sent": self.counts,
            "doctor_passed": self.doctor_passed,
            "bulk_sender_warning": self.over_bulk if self.warning else [],
        }


def provider_of(email: str) -> str:
    """The provider an address's domain belongs to (gmail, outlook, yahoo or others)."""
    domain = email.rpartition("@")[2].strip().lower()
    for provider, domains in PROVIDER_DOMAINS.items():
        if domain in domains:
            return provider
    return "others"


def day_start(now: datetime) -> datetime:
    """The start of the UTC day of `now` (the providers count per day; UTC is what they show)."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def provider_counts(session: Session, *, since: datetime) -> dict[str, int]:
    """Messages sent since `since`, by the recipient's provider; every provider, zeros too.

    The database counts by what follows the address's first @ (one cut per message), and
    provider_of names each of those few tails here. Matching every message against each of
    the 443 provider domains in SQL cost about 20 us a message: 0.6 s of CPU per dashboard
    load or /metrics scrape after 30,000 messages in a day, taken from the sender.
    """
    email = Subscriber.email
    postgresql = session.get_bind().dialect.name == "postgresql"
    at = func.strpos(email, "@") if postgresql else func.instr(email, "@")
    tail = func.lower(func.substr(email, at + 1))
    stmt = (
        select(tail, func.count())
        .select_from(Delivery)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.sent_at >= since)
        .group_by(tail)
    )
    counts = dict.fromkeys(PROVIDERS, 0)
    for after_at, n in session.execute(stmt):
        # provider_of takes the part after the last @: a tail holding another @ is read right.
        counts[provider_of(f"@{after_at}")] += int(n)
    return counts


def doctor_passed(session: Session) -> bool | None:
    """The verdict of the latest `newsletter doctor` run as its audit event says; None if none."""
    detail = session.scalar(
        select(Event.detail)
        .where(Event.action == DOCTOR_CHECKED)
        .order_by(Event.at.desc(), Event.id.desc())
        .limit(1)
    )
    if not isinstance(detail, dict):
        return None
    return detail.get("passed") is True


def provider_day(session: Session, *, now: datetime) -> ProviderDay:
    """Today's (UTC) counts by provider and the latest doctor verdict."""
    start = day_start(now)
    return ProviderDay(start, provider_counts(session, since=start), doctor_passed(session))


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


def render_metrics(session: Session, *, scheduler_active: bool, now: datetime | None = None) -> str:
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
    day = provider_day(session, now=now or datetime.now(UTC))
    lines += [
        "# HELP newsletter_sent_today Messages sent since the start of the UTC day, by provider.",
        "# TYPE newsletter_sent_today gauge",
        *(f'newsletter_sent_today{{provider="{p}"}} {n}' for p, n in day.counts.items()),
        "# HELP newsletter_bulk_sender_warning 1 if past 5000 a day to Gmail or Outlook while"
        " `newsletter doctor` does not pass.",
        "# TYPE newsletter_bulk_sender_warning gauge",
        f"newsletter_bulk_sender_warning {int(day.warning)}",
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
