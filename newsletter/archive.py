"""The archive: the public web copy of every sent campaign, the list of them, and their Atom feed.

A web copy is the variant's own rendered HTML, as every recipient got it, with nothing personal
in it: the variant is rendered once for everyone (render.py), so its only personal parts are the
two link markers, and the footer paragraph holding them is replaced by a link to /subscribe and a
note on unsubscribing from the email itself. The header's "Open in a browser" paragraph, which
names this page with the main host's address, gives way to a bar of relative links (to the
archive, the form and the mirrors), so a mirror serving the same app serves the same page.

A campaign is public once it has started sending (running, paused or finished), unless it was
kept out (Campaign.archived false, `alert send --no-archive`), is a training alert, or is an
alert while [archive] include_alerts is off. Drafts, scheduled and held alerts never are.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from xml.sax.saxutils import escape, quoteattr

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from newsletter.config import Settings
from newsletter.db.models import Campaign, CampaignKind, CampaignStatus, Variant
from newsletter.render import link_markers
from newsletter.render import web_copy_url as web_copy_url  # where emails link to

PUBLIC_STATUSES = (CampaignStatus.RUNNING, CampaignStatus.PAUSED, CampaignStatus.FINISHED)
# The class of the header paragraph with the "Open in a browser" link (email/partials/header).
WEB_COPY_CLASS = 'class="webcopy'
_NAMESPACE = uuid.UUID("6f1d7c3a-2b7e-4f63-9a52-4c1f0e2d9b10")


@dataclass(frozen=True)
class Entry:
    """One campaign in the archive, in one language."""

    slug: str
    kind: str
    subject: str
    sent_at: datetime
    finished: bool


def is_public(campaign: Campaign, settings: Settings) -> bool:
    """Whether a campaign has a web copy anyone may read."""
    return (
        settings.archive.enabled
        and campaign.archived
        and not campaign.training
        and campaign.slug is not None
        and campaign.started_at is not None
        and campaign.status in PUBLIC_STATUSES
        and (settings.archive.include_alerts or campaign.kind != CampaignKind.ALERT)
    )


def _public(settings: Settings) -> Select[Campaign, Variant]:
    stmt = (
        select(Campaign, Variant)
        .join(Variant, Variant.campaign_id == Campaign.id)
        .where(
            Campaign.archived.is_(True),
            Campaign.training.is_(False),
            Campaign.slug.is_not(None),
            Campaign.started_at.is_not(None),
            Campaign.status.in_(PUBLIC_STATUSES),
        )
    )
    if not settings.archive.include_alerts:
        stmt = stmt.where(Campaign.kind != CampaignKind.ALERT)
    return stmt


def list_entries(
    session: Session, *, lang: str, page: int, settings: Settings
) -> tuple[list[Entry], bool]:
    """One page of the archive in a language, newest first; and whether older pages follow."""
    size = settings.archive.page_size
    rows = session.execute(
        _public(settings)
        .where(Variant.lang == lang)
        .order_by(Campaign.started_at.desc(), Campaign.id.desc())
        .offset((page - 1) * size)
        .limit(size + 1)
    ).all()
    entries = [_entry(c, v) for c, v in rows[:size]]
    return entries, len(rows) > size


def latest_change(session: Session, *, settings: Settings) -> datetime | None:
    """When the archive last changed (a campaign started or finished), for the feed's date."""
    stmt = _public(settings).with_only_columns(
        func.max(func.coalesce(Campaign.finished_at, Campaign.started_at))
    )
    value = session.scalar(stmt)
    return value if isinstance(value, datetime) else None


def find_copy(
    session: Session, *, slug: str, lang: str, settings: Settings
) -> tuple[Entry, Variant] | None:
    """A public campaign's variant in a language, or None."""
    if not settings.archive.enabled:
        return None
    row = session.execute(
        _public(settings).where(Campaign.slug == slug, Variant.lang == lang)
    ).first()
    return None if row is None else (_entry(row[0], row[1]), row[1])


def _entry(campaign: Campaign, variant: Variant) -> Entry:
    sent = campaign.started_at or campaign.created_at
    finished = campaign.status == CampaignStatus.FINISHED
    return Entry(campaign.slug or "", campaign.kind, variant.subject, sent, finished)


