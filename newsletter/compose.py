"""Alerts written in the console: drafts per language, edited in place, and what the form needs.

A console draft is an ALERT campaign in status draft. Its default language's text is the
campaign's own title and body_html (so the sender, the check and the CLI see it as any alert);
the other languages' are in translations, and the Markdown as written in source_text, to edit
again. Every draft gets a key of its own: the same text twice is two drafts, where the CLI's
`alert --title` finds the first again (assemble.assemble_alert).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, object_session

from newsletter.assemble import find_item
from newsletter.audience import select_audience
from newsletter.audit import record_event
from newsletter.config import Settings
from newsletter.db.models import (
    Campaign,
    CampaignKind,
    CampaignRevision,
    CampaignStatus,
    Item,
    Segment,
    Subscriber,
    Variant,
)
from newsletter.errors import CampaignError
from newsletter.i18n import N_
from newsletter.lists import get_list
from newsletter.markdown import markdown_to_html
from newsletter.sanitize import clean_text, clean_url
from newsletter.segments import get_segment

TITLE_MAX_CHARS = 300
QUERY_MAX_CHARS = 200


@dataclass(frozen=True)
class LanguageText:
    title: str
    body: str  # Markdown, as staff wrote it


@dataclass(frozen=True)
class DraftInput:
    list_slug: str
    segment: str | None
    item_ref: str | None  # an item's guid or link, or None for text written here
    texts: dict[str, LanguageText] = field(default_factory=dict)
    url: str = ""  # the call to action
    archive: bool = True  # a web copy in the public archive once sent (archive.py)


@dataclass(frozen=True)
class _Content:
    title: str
    body_html: str
    url: str
    translations: dict[str, dict[str, str]]
    source_text: dict[str, dict[str, str]]
    items: list[Item]


def create_draft(
    session: Session,
    *,
    draft: DraftInput,
    settings: Settings,
    now: datetime,
    actor: str,
    training: bool = False,
) -> Campaign:
    """Make a console alert draft; training when asked (the author's account) or configured."""
    ml = get_list(session, draft.list_slug)
    content = _content(session, draft, settings)
    campaign = Campaign(
        kind=CampaignKind.ALERT,
        list_id=ml.id,
        segment_id=_segment_id(session, draft.segment),
        status=CampaignStatus.DRAFT,
        dedupe_key=f"alert:{ml.id}:draft:{uuid.uuid4().hex}",
        created_by=actor,
        created_at=now,
        training=training or settings.console.training,
        archived=draft.archive,
    )
    _apply(campaign, content)
    session.add(campaign)
    session.flush()
    record_event(
        session, now=now, actor=actor, action="alert.drafted", campaign=campaign.id, list=ml.slug
    )
    return campaign


def update_draft(
    session: Session,
    *,
    campaign_id: int,
    draft: DraftInput,
    settings: Settings,
    now: datetime,
    actor: str,
) -> Campaign:
    """Change a console draft not yet started; every open revision and its approvals is voided."""
    # Imported here: approvals imports this module.
    from newsletter.approvals import lock_alert

    # Locked before it is read: an approval launching the alert meanwhile finishes first, and
    # the draft is then found started and left as it is.
    lock_alert(session, campaign_id)
    session.get(Campaign, campaign_id, populate_existing=True)  # the row as read under the lock
    campaign = editable_draft(session, campaign_id)
    ml = get_list(session, draft.list_slug)
    # The form gives the item back by its guid (draft_input): the draft's own item stays, even
    # where another source's item has that guid or link too.
    content = _content(session, draft, settings, current=campaign.items)
    campaign.list_id = ml.id
    campaign.segment_id = _segment_id(session, draft.segment)
    campaign.approved_by = ""
    campaign.archived = draft.archive
    _apply(campaign, content)
    voided = void_revisions(session, campaign_id=campaign.id, now=now)
    # The stored rendering was of the old text: the next preview or submission renders anew.
    session.execute(delete(Variant).where(Variant.campaign_id == campaign.id))
    session.flush()
    record_event(
        session,
        now=now,
        actor=actor,
        action="alert.edited",
        campaign=campaign.id,
        voided_revisions=voided,
    )
    return campaign


def editable_draft(session: Session, campaign_id: int) -> Campaign:
    """A console alert still in draft and never started, or CampaignError."""
    campaign = session.get(Campaign, campaign_id)
    if (
        campaign is None
        or campaign.kind != CampaignKind.ALERT
        or ":draft:" not in campaign.dedupe_key
    ):
        raise CampaignError.of(N_("no console alert draft %(id)s"), id=campaign_id)
    require_unstarted(campaign)
    return campaign


def require_unstarted(campaign: Campaign) -> None:
    """CampaignError unless the alert is still a draft and was never started."""
    if campaign.status != CampaignStatus.DRAFT or campaign.started_at is not None:
        raise CampaignError.of(
            N_("alert %(id)s is %(status)s: it can no longer change"),
            id=campaign.id,
            status=str(campaign.status),
        )


def void_revisions(session: Session, *, campaign_id: int, now: datetime) -> list[int]:
    """Void a campaign's open revisions (and so their approvals); returns their numbers."""
    numbers = list(
        session.scalars(
            select(CampaignRevision.number).where(
                CampaignRevision.campaign_id == campaign_id, CampaignRevision.voided_at.is_(None)
            )
        )
    )
    session.execute(
        update(CampaignRevision)
        .where(CampaignRevision.campaign_id == campaign_id, CampaignRevision.voided_at.is_(None))
        .values(voided_at=now)
        .execution_options(synchronize_session=False)
    )
    return numbers


def draft_input(campaign: Campaign) -> DraftInput:
    """What the edit form shows again: the Markdown as written, the list, segment and item."""
    session = object_session(campaign)
    segment = session.get(Segment, campaign.segment_id) if session and campaign.segment_id else None
    texts = {
        lang: LanguageText(text.get("title", ""), text.get("body", ""))
        for lang, text in (campaign.source_text or {}).items()
    }
    return DraftInput(
        list_slug=campaign.mailing_list.slug,
        segment=segment.name if segment else None,
        item_ref=campaign.items[0].guid if campaign.items else None,
        texts=texts,
        url=campaign.url,
        archive=campaign.archived,
    )


def recipients_by_language(
    session: Session,
    *,
    list_slug: str,
    segment: str | None,
    languages: Sequence[str],
    default_lang: str | None = None,
) -> dict[str, int]:
    """How many people each language's variant reaches; other languages get the default one's."""
    default = default_lang or languages[0]
    ids = select_audience(
        session, list_id=get_list(session, list_slug).id, segment_id=_segment_id(session, segment)
    )
    rows = session.execute(
        select(Subscriber.language, func.count())
        .where(Subscriber.id.in_(ids.scalar_subquery()))
        .group_by(Subscriber.language)
    ).all()
    counts = dict.fromkeys(languages, 0)
    for lang, count in rows:
        counts[lang if lang in counts else default] += int(count)
    return counts


def recent_items(session: Session, *, query: str, limit: int = 20) -> list[Item]:
    """Items whose title contains the query (any case; "" = all), newest first."""
    stmt = select(Item).order_by(Item.published_at.desc(), Item.id.desc()).limit(limit)
    words = " ".join(query.split())[:QUERY_MAX_CHARS].lower()
    if words:
        # autoescape: a "%" or "_" typed in the picker is a character, not a wildcard.
        stmt = stmt.where(func.lower(Item.title).contains(words, autoescape=True))
    return list(session.scalars(stmt))


def console_drafts(session: Session, *, limit: int = 50) -> list[Campaign]:
    """Alerts not started yet (console drafts and alerts held for approval), newest first."""
    return list(
        session.scalars(
            select(Campaign)
            .where(Campaign.kind == CampaignKind.ALERT, Campaign.status == CampaignStatus.DRAFT)
            .order_by(Campaign.created_at.desc(), Campaign.id.desc())
            .limit(limit)
        )
    )


# --- the form's content, checked and cleaned --------------------------------------------------


def _content(
    session: Session, draft: DraftInput, settings: Settings, current: Sequence[Item] = ()
) -> _Content:
    default = settings.render.default_language
    texts = {lang: t for lang, t in draft.texts.items() if t.title.strip() or t.body.strip()}
    unknown = sorted(set(texts) - set(settings.render.languages))
    if unknown:
        raise CampaignError.of(N_("no such language: %(langs)s"), langs=", ".join(unknown))
    url = _cta(draft.url, settings)
    if draft.item_ref:
        if texts:
            raise CampaignError.of(N_("an alert is made from a portal item or from text, not both"))
        same = [item for item in current if item.guid == draft.item_ref]
        item = same[0] if same else find_item(session, draft.item_ref)
        return _Content("", "", "", {}, {}, [item])
    if default not in texts:
        raise CampaignError.of(
            N_("an alert needs a portal item, or a title in %(lang)s"), lang=default
        )
    base_url = url or settings.web.base_url
    rendered = {lang: _language(lang, t, base_url) for lang, t in texts.items()}
    source = {lang: {"title": t.title, "body": t.body} for lang, t in texts.items()}
    own = rendered.pop(default)
    return _Content(own["title"], own["body_html"], url, rendered, source, [])


def _language(lang: str, text: LanguageText, base_url: str) -> dict[str, str]:
    title = clean_text(text.title, max_length=TITLE_MAX_CHARS)
    if not title:
        raise CampaignError.of(N_("the %(lang)s text has no title"), lang=lang)
    return {"title": title, "body_html": markdown_to_html(text.body, base_url=base_url)}


def _cta(url: str, settings: Settings) -> str:
    if not url.strip():
        return ""
    cleaned = clean_url(url.strip(), base_url=settings.web.base_url)
    if not cleaned:
        raise CampaignError.of(N_("the call-to-action link must be an http or https address"))
    return cleaned


def _apply(campaign: Campaign, content: _Content) -> None:
    campaign.title = content.title
    campaign.body_html = content.body_html
    campaign.url = content.url
    campaign.translations = content.translations
    campaign.source_text = content.source_text
    campaign.items = content.items


def _segment_id(session: Session, segment: str | None) -> int | None:
    return get_segment(session, segment).id if segment else None
