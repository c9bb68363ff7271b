"""Feed text fields from the feed to the email: an Atom "text" field is shown as written, an HTML
one loses its tags however often it was escaped, and an ordered list keeps its numbers in the
plain-text part. Feeds are served over HTTP, ingested into SQLite and PostgreSQL and rendered."""

from __future__ import annotations

import re
from datetime import timedelta
from html import escape

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert, assemble_digest
from newsletter.clock import FrozenClock
from newsletter.config import SourcesSettings
from newsletter.db import unit_of_work
from newsletter.db.models import Item
from newsletter.htmltext import html_to_text, wrap_text
from newsletter.ingest import ingest_all
from newsletter.lists import read_lists, sync_lists
from newsletter.render import RenderedVariant
from newsletter.sanitize import clean_text
from newsletter.variants import render_campaign
from tests.conftest import FeedHttp, make_settings, rss
from tests.test_web import ROOT

SITE = "https://portal.example.org"
TITLE = "Verdict: 5 years <Article 342> for Viasna lawyer"
SUMMARY = (
    'The court cited <Article 342> and <b>"extremism"; sentences of 3<n<5 years. '
    f'Tip: <a href="{SITE}/donate">donate</a>'
)
HOSTILE = "<script>alert(1)</script><img src=x>Hi"
# The start of a tag in text we rendered: one literal and one class, linear.
TAG = re.compile(r"<[A-Za-z/!?]")


def atom(entries: str) -> bytes:
    """An Atom 1.0 feed around the given entries."""
    return (
        '<?xml version="1.0" encoding="utf-8"?><feed xmlns="http://www.w3.org/2005/Atom">'
        f'<title>Portal</title><id>urn:portal</id><link href="{SITE}/"/>'
        f"<updated>2026-11-23T08:00:00Z</updated>{entries}</feed>"
    ).encode()


def entry(n: int, title: str, summary: str, kind: str | None, category: str = "") -> str:
    """An Atom entry whose title and summary have the given type (None: no type attribute)."""
    typed = f' type="{kind}"' if kind else ""
    term = f'<category term="{escape(category)}"/>' if category else ""
    return (
        f"<entry><id>urn:item-{n}</id><title{typed}>{escape(title)}</title>"
        f'<link href="{SITE}/{n}"/><updated>2026-11-23T08:00:00Z</updated>{term}'
        f"<summary{typed}>{escape(summary)}</summary></entry>"
    )


def ingest(factory: sessionmaker[Session], clock: FrozenClock, feed_http: FeedHttp) -> None:
    """Ingest every document feed_http serves; each must be taken."""
    sources = [(f"{feed_http.base}{path}", path, "en") for path in feed_http.documents]
    settings = SourcesSettings(timeout_seconds=5.0)
    reports = ingest_all(factory=factory, sources=sources, settings=settings, clock=clock)
    assert all(r.error is None for r in reports), [r.error for r in reports]


def items(factory: sessionmaker[Session]) -> dict[str, Item]:
    """The stored items by link."""
    with unit_of_work(factory) as session:
        found = list(session.scalars(select(Item)))
        session.expunge_all()
    return {item.link: item for item in found}


def alert(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str, link: str
) -> RenderedVariant:
    """The English variant of an urgent alert about the item with this link."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        campaign, _ = assemble_alert(
            session=session, list_slug="urgent-actions", now=clock.now(), actor="t", item_ref=link
        )
        variants = render_campaign(campaign, settings=make_settings(database_url))
    return next(v for v in variants if v.lang == "en")


def digest(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> RenderedVariant:
    """The English variant of the weekly digest of everything ingested."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="t"
        )
        assert campaign is not None
        variants = render_campaign(campaign, settings=make_settings(database_url))
    return next(v for v in variants if v.lang == "en")


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_atom_text_fields_are_shown_as_written(
    factory: sessionmaker[Session], clock: FrozenClock, feed_http: FeedHttp, database_url: str
) -> None:
    """type="text" (and no type, its default) is plain text (RFC 4287 3.1.1.1): "<" in it is a
    character, kept in the subject and text part and escaped in the HTML. type="html" stays
    HTML: its title loses its tags, its summary keeps the allowed ones."""
    feed_http.documents["/atom"] = atom(
        entry(1, TITLE, SUMMARY, "text", category="Courts <Minsk>")
        + entry(2, "Appeal <denied> & more", "Plain <i>as</i> written", None)
        + entry(3, "Ales Bialiatski <em>released</em>!", "<p>Free <b>at last</b>.</p>", "html")
    )
    ingest(factory, clock, feed_http)
    stored = items(factory)
    text, untyped, html_ = (stored[f"{SITE}/{n}"] for n in (1, 2, 3))
    assert text.title == TITLE
    assert "&lt;Article 342&gt;" in text.summary_html and "<b>" not in text.summary_html
    assert "<a " not in text.summary_html and "&lt;n&lt;5 years" in text.summary_html
    assert list(text.categories) == ["Courts <Minsk>"]
    assert untyped.title == "Appeal <denied> & more"
    assert untyped.summary_html == "Plain &lt;i&gt;as&lt;/i&gt; written"
    assert html_.title == "Ales Bialiatski released!"
    assert html_.summary_html == "<p>Free <b>at last</b>.</p>"

    variant = alert(factory, clock, database_url, f"{SITE}/1")
    assert TITLE in variant.subject
    assert TITLE in variant.text
    assert one_line(SUMMARY) in one_line(variant.text)
    assert "&lt;Article 342&gt;" in variant.html and "<Article 342>" not in variant.html
    assert '<b>"extremism"' not in variant.html and f'<a href="{SITE}/donate"' not in variant.html