def make_web_copy(html: str, nonce: str, *, note_html: str, banner_html: str) -> str:
    """The variant's HTML without the reader's links, the header's self-link, with a bar on top.

    `note_html` takes the place of the footer paragraph that holds the two personal links (its
    own opening tag, with the email's styles, is kept); `banner_html` goes first in the body.
    Plain string search for our own markers and class, in text our templates produced.
    """
    markers = link_markers(nonce)
    first = html.find(markers["unsubscribe"])
    second = html.find(markers["preferences"])
    start = html.rfind("<p", 0, min(first, second)) if first >= 0 and second >= 0 else -1
    end = html.find("</p>", max(first, second)) if start >= 0 else -1
    if start >= 0 and end >= 0 and "<p" not in html[start + 2 : end]:
        opening = html[start : html.find(">", start) + 1]
        html = html[:start] + opening + note_html + html[end:]
    for marker in markers.values():  # anywhere else (never, by the pre-send check): inert
        html = html.replace(marker, "#")
    html = _drop_self_link(html)
    body = html.find("<body")
    body_end = html.find(">", body) + 1 if body >= 0 else 0
    return html[:body_end] + banner_html + html[body_end:]


def _drop_self_link(html: str) -> str:
    """Remove the header's "Open in a browser" paragraph (looked for before the first heading,
    where no feed or staff text comes)."""
    head_end = html.find("<h1")
    at = html.find(WEB_COPY_CLASS, 0, head_end if head_end >= 0 else len(html))
    if at < 0:
        return html
    start = html.rfind("<p", 0, at)
    end = html.find("</p>", at)
    if start < 0 or end < 0:
        return html
    return html[:start] + html[end + len("</p>") :]


def atom_feed(
    entries: list[Entry], *, lang: str, title: str, author: str, updated: datetime | None
) -> str:
    """An Atom 1.0 feed of archive entries; links relative to the feed's own URL (mirrors)."""
    stamp = (updated or datetime(2000, 1, 1, tzinfo=UTC)).isoformat()
    feed_id = uuid.uuid5(_NAMESPACE, f"archive:{lang}").urn
    parts = [
        '<?xml version="1.0" encoding="utf-8"?>\n',
        f'<feed xmlns="http://www.w3.org/2005/Atom" xml:lang={quoteattr(lang)}>\n',
        f"<id>{feed_id}</id>\n<title>{escape(title)}</title>\n<updated>{stamp}</updated>\n",
        f"<author><name>{escape(author)}</name></author>\n",
        f'<link rel="self" type="application/atom+xml" href="feed.xml?lang={lang}"/>\n',
        f'<link rel="alternate" type="text/html" href="../archive?lang={lang}"/>\n',
    ]
    for e in entries:
        entry_id = uuid.uuid5(_NAMESPACE, f"campaign:{e.slug}:{lang}").urn
        parts.append(
            f"<entry>\n<id>{entry_id}</id>\n<title>{escape(e.subject)}</title>\n"
            f"<updated>{e.sent_at.isoformat()}</updated>\n"
            f"<published>{e.sent_at.isoformat()}</published>\n"
            f'<link rel="alternate" type="text/html" href={quoteattr(f"{e.slug}/{lang}")}/>\n'
            f"<category term={quoteattr(e.kind)}/>\n"
            f"<summary>{escape(e.subject)}</summary>\n</entry>\n"
        )
    parts.append("</feed>\n")
    return "".join(parts)


# --- a discreet reader's web copy (/w/TOKEN) -------------------------------------------------


def find_campaign_copy(
    session: Session, *, campaign_id: int, lang: str, default_lang: str
) -> tuple[Entry, Variant] | None:
    """A launched campaign's variant in a language (else the default language's), or None.

    Unlike find_copy, whether the campaign is public does not matter: the signed link is the
    authority. Never a draft, a scheduled or a cancelled campaign.
    """
    campaign = session.get(Campaign, campaign_id)
    if campaign is None or campaign.started_at is None or campaign.status not in PUBLIC_STATUSES:
        return None
    for wanted in (lang, default_lang):
        variant = session.scalar(
            select(Variant).where(Variant.campaign_id == campaign.id, Variant.lang == wanted)
        )
        if variant is not None:
            return _entry(campaign, variant), variant
    return None


def make_discreet_copy(html: str, nonce: str, *, note_html: str, title: str) -> str:
    """The web copy without the archive's bar, and with a neutral <title>.

    The email's <title> is its subject, which may name the portal. Plain string search for the
    first <title> element, which our own email head (templates/email/partials/head) put there.
    """
    html = make_web_copy(html, nonce, note_html=note_html, banner_html="")
    start = html.find("<title>")
    end = html.find("</title>", start)
    if start >= 0 and end >= 0:
        return html[: start + len("<title>")] + escape(title) + html[end:]
    head = html.find("<head>")
    if head >= 0:
        at = head + len("<head>")
        return html[:at] + f"<title>{escape(title)}</title>" + html[at:]
    return html
