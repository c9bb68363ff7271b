"""The archive: the public web copy of every sent campaign, the list of them, and their Atom feed.

A web copy is the variant's own rendered HTML, as every recipient got it, with nothing personal
in it: the variant is rendered once for everyone (render.py), so its only personal parts are the
two link markers, and the footer paragraph holding them is replaced by a link to /subscribe and a
note on unsubscribing from the email itself. The header's "Open in a browser" paragraph, which
names this page with the main host's address, gives way to a bar of relative links (to the
archive, the form and the mirrors), so a mirror serving the same app serves the same page.

A message of an urgent-action case is shown from its public copy (CaseMessage.copies: the person
named by initials when their name is not to be published, no "I sent my letter" section), with
where the case stands now (CaseState) for a box on top; every copy, the discreet one too, is cut of
the "I sent my letter" section a variant carries (render.without_wrote).

A campaign is public once it has started sending (running, paused or finished), unless it was
kept out (Campaign.archived false, `alert send --no-archive`), is a training alert, or is an
alert while [archive] include_alerts is off. Drafts, scheduled and held alerts never are.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from xml.sax.saxutils import escape, quoteattr

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from newsletter.cases import wrote_count
from newsletter.config import Settings
from newsletter.db.models import (
    Campaign,
    CampaignKind,
    CampaignStatus,
    CaseMessage,
    CaseRole,
    Variant,
)
from newsletter.render import (
    RenderedVariant,
    link_markers,
    misplaced_links,
    without_wrote,
    wrote_section,
)
from newsletter.render import web_copy_url as web_copy_url  # where emails link to

PUBLIC_STATUSES = (CampaignStatus.RUNNING, CampaignStatus.PAUSED, CampaignStatus.FINISHED)
# The start of the header paragraph with the "Open in a browser" link (email/partials/header), as
# premailer writes it: the class first, then the inlined style.
WEB_COPY_TAG = '<p class="webcopy fine"'
_NAMESPACE = uuid.UUID("6f1d7c3a-2b7e-4f63-9a52-4c1f0e2d9b10")
# The unsubscribe marker of a render (render.link_markers: a nonce of 32 hex digits). Linear: a
# literal, one bounded class, a literal; and it runs on a copy our templates rendered.
_UNSUBSCRIBE_MARKER = re.compile(r"%%UNSUBSCRIBE_URL_([0-9a-f]{32})%%")


@dataclass(frozen=True)
class Entry:
    """One campaign in the archive, in one language."""

    slug: str
    kind: str
    subject: str
    sent_at: datetime
    finished: bool


@dataclass(frozen=True)
class CaseLink:
    """Another message of the case, public: what it is, and its web copy's name."""

    role: str  # first | update | reminder | closing
    number: int  # the update's number; 0 otherwise
    slug: str


@dataclass(frozen=True)
class CaseState:
    """Where a case stands as its web copy is served (not as it stood when the message went)."""

    reference: str
    status: str  # draft | open | updated | closed
    outcome: str  # "" | released | improved | no-change | no-further-action
    updates: int  # how many updates went out
    deadline: date | None
    wrote: int  # how many readers said they sent their letter
    others: tuple[CaseLink, ...]  # the case's other public messages, oldest first


@dataclass(frozen=True)
class WebCopy:
    """What a web copy is made of: the HTML, its markers' nonce, and the case's state if any."""

    entry: Entry
    html: str
    nonce: str
    case: CaseState | None = None


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


def find_web_copy(session: Session, *, slug: str, lang: str, settings: Settings) -> WebCopy | None:
    """A public campaign's web copy in a language; a case's message from its public copy.

    A case's message with no public copy in that language (one made before copies were kept)
    falls back to the variant only when the person may be named: the variant is the email, with
    their full name; otherwise there is no copy.
    """
    found = find_copy(session, slug=slug, lang=lang, settings=settings)
    if found is None:
        return None
    entry, variant = found
    message = session.get(CaseMessage, variant.campaign_id)
    if message is None:
        return WebCopy(entry, variant.html, variant.link_nonce)
    public = (message.copies or {}).get(lang)
    if public:
        html, nonce = public, copy_nonce(public)
    elif message.case.person_public:
        html, nonce = variant.html, variant.link_nonce
    else:
        return None
    return WebCopy(entry, html, nonce, case_state(session, message, settings=settings))


def copy_nonce(html: str) -> str:
    """The nonce of a stored public copy's markers (CaseMessage.copies keeps the HTML only).

    The one whose unsubscribe and preferences markers each stand once, as the whole href of a
    link: feed and staff text cannot put a marker there (its links are made absolute), so a
    marker-like string in it is never taken; the footer, last, is tried first. "" when none is.
    """
    found: list[str] = _UNSUBSCRIBE_MARKER.findall(html)
    for nonce in reversed(dict.fromkeys(found)):
        if link_markers(nonce)["preferences"] not in html:
            continue
        if not misplaced_links(RenderedVariant("", "", html, "", nonce)):
            return nonce
    return ""


def case_state(session: Session, message: CaseMessage, *, settings: Settings) -> CaseState:
    """The case of a message as it stands now, with its other public messages."""
    case = message.case
    rows = session.execute(
        select(CaseMessage, Campaign)
        .join(Campaign, Campaign.id == CaseMessage.campaign_id)
        .where(CaseMessage.case_id == case.id)
        .order_by(CaseMessage.campaign_id)
    ).all()
    updates = sum(
        1
        for m, c in rows
        if m.role == CaseRole.UPDATE and c.started_at is not None and c.status in PUBLIC_STATUSES
    )
    others = tuple(
        CaseLink(m.role, m.number, c.slug or "")
        for m, c in rows
        if c.id != message.campaign_id and is_public(c, settings)
    )
    return CaseState(
        reference=case.reference,
        status=case.status,
        outcome=case.outcome,
        updates=updates,
        deadline=case.deadline,
        wrote=wrote_count(session, case.id),
        others=others,
    )


def _entry(campaign: Campaign, variant: Variant) -> Entry:
    sent = campaign.started_at or campaign.created_at
    finished = campaign.status == CampaignStatus.FINISHED
    return Entry(campaign.slug or "", campaign.kind, variant.subject, sent, finished)


def make_web_copy(html: str, nonce: str, *, note_html: str, banner_html: str) -> str:
    """The variant's HTML without the reader's links, the header's self-link, with a bar on top.

    `note_html` takes the place of the footer paragraph that holds the two personal links (its
    own opening tag, with the email's styles, is kept); `banner_html` goes first in the body.
    The "I sent my letter" section a case's first message carries is cut out whole (only the
    template's own, between the markers with this render's nonce). Plain string search for our
    own markers and class, in text our templates produced.
    """
    if nonce:
        html = without_wrote(RenderedVariant("", "", html, "", nonce), keep=False).html
        for lone in wrote_section(nonce):  # a marker without its pair (never, by the template)
            html = html.replace(lone, "")
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
    """Remove the header's "Open in a browser" paragraph: the first paragraph of the body that
    opens with the template's own start tag."""
    # The whole start tag, in the body only: feed text is in <head> too (the subject in <title>,
    # its quotes as written) but its "<" is "&lt;" everywhere, so it can never make a start tag.
    body = html.find("<body")
    at = html.find(WEB_COPY_TAG, body) if body >= 0 else -1
    end = html.find("</p>", at) if at >= 0 else -1
    if end < 0:
        return html
    return html[:at] + html[end + len("</p>") :]


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
