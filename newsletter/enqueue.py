"""Enqueue: a campaign's audience resolved into deliveries, behind the one gate every send passes.

launch_campaign is the only way a campaign starts: the pre-send check (check.py), then one
queued delivery per recipient (db/queries.enqueue_audience, a single INSERT ... SELECT), then
the audit event. Every edge (CLI digest and alert, the scheduler, auto alerts, approval, the
demo) calls it, so nothing can be sent unchecked by forgetting a line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy.orm import Session

from newsletter.audience import enqueue_audience
from newsletter.audit import record_event
from newsletter.campaigns import change_if
from newsletter.check import Problem, require_clean
from newsletter.config import Settings
from newsletter.db.models import Campaign, CampaignStatus
from newsletter.errors import CampaignError

Checked = Callable[[Sequence[Problem]], None]
# A campaign in these states is not started (a paused one is resumed, a cancelled one never).
STOPPED = (CampaignStatus.CANCELLED, CampaignStatus.PAUSED)
# The states a start changes to running. Never a finished campaign: a late start (an approval
# or a send that read it before it finished) would reopen its record.
STARTABLE = (CampaignStatus.DRAFT, CampaignStatus.SCHEDULED)


def launch_campaign(
    *,
    session: Session,
    campaign: Campaign,
    settings: Settings,
    now: datetime,
    actor: str,
    force: bool = False,
    on_checked: Checked | None = None,
) -> int:
    """Check a campaign, queue one delivery per recipient and mark it running; returns how many.

    A campaign the check refuses raises CheckError and nothing is queued, unless force (the
    override is recorded in events, as `newsletter check ID --force` does). on_checked runs
    after the check lets the campaign through and before anything is queued (a confirmation,
    an approval), with the problems overridden. Safe to repeat: deliveries are unique per
    (campaign, subscriber), so a second launch queues only people who joined since, and the
    start is recorded once. A finished campaign is left as it is: nothing is queued (its
    newcomers would get an old email) and 0 is returned.
    """
    if campaign.status == CampaignStatus.FINISHED:
        return 0
    problems = require_clean(session, campaign, settings, force=force, actor=actor, now=now)
    if campaign.status in STOPPED:
        raise _not_startable(campaign)
    if on_checked is not None:
        on_checked(problems)
    return _start(session, campaign=campaign, now=now, actor=actor)


def _start(session: Session, *, campaign: Campaign, now: datetime, actor: str) -> int:
    """Queue the campaign's audience (its variants are stored: the check rendered them)."""
    added = enqueue_audience(session, campaign=campaign, now=now)
    if campaign.status != CampaignStatus.RUNNING:
        # Only from the status read: a cancel (or pause, or the end) committed meanwhile by
        # someone else stands, and this start, its deliveries included, is rolled back with the
        # error. A start committed meanwhile is recorded already: the newcomers queued here join it.
        started_at = campaign.started_at or now
        if not change_if(
            session, campaign, when=STARTABLE, status=CampaignStatus.RUNNING, started_at=started_at
        ):
            if campaign.status != CampaignStatus.RUNNING:
                raise _not_startable(campaign)
            session.flush()
            return added
        record_event(
            session,
            now=now,
            actor=actor,
            action="campaign.started",
            campaign=campaign.id,
            queued=added,
        )
    session.flush()
    return added


def _not_startable(campaign: Campaign) -> CampaignError:
    """Why a campaign in a state a start may not change is not started, in one line."""
    if campaign.status == CampaignStatus.FINISHED:
        return CampaignError(f"campaign {campaign.id} finished meanwhile; it is not started again")
    return CampaignError(f"campaign {campaign.id} is {campaign.status}; resume it first")
