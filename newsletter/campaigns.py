"""A campaign's state machine: running, paused, cancelled, retried, finished."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from newsletter.audit import record_event
from newsletter.db.models import (
    ActionCase,
    Campaign,
    CampaignStatus,
    CaseMessage,
    CaseRole,
    CaseStatus,
    Delivery,
    DeliveryStatus,
)
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


def change_if(
    session: Session, campaign: Campaign, *, when: Collection[CampaignStatus], **values: Any
) -> bool:
    """Write `values` only if the campaign's status is still one of `when`; False if not.

    One conditional UPDATE: a change another process committed since the campaign was read (a
    cancel while the sender pauses it, a resume racing a cancel) is never written over.
    """
    done = session.execute(
        update(Campaign)
        .where(Campaign.id == campaign.id, Campaign.status.in_(list(when)))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if getattr(done, "rowcount", 0) != 1:
        session.refresh(campaign)  # for the error: the status it has now
        return False
    for key, value in values.items():
        set_committed_value(campaign, key, value)
    return True


def pause_campaign(
    *, session: Session, campaign_id: int, now: datetime, actor: str, reason: str
) -> Campaign:
    """Stop new claims for a running campaign; senders let in-flight messages finish."""
    campaign = get_campaign(session, campaign_id)
    running = (CampaignStatus.RUNNING,)
    if campaign.status != CampaignStatus.RUNNING or not change_if(
        session, campaign, when=running, status=CampaignStatus.PAUSED, pause_reason=reason[:500]
    ):
        raise CampaignError.of(
            N_("campaign %(id)s is %(status)s, not running"),
            id=campaign_id,
            status=str(campaign.status),
        )
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
    """Let a paused campaign be claimed again; only what was not sent goes out.

    The retry deadline of what is still to go restarts from now (requeued_at), as for a retry:
    the time spent paused is not the relays' fault, and would else fail a message at its first
    4xx after a pause longer than [smtp] retry_deadline_hours.
    """
    campaign = get_campaign(session, campaign_id)
    refuse_for_closed_case(session, campaign_id)
    paused = (CampaignStatus.PAUSED,)
    if campaign.status != CampaignStatus.PAUSED or not change_if(
        session, campaign, when=paused, status=CampaignStatus.RUNNING, pause_reason=""
    ):
        raise CampaignError.of(
            N_("campaign %(id)s is %(status)s, not paused"),
            id=campaign_id,
            status=str(campaign.status),
        )
    session.execute(
        update(Delivery)
        .where(
            Delivery.campaign_id == campaign_id,
            Delivery.status.in_((DeliveryStatus.QUEUED, DeliveryStatus.DEFERRED)),
        )
        .values(requeued_at=now)
        .execution_options(synchronize_session=False)
    )
    record_event(session, now=now, actor=actor, action="campaign.resumed", campaign=campaign_id)
    session.flush()
    return campaign


def cancel_campaign(*, session: Session, campaign_id: int, now: datetime, actor: str) -> Campaign:
    """Stop a campaign for good; its deliveries stay as they are, as the record."""
    campaign = get_campaign(session, campaign_id)
    ended = (CampaignStatus.FINISHED, CampaignStatus.CANCELLED)
    open_ = [s for s in CampaignStatus if s not in ended]
    if campaign.status in ended or not change_if(
        session, campaign, when=open_, status=CampaignStatus.CANCELLED, finished_at=now
    ):
        raise CampaignError.of(
            N_("campaign %(id)s is already %(status)s"),
            id=campaign_id,
            status=str(campaign.status),
        )
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
    refuse_for_closed_case(session, campaign_id)
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


def refuse_for_closed_case(session: Session, campaign_id: int) -> None:
    """Refuse to send more of a message of a closed case, other than its closing message.

    Nobody is asked to write about a closed case: its first message, updates and reminder are
    over once it closed (close_case dropped what they had not sent).
    """
    stmt = (
        select(ActionCase.reference)
        .join(CaseMessage, CaseMessage.case_id == ActionCase.id)
        .where(
            CaseMessage.campaign_id == campaign_id,
            CaseMessage.role != CaseRole.CLOSING,
            ActionCase.status == CaseStatus.CLOSED,
        )
    )
    reference = session.scalar(stmt)
    if reference is not None:
        raise CampaignError.of(
            N_(
                "campaign %(id)s is a message of case %(case)s, which is closed: nobody is "
                "asked to write about a closed case; nothing is sent"
            ),
            id=campaign_id,
            case=reference,
        )
