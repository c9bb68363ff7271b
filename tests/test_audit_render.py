"""Audit of the render path: hostile feed items and staff text, made into email parts."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import html as lxml_html
from sqlalchemy.orm import Session, sessionmaker

from newsletter.config import Settings
from newsletter.markdown import markdown_to_html
from newsletter.render import CampaignView, ItemView, RenderedVariant, render_variant
from newsletter.sanitize import clean_html, clean_url, html_depth
from tests.test_hostile_to_email import ingested_views

BASE = "https://portal.example.org/"
# Bidi embeddings, overrides and isolates: each shows the text after it in another order.
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# Reversed, this reads "https://portal.example.org/login": under an override, it is shown so.
SPOOFED_LABEL = "\u202enigol/gro.elpmaxe.latrop//:sptth"
FEED = f"""<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>Hostile</title><link>{BASE}</link><description>t</description>
<item>
<title>Sign in to keep your subscription</title>
<link>https://portal.example.org@evil.example/item</link>
<guid isPermaLink="false">hostile-1</guid>
<pubDate>Wed, 04 Mar 2026 08:00:00 +0000</pubDate>
<description><![CDATA[<p>Sign in at <a href="https://evil.example/#/nigol/gro.elpmaxe.latrop//:sptth">{SPOOFED_LABEL}</a>
or at <a href="https://staff:hunter2@portal.example.org@evil.example/login">our page</a>;
\u2067quoted\u2069 text.</p>]]></description>
</item>
</channel></rss>
"""


def ingest(factory: sessionmaker[Session], tmp_path: Path) -> ItemView:
    """The one item of the hostile feed, ingested (sanitised) and read back as a render view."""
    feed = tmp_path / "feed.xml"
    feed.write_text(FEED, encoding="utf-8")
    (view,) = ingested_views(factory, feed)
    return view


def rendered(item: ItemView) -> list[RenderedVariant]:
    """The item as a digest and as an alert."""
    return [
        render_variant(
            CampaignView(kind=kind, list_name="L", items=(item,)), lang="en", settings=Settings()
        )
        for kind in ("digest", "alert")
    ]


def test_bidi_overrides_in_a_feed_summary_never_reach_the_email(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """Attack: a feed summary whose link text starts with U+202E (RLO), so that the reversed
    text reads as the portal's address in the HTML, and the plain-text part, which writes each
    link's target after its text, shows that target reversed under the same override. Titles
    lost these characters; summaries kept them. Now no bidi embedding, override or isolate
    reaches either part, and the written-out target reads in its true order."""
    item = ingest(factory, tmp_path)
    assert not set(BIDI) & set(item.summary_html)
    for variant in rendered(item):
        for part in (variant.html, variant.text):
            assert not set(BIDI) & set(part)
        flat = " ".join(variant.text.split())  # the text part is wrapped
        assert "nigol/gro.elpmaxe.latrop//:sptth (https://evil.example/#/" in flat


def test_credentials_are_dropped_from_feed_links(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """Attack: links "https://portal.example.org@evil.example/..." (and a user and password
    before the host), which read as the portal's address but lead to evil.example. They were
    kept as they were, in hrefs and in the plain-text part. Now what stands before the last "@"
    is dropped: the link names the host it leads to, and carries no credentials."""
    item = ingest(factory, tmp_path)
    assert item.link == "https://evil.example/item"
    for variant in rendered(item):
        assert "@evil.example" not in variant.html + variant.text
        assert "hunter2" not in variant.html + variant.text
        hrefs = lxml_html.document_fromstring(variant.html).xpath("//a/@href")
        assert "https://evil.example/login" in hrefs
        assert "https://evil.example/item" in hrefs
        assert "(https://evil.example/login)" in " ".join(variant.text.split())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "https://portal.example.org@evil.example/x", "https://evil.example/x", id="user"
        ),
        pytest.param(
            "http://a:b@c@evil.example:8080/?q=@#@", "http://evil.example:8080/?q=@#@", id="two-at"
        ),
        pytest.param("https://user@/x", "", id="no-host-after-credentials"),
        pytest.param(
            "https://portal.example.org\\@evil.example/", "", id="backslash-still-refused"
        ),
        pytest.param("mailto:info@portal.example.org", "", id="mailto-is-no-web-link"),
    ],
)
def test_clean_url_drops_credentials(url: str, expected: str) -> None:
    """Attack: credentials before a URL's host. Now dropped; the host is what follows the last
    "@", as browsers take it; a URL with nothing after it, or a backslash, is still refused."""
    assert clean_url(url, base_url=BASE) == expected


def test_mailto_links_keep_their_address() -> None:
    """The credentials rule is for web links: a mailto: link's "@" is its address."""
    out = clean_html('<a href="mailto:info@portal.example.org">m</a>', base_url=BASE)
    assert 'href="mailto:info@portal.example.org"' in out


def test_other_format_characters_stay_in_html() -> None:
    """Only the reordering controls go: a ZWJ emoji sequence and a soft hyphen are kept."""
    text = "<p>\U0001f469\u200d\U0001f4bb Бя\u00adляцкі \u200eok</p>"
    assert clean_html(text, base_url=BASE) == text


NESTED_LIST = "".join("  " * depth + f"- level {depth}\n" for depth in range(14))
NESTED_QUOTE = "> " * 30 + "the deepest **words**\n"


@pytest.mark.parametrize(
    ("markdown", "deep"),
    [
        pytest.param(NESTED_LIST, "level 13", id="list"),
        pytest.param(NESTED_QUOTE, "the deepest", id="quote"),
        pytest.param("- " * 40 + "the deepest item", "the deepest item", id="list-markers"),
    ],
)
def test_staff_text_nested_past_the_limit_is_kept(markdown: str, deep: str) -> None:
    """Attack (or a careful outline): staff Markdown nested past markdown-it's maxNesting.
    markdown-it skipped the rest of the range: the deepest text vanished, and with a list, every
    paragraph after it too, silently, from the alert. Now the deeper lines stay, as text, and
    the HTML still nests no deeper than the cap."""
    body = markdown_to_html(markdown + "\nThe closing paragraph.", base_url=BASE)
    assert deep in body
    assert "<p>The closing paragraph.</p>" in body
    assert html_depth(body) <= 45
    alert = CampaignView(kind="alert", list_name="L", items=(), title="Act now", body_html=body)
    variant = render_variant(alert, lang="en", settings=Settings())
    for part in (variant.html, " ".join(variant.text.split())):
        assert deep in part and "The closing paragraph." in part
