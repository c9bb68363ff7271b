"""A campaign's life: rendered once per language, queued, sent, finished (or paused, cancelled)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from newsletter.assemble import items_for_language
from newsletter.audience import enqueue_audience
from newsletter.config import Settings
from newsletter.db.models import (
    Campaign,
    CampaignKind,
    CampaignStatus,
    Event,
    MailingList,
    Variant,
)
from newsletter.db.queries import count_pending
from newsletter.errors import CampaignError
from newsletter.render import CampaignView, ItemView, RenderedVariant, render_variant


def campaign_view(campaign: Campaign, lang: str, default_lang: str = "en") -> CampaignView:
    """The plain data a template needs in one language, taken from a campaign and its items.

    A digest carries the items of the reader's language's feeds (see items_for_language).
    """
    ml: MailingList = campaign.mailing_list
    items = list(campaign.items)
    if campaign.kind == CampaignKind.DIGEST:
        items = items_for_language(items, lang=lang, default_lang=default_lang)
    return CampaignView(
        kind=campaign.kind,
        list_name=ml.names.get(lang) or ml.name,
        items=tuple(
            ItemView(
                title=i.title,
                link=i.link,
                summary_html=i.summary_html,
                published_at=i.published_at,
                categories=tuple(i.categories or ()),
                lang=i.source.lang,
            )
            for i in items
        ),
        title=campaign.title,
        body_html=campaign.body_html,
        url=campaign.url,
        issued_at=campaign.created_at,
    )


def render_campaign(campaign: Campaign, *, settings: Settings) -> list[RenderedVariant]:
    """Render a campaign once for each configured language (never per recipient)."""
    return [
        render_variant(
            campaign_view(campaign, lang, settings.render.default_language),
            lang=lang,
            settings=settings,
        )
        for lang in settings.render.languages
    ]


def store_variants(
    session: Session, campaign: Campaign, variants: Sequence[RenderedVariant]
) -> None:
    """Keep the rendered variants with the campaign, replacing any earlier rendering."""
    session.execute(delete(Variant).where(Variant.campaign_id == campaign.id))
    for v in variants:
        session.add(
            Variant(
                campaign_id=campaign.id,
                lang=v.lang,
                subject=v.subject,
                html=v.html,
                text=v.text,
                link_nonce=v.nonce,
            )
        )
    session.flush()


def start_campaign(
    *, session: Session, campaign: Campaign, settings: Settings, now: datetime, actor: str
) -> int:
    """Render (if not yet), queue one delivery per recipient and mark the campaign running.

    Safe to repeat: deliveries are unique per (campaign, subscriber), so a second start queues
    only people who joined since. Returns how many deliveries were added.
    """
    if campaign.status in (CampaignStatus.CANCELLED, CampaignStatus.PAUSED):
        raise CampaignError(f"campaign {campaign.id} is {campaign.status}; resume it first")
    has_variants = session.scalar(select(Variant.id).where(Variant.campaign_id == campaign.id))
    if has_variants is None:
        store_variants(session, campaign, render_campaign(campaign, settings=settings))
    added = enqueue_audience(session, campaign=campaign, now=now)
    if campaign.status != CampaignStatus.RUNNING:
        campaign.status = CampaignStatus.RUNNING
        campaign.started_at = campaign.started_at or now
        session.add(
            Event(
                at=now,
                actor=actor,
                action="campaign.started",
                detail={"campaign": campaign.id, "queued": added},
            )
        )
    session.flush()
    return added


def finish_if_done(*, session: Session, campaign_id: int, now: datetime) -> bool:
    """Mark a running campaign finished once none of its deliveries is pending.

    The change is one conditional UPDATE, so of two workers finishing together only one wins
    and writes the event.
    """
    if count_pending(session, campaign_id):
        return False
    won = session.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.RUNNING)
        .values(status=CampaignStatus.FINISHED, finished_at=now)
        .returning(Campaign.id)
        .execution_options(synchronize_session=False)
    ).scalar()
    if won is None:
        return False
    loaded = session.get(Campaign, campaign_id)
    if loaded is not None:
        session.refresh(loaded)
    session.add(
        Event(at=now, actor="sender", action="campaign.finished", detail={"campaign": campaign_id})
    )
    return True


def get_campaign(session: Session, campaign_id: int) -> Campaign:
    """Find a campaign by id."""
    campaign = session.get(Campaign, campaign_id)
    if campaign is None:
        raise CampaignError(f"no campaign {campaign_id}; see `newsletter campaigns list`")
    return campaign


def running_campaign_ids(session: Session) -> list[int]:
    """Ids of campaigns that are sending."""
    stmt = select(Campaign.id).where(Campaign.status == CampaignStatus.RUNNING)
    return list(session.scalars(stmt))


# --- pause, resume, cancel, retry (from another terminal while a sender runs) ---------------


def pause_campaign(
    *, session: Session, campaign_id: int, now: datetime, actor: str, reason: str
) -> Campaign:
    """Stop new claims for a running campaign; senders let in-flight messages finish."""
    campaign = get_campaign(session, campaign_id)
    if campaign.status != CampaignStatus.RUNNING:
        raise CampaignError(f"campaign {campaign_id} is {campaign.status}, not running")
    campaign.status, campaign.pause_reason = CampaignStatus.PAUSED, reason[:500]
    _audit(session, now, actor, "campaign.paused", campaign_id, reason=reason[:200])
    return campaign


def resume_campaign(*, session: Session, campaign_id: int, now: datetime, actor: str) -> Campaign:
    """Let a paused campaign be claimed again; only what was not sent goes out."""
    campaign = get_campaign(session, campaign_id)
    if campaign.status != CampaignStatus.PAUSED:
        raise CampaignError(f"campaign {campaign_id} is {campaign.status}, not paused")
    campaign.status, campaign.pause_reason = CampaignStatus.RUNNING, ""
    _audit(session, now, actor, "campaign.resumed", campaign_id)
    return campaign


def cancel_campaign(*, session: Session, campaign_id: int, now: datetime, actor: str) -> Campaign:
    """Stop a campaign for good; its deliveries stay as they are, as the record."""
    campaign = get_campaign(session, campaign_id)
    if campaign.status in (CampaignStatus.FINISHED, CampaignStatus.CANCELLED):
        raise CampaignError(f"campaign {campaign_id} is already {campaign.status}")
    campaign.status, campaign.finished_at = CampaignStatus.CANCELLED, now
    _audit(session, now, actor, "campaign.cancelled", campaign_id)
    return campaign


def retry_campaign(*, session: Session, campaign_id: int, now: datetime, actor: str) -> int:
    """Queue a campaign's failed deliveries again (only those); returns how many."""
    from newsletter.db.queries import requeue_failed

    campaign = get_campaign(session, campaign_id)
    if campaign.status == CampaignStatus.CANCELLED:
        raise CampaignError(f"campaign {campaign_id} is cancelled; nothing is retried")
    count = requeue_failed(session, campaign_id=campaign_id, now=now)
    if count and campaign.status == CampaignStatus.FINISHED:
        campaign.status, campaign.finished_at = CampaignStatus.RUNNING, None
    _audit(session, now, actor, "campaign.retried", campaign_id, requeued=count)
    return count


def _audit(
    session: Session, now: datetime, actor: str, action: str, campaign_id: int, **detail: object
) -> None:
    session.add(
        Event(at=now, actor=actor, action=action, detail={"campaign": campaign_id, **detail})
    )
    session.flush()
