"""A campaign rendered once per language: the template data, the rendering, the stored variants."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete
from sqlalchemy.orm import Session

from newsletter.assemble import items_for_language
from newsletter.case_view import CaseView, make_case_view
from newsletter.config import Settings
from newsletter.db.models import Campaign, CampaignKind, CaseMessage, MailingList, Variant
from newsletter.render import (
    CampaignView,
    ItemView,
    RenderedVariant,
    render_variant,
    without_wrote,
)


def campaign_view(
    campaign: Campaign,
    lang: str,
    default_lang: str = "en",
    *,
    zone: str = "Europe/Minsk",
    public: bool = False,
) -> CampaignView:
    """The plain data a template needs in one language, taken from a campaign and its items.

    A digest carries the items of the reader's language's feeds (see items_for_language); a
    staff alert its text in the reader's language, else the default one's (alert_text); a
    case's message its case (case_view.py), `public` for the archive's copy.
    """
    ml: MailingList = campaign.mailing_list
    title, body_html, text_lang = alert_text(campaign, lang, default_lang)
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
        title=title,
        body_html=body_html,
        url=campaign.url,
        issued_at=campaign.created_at,
        text_lang=text_lang,
        # No "Open in a browser" link for a campaign kept out of the archive.
        slug=(campaign.slug or "") if campaign.archived and not campaign.training else "",
        case=_case(campaign, lang, default_lang, zone=zone, public=public),
    )


def _case(
    campaign: Campaign, lang: str, default_lang: str, *, zone: str, public: bool
) -> CaseView | None:
    message = campaign.case_message
    if message is None:
        return None
    return make_case_view(
        message.case, message, lang=lang, default_lang=default_lang, zone=zone, public=public
    )


def alert_text(campaign: Campaign, lang: str, default_lang: str) -> tuple[str, str, str]:
    """(title, body_html, language written in) of staff text for a reader of `lang`.

    The campaign's own title and body are the default language's; a console alert keeps the
    others in translations. A language without one gets the default language's text, and its
    language ("" when it is the reader's, or for an alert from the CLI, written in one language).
    """
    own = (campaign.translations or {}).get(lang)
    if lang == default_lang or own:
        chosen = own or {}
        return chosen.get("title", campaign.title), chosen.get("body_html", campaign.body_html), ""
    marked = default_lang if campaign.source_text else ""
    return campaign.title, campaign.body_html, marked


def render_campaign(
    campaign: Campaign, *, settings: Settings, public: bool = False
) -> list[RenderedVariant]:
    """Render a campaign once for each configured language (never per recipient)."""
    return [
        render_variant(
            campaign_view(
                campaign,
                lang,
                settings.render.default_language,
                zone=settings.schedule.timezone,
                public=public,
            ),
            lang=lang,
            settings=settings,
        )
        for lang in settings.render.languages
    ]


def store_case_copies(session: Session, campaign: Campaign, settings: Settings) -> None:
    """Render and keep a case message's public web copies (initials, no reader's link)."""
    message = session.get(CaseMessage, campaign.id)
    if message is None:
        return
    copies = render_campaign(campaign, settings=settings, public=True)
    message.copies = {v.lang: without_wrote(v, keep=False).html for v in copies}
    session.flush()


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
