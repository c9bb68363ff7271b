"""The queries that matter, named and in one place; each says why it has its shape."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    case,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from newsletter.db.models import (
    Campaign,
    CampaignKind,
    CampaignStatus,
    Delivery,
    DeliveryStatus,
    Item,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
)

PENDING_STATUSES = (DeliveryStatus.QUEUED, DeliveryStatus.DEFERRED, DeliveryStatus.CLAIMED)


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def items_since(session: Session, cursor: int) -> Sequence[Item]:
    """Items ingested after the list's digest cursor, newest first.

    The window is by item id (ingest order), not by publication date: an item that arrives late
    with an old date still gets into the next digest, and none is counted twice.
    """
    stmt = select(Item).where(Item.id > cursor).order_by(Item.published_at.desc(), Item.id.desc())
    return session.scalars(stmt).all()


def audience_query(list_id: int) -> Select[int]:
    """Subscriber ids who should get a campaign to this list: active people, active subscription.

    Suppressed, unsubscribed and bounced people are excluded here once, and again at claim time.
    """
    return (
        select(Subscriber.id)
        .join(Subscription, Subscription.subscriber_id == Subscriber.id)
        .where(
            Subscription.list_id == list_id,
            Subscription.status == SubscriptionStatus.ACTIVE,
            Subscriber.status == SubscriberStatus.ACTIVE,
        )
    )


def enqueue_audience(session: Session, *, campaign: Campaign, now: datetime) -> int:
    """Insert one queued delivery per recipient in a single INSERT ... SELECT.

    ON CONFLICT DO NOTHING on (campaign_id, subscriber_id) makes a second enqueue harmless, and
    the audience never passes through Python, so memory does not grow with the list.
    """
    audience = audience_query(campaign.list_id).subquery()
    source = select(
        literal(campaign.id),
        audience.c.id,
        literal(DeliveryStatus.QUEUED.value),
        literal(0),
        literal(now, Delivery.next_attempt_at.type),
        literal(now, Delivery.created_at.type),
    ).where(true())  # SQLite needs a WHERE before ON CONFLICT in INSERT ... SELECT
    columns = [
        "campaign_id",
        "subscriber_id",
        "status",
        "attempts",
        "next_attempt_at",
        "created_at",
    ]
    insert = postgresql.insert if _dialect(session) == "postgresql" else sqlite.insert
    stmt = insert(Delivery).from_select(columns, source).on_conflict_do_nothing()
    # Counted before and after: psycopg reports no rowcount for INSERT ... SELECT here.
    before = count_deliveries(session, campaign.id)
    session.execute(stmt)
    return count_deliveries(session, campaign.id) - before


def count_deliveries(session: Session, campaign_id: int) -> int:
    """How many deliveries a campaign has (walks the unique (campaign, subscriber) index)."""
    stmt = select(func.count()).select_from(Delivery).where(Delivery.campaign_id == campaign_id)
    return int(session.scalar(stmt) or 0)


def is_due(now: datetime) -> ColumnElement[bool]:
    """A delivery is due when queued or deferred until now, or claimed by a lease that ran out."""
    return or_(
        and_(
            Delivery.status.in_((DeliveryStatus.QUEUED, DeliveryStatus.DEFERRED)),
            Delivery.next_attempt_at <= now,
        ),
        and_(Delivery.status == DeliveryStatus.CLAIMED, Delivery.lease_until < now),
    )


def claim_batch(
    session: Session, *, now: datetime, lease_seconds: int, limit: int, campaign_id: int | None
) -> list[int]:
    """Claim up to `limit` due deliveries of running campaigns; returns their ids.

    One UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) ... RETURNING: on PostgreSQL
    concurrent workers skip each other's rows instead of waiting; on SQLite the single statement
    holds the write lock, so two workers never claim the same row. A claimed row whose lease has
    run out (its worker died) is due again. Alerts are claimed before digests.
    """
    alert_first = case((Campaign.kind == CampaignKind.ALERT, 0), else_=1)
    pick = (
        select(Delivery.id)
        .join(Campaign, Campaign.id == Delivery.campaign_id)
        .where(is_due(now), Campaign.status == CampaignStatus.RUNNING)
        .order_by(alert_first, Delivery.id)
        .limit(limit)
    )
    if campaign_id is not None:
        pick = pick.where(Delivery.campaign_id == campaign_id)
    if _dialect(session) == "postgresql":
        pick = pick.with_for_update(of=Delivery, skip_locked=True)
    stmt = (
        update(Delivery)
        .where(Delivery.id.in_(pick.scalar_subquery()))
        .values(
            status=DeliveryStatus.CLAIMED,
            lease_until=now + timedelta(seconds=lease_seconds),
            attempts=Delivery.attempts + 1,
        )
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(session.scalars(stmt).all())


def count_pending(session: Session, campaign_id: int) -> int:
    """How many deliveries of a campaign are not yet in a final state."""
    stmt = select(func.count()).where(
        Delivery.campaign_id == campaign_id, Delivery.status.in_(PENDING_STATUSES)
    )
    return int(session.scalar(stmt) or 0)


def delivery_counts(session: Session, campaign_id: int) -> dict[str, int]:
    """Deliveries of a campaign by status."""
    stmt = (
        select(Delivery.status, func.count())
        .where(Delivery.campaign_id == campaign_id)
        .group_by(Delivery.status)
    )
    return {str(status): int(n) for status, n in session.execute(stmt)}


def count_due(session: Session, *, now: datetime, campaign_id: int | None) -> int:
    """How many deliveries of running campaigns a sender would claim now (for progress bars)."""
    stmt = (
        select(func.count())
        .select_from(Delivery)
        .join(Campaign, Campaign.id == Delivery.campaign_id)
        .where(Campaign.status == CampaignStatus.RUNNING, is_due(now))
    )
    if campaign_id is not None:
        stmt = stmt.where(Delivery.campaign_id == campaign_id)
    return int(session.scalar(stmt) or 0)


def audience_size(session: Session, list_id: int) -> int:
    """How many people a campaign to this list would reach now."""
    return int(
        session.scalar(select(func.count()).select_from(audience_query(list_id).subquery())) or 0
    )
