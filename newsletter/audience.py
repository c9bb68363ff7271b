"""Who a campaign reaches: the one definition of the people a list and a segment select.

Someone is in the audience of a list when their subscription to it is active, they themselves
are active (not unsubscribed, bounced or forgotten) and they match the segment's rule, when there
is one. Without a list (`segments count NAME`, `subscribers list --segment S`), the audience is
whom a campaign on some list would reach: an active subscription to at least one list. Enqueue,
`segments count/show` and `subscribers list` all select through here.

Suppressed addresses are kept only as keyed hashes and cannot be joined to people; a suppression
always comes with the person's status (bounced or forgotten), which this selection excludes and
the sender checks again when it claims each delivery.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import Session

from newsletter.db.models import (
    Campaign,
    CampaignStatus,
    CaseLetter,
    CaseMessage,
    CaseRole,
    Delivery,
    DeliveryStatus,
    Subscriber,
    SubscriberStatus,
)
from newsletter.db.queries import (
    audience_query,
    count_audience,
    insert_deliveries,
    refresh_statistics,
)
from newsletter.errors import AudienceError
from newsletter.lists import get_list
from newsletter.segments import compile_rule, get_segment, segment_filter


@dataclass(frozen=True)
class Person:
    """One selected subscriber, as the command line shows them."""

    id: int
    email: str
    name: str
    language: str
    country: str
    status: str


def select_audience(
    session: Session, *, list_id: int | None, segment_id: int | None = None
) -> Select[int]:
    """The ids a campaign to this list (any list, with None) and stored segment would reach."""
    segment = segment_filter(session, segment_id) if segment_id else None
    return audience_query(list_id, segment)


def campaign_audience(session: Session, campaign: Campaign) -> Select[int]:
    """The audience of a campaign: its list, narrowed by its segment when it has one.

    A case's later messages (cases.py) go to the people still on the list who were sent an
    earlier message of the case; an update and the reminder also to those whose first message
    is still on its way (its campaign running or paused: the sender holds theirs until it went);
    an update `include_new` also to everyone on the list now; the reminder not to those who said
    they wrote.
    """
    everyone = select_audience(session, list_id=campaign.list_id, segment_id=campaign.segment_id)
    message = campaign.case_message
    if message is None or message.role == CaseRole.FIRST:
        return everyone
    earlier = select(CaseMessage.campaign_id).where(
        CaseMessage.case_id == message.case_id, CaseMessage.campaign_id != campaign.id
    )
    reached = Delivery.status == DeliveryStatus.SENT
    if message.role != CaseRole.CLOSING:
        first = (
            select(CaseMessage.campaign_id)
            .join(Campaign, Campaign.id == CaseMessage.campaign_id)
            .where(
                CaseMessage.case_id == message.case_id,
                CaseMessage.role == CaseRole.FIRST,
                Campaign.status.in_(LIVE),
            )
        )
        pending = and_(
            Delivery.campaign_id.in_(first.scalar_subquery()),
            Delivery.status.in_(PENDING),
        )
        reached = or_(reached, pending)
    got = select(Delivery.subscriber_id).where(
        Delivery.campaign_id.in_(earlier.scalar_subquery()), reached
    )
    chosen: ColumnElement[bool] = Subscriber.id.in_(got.scalar_subquery())
    if message.include_new:
        chosen = or_(chosen, Subscriber.id.in_(everyone.scalar_subquery()))
    if message.role == CaseRole.REMINDER:
        wrote = select(CaseLetter.subscriber_id).where(CaseLetter.case_id == message.case_id)
        chosen = and_(chosen, Subscriber.id.not_in(wrote.scalar_subquery()))
    return audience_query(campaign.list_id, None).where(chosen)


# A delivery not sent yet, nor given up: a case's first message still on its way, as long as
# its campaign is LIVE (a cancelled one never sends what it had left; a finished one has none).
PENDING = (DeliveryStatus.QUEUED, DeliveryStatus.CLAIMED, DeliveryStatus.DEFERRED)
LIVE = (CampaignStatus.RUNNING, CampaignStatus.PAUSED)
# Why a later message of a case is not sent to a reader none of whose earlier ones went.
UNTHREADED = "not sent: none of the case's earlier messages reached this reader"


def on_its_way(delivery_status: str, campaign_status: str) -> bool:
    """Whether a delivery may still be sent: pending, in a campaign that is running or paused."""
    return delivery_status in PENDING and campaign_status in LIVE


def thread_states(
    session: Session, campaign_ids: Collection[int], subscriber_ids: Collection[int]
) -> dict[tuple[int, int], tuple[str, str]]:
    """(delivery status, campaign status) of each (campaign, subscriber) delivery among these."""
    stmt = (
        select(Delivery.campaign_id, Delivery.subscriber_id, Delivery.status, Campaign.status)
        .join(Campaign, Campaign.id == Delivery.campaign_id)
        .where(
            Delivery.campaign_id.in_(list(campaign_ids)),
            Delivery.subscriber_id.in_(list(subscriber_ids)),
        )
    )
    return {(c, s): (status, state) for c, s, status, state in session.execute(stmt).all()}


def takes_newcomers(session: Session, campaign_id: int) -> bool:
    """Whether a case's message goes to everyone on the list too (an update `include_new`)."""
    stmt = select(CaseMessage.include_new).where(CaseMessage.campaign_id == campaign_id)
    return bool(session.scalar(stmt))


