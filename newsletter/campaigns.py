"""A campaign's state machine: running, paused, cancelled, retried, finished."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from newsletter.audit import record_event
from newsletter.db.models import Campaign, CampaignStatus
from newsletter.db.queries import finish_campaign, requeue_failed, running_campaigns
from newsletter.errors import CampaignError
from newsletter.i18n import N_


def finish_if_done(*, session: Session, campaign_id: int, now: datetime) -> bool:
    """Mark a running campaign finished once none of its deliveries is pending.

    The change is one conditional UPDATE, so of two workers finishing together only one wins
    and writes the event.
    """
    if not finish_campaign(session, campaign_id=campaign_id, now=now):
        return False
    record_event(session, now=now, actor="sender", action="campaign.finished", campaign=campaign_id)
    return True


def get_campaign(session: Session, campaign_id: int) -> Campaign:
    """Find a campaign by id."""
    campaign = session.get(Campaign, campaign_id)
    if campaign is None:
        raise CampaignError.of(
            N_("no campaign %(id)s; see `newsletter campaigns list`"), id=campaign_id
        )
    return campaign


def running_campaign_ids(session: Session) -> list[int]:
    """Ids of campaigns that are sending."""
    return running_campaigns(session)


# --- pause, resume, cancel, retry (from another terminal while a sender runs) ---------------


def pause_campaign(
    *, session: Session, campaign_id: int, now: datetime, actor: str, reason: str
) -> Campaign:
    """Stop new claims for a running campaign; senders let in-flight messages finish."""
    campaign = get_campaign(session, campaign_id)
    if campaign.status != CampaignStatus.RUNNING:
        raise CampaignError.of(
            N_("campaign %(id)s is %(status)s, not running"),
            id=campaign_id,
            status=str(campaign.status),
        )
    campaign.status, campaign.pause_reason = CampaignStatus.PAUSED, reason[:500]
    record_event(
        session,
        now=now,
        actor=actor,
        action="campaign.paused",
        campaign=campaign_id,
        reason=reason[:200],
    )
    session.flush()
    return campaign


def resume_campaign(*, session: Session, campaign_id: int, now: datetime, actor: str) -> Campaign:
    """Let a paused campaign be claimed again; only what was not sent goes out."""
    campaign = get_campaign(session, campaign_id)
    if campaign.status != CampaignStatus.PAUSED:
        raise CampaignError.of(
            N_("campaign %(id)s is %(status)s, not paused"),
            id=campaign_id,
            status=str(campaign.status),
        )
    campaign.status, campaign.pause_reason = CampaignStatus.RUNNING, ""
    record_event(session, now=now, actor=actor, action="campaign.resumed", campaign=campaign_id)
    session.flush()
    return campaign


def cancel_campaign(*, session: Session, campaign_id: int, now: datetime, actor: str) -> Campaign:
    """Stop a campaign for good; its deliveries stay as they are, as the record."""
    campaign = get_campaign(session, campaign_id)
    if campaign.status in (CampaignStatus.FINISHED, CampaignStatus.CANCELLED):
        raise CampaignError.of(
            N_("campaign %(id)s is already %(status)s"),
            id=campaign_id,
            status=str(campaign.status),
        )
    campaign.status, campaign.finished_at = CampaignStatus.CANCELLED, now
    record_event(session, now=now, actor=actor, action="campaign.cancelled", campaign=campaign_id)
    session.flush()
    return campaign


def retry_campaign(*, session: Session, campaign_id: int, now: datetime, actor: str) -> int:
    """Queue a campaign's failed deliveries again (only those); returns how many."""
    campaign = get_campaign(session, campaign_id)
    if campaign.status == CampaignStatus.CANCELLED:
        raise CampaignError.of(
            N_("campaign %(id)s is cancelled; nothing is retried"), id=campaign_id
        )
    count = requeue_failed(session, campaign_id=campaign_id, now=now)
    if count and campaign.status == CampaignStatus.FINISHED:
        campaign.status, campaign.finished_at = CampaignStatus.RUNNING, None
    record_event(
        session,
        now=now,
        actor=actor,
        action="campaign.retried",
        campaign=campaign_id,
        requeued=count,
    )
    session.flush()
    return count