def test_html_titles_escaped_any_number_of_times_carry_no_tags(
    factory: sessionmaker[Session], clock: FrozenClock, feed_http: FeedHttp, database_url: str
) -> None:
    """An RSS title, category and guid escaped up to six times over (past the three unescaping
    rounds) never bring a tag into what is stored, a subject or the plain-text part."""
    hostile = []
    for depth in range(1, 7):
        value = HOSTILE
        for _ in range(depth):
            value = escape(value, quote=False)
        hostile.append(
            {
                "title": f"Depth {depth} {value}",
                "link": f"{SITE}/depth-{depth}",
                "guid": f"g{depth}-{value}",
                "date": clock.now() - timedelta(hours=depth),
                "categories": [f"c{depth}-{value}"],
            }
        )
    feed_http.documents["/rss"] = rss(hostile)
    ingest(factory, clock, feed_http)
    stored = items(factory).values()
    assert len(stored) == 6
    for item in stored:
        for value in (item.title, item.guid, *item.categories):
            assert not TAG.search(value), value
    texts = [digest(factory, clock, database_url).text]
    for depth in (4, 5, 6):
        variant = alert(factory, clock, database_url, f"{SITE}/depth-{depth}")
        assert f"Depth {depth}" in variant.subject
        texts += [variant.subject, variant.text]
    for text in texts:
        assert "<script" not in text and "<img" not in text and "alert(1)</" not in text


def test_clean_text_leaves_no_tag_at_any_depth() -> None:
    """However often markup was escaped, clean_text's line has no tag; shallow escaping is
    still undone ("&amp;" three times over is one "&")."""
    for depth in range(8):
        value = HOSTILE
        for _ in range(depth):
            value = escape(value, quote=False)
        assert not TAG.search(clean_text(value, max_length=300)), depth
    assert clean_text("Tom &amp;amp;amp; Jerry", max_length=300) == "Tom & Jerry"


def test_ordered_lists_keep_their_numbers_in_the_text_part(
    factory: sessionmaker[Session], clock: FrozenClock, feed_http: FeedHttp, database_url: str
) -> None:
    """An <ol> item is "1. ", "2. " … in the text part, wrapped under its own text; a <ul> in it
    keeps its "- " bullets, and the numbering goes on after it."""
    summary = (
        "<p>What to do:</p><ol><li>Write to the prison</li><li>Send a copy to the court in "
        "Minsk, by registered post, and keep the receipt for the case file</li></ol>"
    )
    item = {"title": "Ordered", "link": f"{SITE}/o", "guid": "o", "date": clock.now()}
    feed_http.documents["/rss"] = rss([{**item, "summary": summary}])
    ingest(factory, clock, feed_http)
    text = alert(factory, clock, database_url, f"{SITE}/o").text
    assert "1. Write to the prison" in text
    assert "\n2. Send a copy to the court in Minsk," in text
    second = text[text.index("2. Send") :].split("\n")
    assert second[1].startswith("   ") and not second[1].startswith("    "), second
    assert "- Write" not in text and "- Send" not in text

    nested = "<ol><li>a<ul><li>b</li><li>c</li></ul></li><li>d</li></ol><ol><li>e</li></ol>"
    assert html_to_text(nested) == "1. a\n\n- b\n\n- c\n\n2. d\n\n1. e"
    wrapped = wrap_text("12. " + "word " * 20, width=30).split("\n")
    assert all(line.startswith("    word") for line in wrapped[1:]), wrapped
