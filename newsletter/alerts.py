"""Urgent-action alerts from urgent items: sent at once in auto mode, else held for approval."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.approvals import lock_alert
from newsletter.assemble import assemble_alert
from newsletter.audit import record_event
from newsletter.campaigns import get_campaign
from newsletter.check import CheckError, Problem
from newsletter.config import Settings
from newsletter.db.models import Campaign, CampaignKind, CampaignStatus, Item
from newsletter.db.queries import campaign_events
from newsletter.enqueue import launch_campaign
from newsletter.errors import CampaignError

# An urgent item older than this when first seen is history, not a call to act now: the first
# poll of a feed must not send alerts for last month's actions.
MAX_ALERT_AGE = timedelta(hours=48)


def alerts_for_urgent_items(
    *, session: Session, settings: Settings, now: datetime, actor: str = "scheduler"
) -> list[Campaign]:
    """Make an alert for each recent urgent item that has none; start it in auto mode."""
    recent = session.scalars(
        select(Item)
        .where(Item.urgent.is_(True), Item.published_at >= now - MAX_ALERT_AGE)
        .order_by(Item.id)
    ).all()
    made = []
    for item in recent:
        campaign, created = assemble_alert(
            session=session,
            list_slug=settings.alerts.list,
            now=now,
            actor=actor,
            item=item,  # itself: its guid may also be another source's guid or link
        )
        if not created:
            continue
        made.append(campaign)
        action = "alert.awaiting_approval"
        if settings.alerts.mode == "auto":
            try:
                launch_campaign(
                    session=session, campaign=campaign, settings=settings, now=now, actor=actor
                )
                continue
            except CheckError:  # held for a person, who sees why and may approve with --force
                action = "alert.held_by_check"
        record_event(
            session,
            now=now,
            actor=actor,
            action=action,
            campaign=campaign.id,
            item_hashes=item_hashes(campaign),
        )
    return made


def item_hashes(campaign: Campaign) -> dict[str, str]:
    """The content hash of each of the campaign's items, by item id (a str: JSON keys are)."""
    return {str(item.id): item.content_hash for item in campaign.items}


def held_item_hashes(session: Session, campaign: Campaign) -> dict[str, str] | None:
    """The item hashes recorded when the alert was held (the last hold), or None if none were."""
    events = [e for a in HELD_ACTIONS for e in campaign_events(session, campaign.id, action=a)]
    if not events:
        return None
    held = max(events, key=lambda e: e.id).detail.get("item_hashes")
    return dict(held) if isinstance(held, dict) else None


def approve_alert(
    *,
    session: Session,
    campaign_id: int,
    settings: Settings,
    now: datetime,
    actor: str,
    force: bool = False,
) -> int:
    """Check, approve and start a held alert; returns how many deliveries were queued.

    The alert's row is locked before its status is read: approvals at once run one after
    another, and each after the first finds it started and is refused.
    """
    lock_alert(session, campaign_id)
    campaign = get_campaign(session, campaign_id)
    session.refresh(campaign)  # read before the lock (in this session), it may be stale
    if campaign.kind != CampaignKind.ALERT:
        raise CampaignError(f"campaign {campaign_id} is a {campaign.kind}, not an alert")
    if campaign.approved_by:
        raise CampaignError(
            f"alert {campaign_id} was already approved by {campaign.approved_by} "
            f"({campaign.status}); nothing to do"
        )
    if campaign.status != CampaignStatus.DRAFT:
        raise CampaignError(f"campaign {campaign_id} is {campaign.status}, not awaiting approval")
    # The approver reviewed the item as it was when held; a feed may rewrite it (same guid)
    # since, and the send renders it again from what is stored now.
    held = held_item_hashes(session, campaign)
    changed = held is not None and held != item_hashes(campaign)
    if changed and not force:
        raise CampaignError(
            f"alert {campaign_id} was not approved: its item changed since it was held (the "
            f"feed rewrote it); read it again (`newsletter check {campaign_id}`) and approve "
            "with --force to send it as it is now"
        )

    def approve(_overridden: Sequence[Problem]) -> None:
        campaign.approved_by = actor
        extra = {"item_changed": True} if changed else {}
        record_event(
            session, now=now, actor=actor, action="alert.approved", campaign=campaign_id, **extra
        )

    return launch_campaign(
        session=session,
        campaign=campaign,
        settings=settings,
        now=now,
        actor=actor,
        force=force,
        on_checked=approve,
    )


HELD_ACTIONS = ("alert.awaiting_approval", "alert.held_by_check")


def is_held_for_approval(session: Session, campaign: Campaign) -> bool:
    """Whether an alert waits for `alert approve`: held by the scheduler and not yet started."""
    if campaign.status != CampaignStatus.DRAFT or campaign.approved_by:
        return False
    return any(campaign_events(session, campaign.id, action=a) for a in HELD_ACTIONS)
