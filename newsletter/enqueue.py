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
    start is recorded once.
    """
    problems = require_clean(session, campaign, settings, force=force, actor=actor, now=now)
    if campaign.status in STOPPED:
        raise CampaignError(f"campaign {campaign.id} is {campaign.status}; resume it first")
    if on_checked is not None:
        on_checked(problems)
    return _start(session, campaign=campaign, now=now, actor=actor)


def _start(session: Session, *, campaign: Campaign, now: datetime, actor: str) -> int:
    """Queue the campaign's audience (its variants are stored: the check rendered them)."""
    added = enqueue_audience(session, campaign=campaign, now=now)
    if campaign.status != CampaignStatus.RUNNING:
        # Only from the status read: a cancel (or pause) committed meanwhile by someone else
        # stands, and this start, its deliveries included, is rolled back with the error.
        startable = [s for s in CampaignStatus if s not in STOPPED]
        started_at = campaign.started_at or now
        if not change_if(
            session, campaign, when=startable, status=CampaignStatus.RUNNING, started_at=started_at
        ):
            raise CampaignError(f"campaign {campaign.id} is {campaign.status}; resume it first")
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
