"""Staff steer the next digest: see its items, leave some out, send it now or skip it.

The digest window is the list's cursor (assemble.assemble_digest); an item left out stays out
(DigestExclusion) and the cursor moves past it. Skipping moves the cursor past every item of the
window and claims the next scheduled slot, so neither the scheduler's next run nor its catch-up
of a missed slot sends that week's digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from newsletter.assemble import assemble_digest, excluded_item_ids
from newsletter.audit import record_event
from newsletter.config import Settings
from newsletter.db.models import Campaign, DigestExclusion, Item, ListKind, MailingList
from newsletter.db.queries import items_since
from newsletter.enqueue import launch_campaign
from newsletter.errors import CampaignError
from newsletter.i18n import N_
from newsletter.lists import get_list
from newsletter.schedule import digest_trigger, latest_slot


@dataclass(frozen=True)
class UpcomingDigest:
    list_slug: str
    items: list[Item]
    excluded: list[Item]
    next_run: datetime | None


def upcoming_digest(
    session: Session, *, list_slug: str, settings: Settings, now: datetime
) -> UpcomingDigest:
    """What the list's next digest carries and leaves out, and when the scheduler sends it."""
    ml = _digest_list(session, list_slug)
    window = list(items_since(session, ml.digest_cursor))
    excluded = excluded_item_ids(session, ml.id)
    return UpcomingDigest(
        list_slug=ml.slug,
        items=[i for i in window if i.id not in excluded],
        excluded=[i for i in window if i.id in excluded],
        next_run=next_slot(settings, now, after=ml.last_digest_slot),
    )


def next_slot(settings: Settings, now: datetime, *, after: datetime | None) -> datetime | None:
    """The slot the scheduler sends next: a missed one still in the grace, else the next one."""
    trigger = digest_trigger(settings)
    grace = timedelta(hours=settings.schedule.grace_hours)
    missed = latest_slot(trigger, now, lookback=grace)
    if missed is not None and (after is None or after < missed):
        return missed
    upcoming: datetime | None = trigger.get_next_fire_time(None, now)
    return upcoming


def exclude_item(
    session: Session, *, list_slug: str, item_id: int, now: datetime, actor: str
) -> None:
    """Leave an item out of the list's digests (for good); audited."""
    ml = _digest_list(session, list_slug)
    item = _item(session, item_id)
    if session.get(DigestExclusion, (ml.id, item.id)) is None:
        session.add(
            DigestExclusion(list_id=ml.id, item_id=item.id, excluded_by=actor, excluded_at=now)
        )
    record_event(
        session, now=now, actor=actor, action="digest.item_excluded", list=ml.slug, item=item.id
    )
    session.flush()


def include_item(
    session: Session, *, list_slug: str, item_id: int, now: datetime, actor: str
) -> None:
    """Put a left-out item back (it goes out if the next digest's window still holds it)."""
    ml = _digest_list(session, list_slug)
    item = _item(session, item_id)
    session.execute(
        delete(DigestExclusion).where(
            DigestExclusion.list_id == ml.id, DigestExclusion.item_id == item.id
        )
    )
    record_event(
        session, now=now, actor=actor, action="digest.item_included", list=ml.slug, item=item.id
    )
    session.flush()


def skip_digest(
    session: Session,
    *,
    list_slug: str,
    now: datetime,
    actor: str,
    settings: Settings | None = None,
) -> int:
    """Skip the next digest: its items are passed over; returns how many. Audited.

    With settings, the scheduler's next slot (or a missed one it would catch up) is claimed
    too, so items that arrive before it wait for the week after instead of going out then.
    """
    ml = _digest_list(session, list_slug)
    window = list(items_since(session, ml.digest_cursor))
    if window:
        ml.digest_cursor = max(i.id for i in window)
    slot = next_slot(settings, now, after=ml.last_digest_slot) if settings else None
    if slot is not None and (ml.last_digest_slot is None or ml.last_digest_slot < slot):
        ml.last_digest_slot = slot
    record_event(
        session,
        now=now,
        actor=actor,
        action="digest.skipped",
        list=ml.slug,
        items=len(window),
        cursor=ml.digest_cursor,
        slot=slot.isoformat() if slot else None,
    )
    session.flush()
    return len(window)


def send_digest_now(
    session: Session, *, list_slug: str, settings: Settings, now: datetime, actor: str
) -> Campaign | None:
    """Assemble the digest (without the items left out) and start it; None if nothing is new."""
    campaign = assemble_digest(
        session=session, list_slug=list_slug, now=now, actor=actor, settings=settings
    )
    if campaign is None:
        return None
    launch_campaign(session=session, campaign=campaign, settings=settings, now=now, actor=actor)
    record_event(
        session,
        now=now,
        actor=actor,
        action="digest.sent_now",
        list=list_slug,
        campaign=campaign.id,
    )
    session.flush()
    return campaign


def _digest_list(session: Session, list_slug: str) -> MailingList:
    ml = get_list(session, list_slug)
    if ml.kind != ListKind.DIGEST:
        raise CampaignError.of(
            N_("list '%(list)s' is a %(kind)s list, not a digest list"),
            list=list_slug,
            kind=str(ml.kind),
        )
    return ml


def _item(session: Session, item_id: int) -> Item:
    item = session.scalar(select(Item).where(Item.id == item_id))
    if item is None:
        raise CampaignError.of(N_("no item %(id)s"), id=item_id)
    return item