def enqueue_audience(session: Session, *, campaign: Campaign, now: datetime) -> int:
    """Queue one delivery per member of a campaign's audience; a second call adds nothing.

    A large queue on PostgreSQL also refreshes the statistics its claims are planned by.
    """
    audience = campaign_audience(session, campaign)
    added = insert_deliveries(session, campaign_id=campaign.id, audience=audience, now=now)
    refresh_statistics(session, added=added)
    return added


def audience_size(session: Session, list_id: int, segment_id: int | None = None) -> int:
    """How many people a campaign to this list (and segment) would reach now."""
    return count_audience(session, select_audience(session, list_id=list_id, segment_id=segment_id))


def segment_where(session: Session, *, name: str | None, rule: str | None) -> ColumnElement[bool]:
    """The compiled filter of a named segment, or of a rule given to try instead."""
    return compile_rule(rule if rule is not None else get_segment(session, name or "").rule)


def count_selected(session: Session, *, where: ColumnElement[bool], list_slug: str | None) -> int:
    """How many people a campaign with this filter reaches: on the list, or on any list."""
    list_id = get_list(session, list_slug).id if list_slug else None
    return count_audience(session, audience_query(list_id, where))


def show_selected(
    session: Session, *, where: ColumnElement[bool], list_slug: str | None, limit: int
) -> list[Person]:
    """The first people (by id) a campaign with this filter reaches, on the list or any list."""
    list_id = get_list(session, list_slug).id if list_slug else None
    return _people(session, audience_query(list_id, where), limit)


def list_people(
    session: Session,
    *,
    list_slug: str | None,
    segment: str | None,
    status: str | None,
    limit: int,
) -> list[Person]:
    """Subscribers by id: everyone (of a status), or, with a list or segment, that audience.

    A list or a segment means who a campaign reaches, and so only active people: asking for
    another status with one is refused rather than answered with nobody.
    """
    if not (list_slug or segment):
        stmt = select(Subscriber.id)
        return _people(session, stmt.where(Subscriber.status == status) if status else stmt, limit)
    if status and status != SubscriberStatus.ACTIVE:
        raise AudienceError(
            "--list and --segment select who a campaign reaches, active people only: "
            "leave out --status, or use --status active"
        )
    where = segment_where(session, name=segment, rule=None) if segment else None
    list_id = get_list(session, list_slug).id if list_slug else None
    return _people(session, audience_query(list_id, where), limit)


def _people(session: Session, ids: Select[int], limit: int) -> list[Person]:
    stmt = (
        select(Subscriber)
        .where(Subscriber.id.in_(ids.scalar_subquery()))
        .order_by(Subscriber.id)
        .limit(limit)
    )
    return [
        Person(s.id, s.email, s.name, s.language, s.country, s.status)
        for s in session.scalars(stmt)
    ]
