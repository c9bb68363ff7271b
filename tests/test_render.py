"""Tests for render.py: one campaign, one language → subject, responsive HTML and plain text."""

from __future__ import annotations

import dataclasses
import re
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from lxml import html as lxml_html

from newsletter.config import Settings
from newsletter.errors import RenderError
from newsletter.htmltext import html_to_text, shorten_html
from newsletter.i18n import LOCALE_DIR
from newsletter.render import (
    PREFERENCES_URL,
    UNSUBSCRIBE_URL,
    CampaignView,
    ItemView,
    RenderedVariant,
    _environment,
    compile_mjml,
    personalise,
    render_variant,
    warm_up,
)

LANGS = ("en", "be", "ru")
KINDS = ("digest", "alert")
CASES = [pytest.param(kind, lang, id=f"{kind}-{lang}") for kind in KINDS for lang in LANGS]
CATEGORIES = ("Viasna", "Statements", "Political prisoners", "")
SUMMARY = (
    "<p>On July 2 Štefan Füle met in Strasbourg with Ales Bialiatski, head of the Human Rights "
    'Centre “Viasna” &amp; Vice-President of <a href="https://www.fidh.org/en/">FIDH</a>.</p>'
    "<p>After this meeting, the European Commission published a statement&hellip;</p>"
)
LONG_URL = "https://portal.example.org/2014/07/" + "ales-bialiatski-meets-eu-commissioner-" * 3


def make_item(i: int, **changes: Any) -> ItemView:
    """One portal item, shaped like the ingested (sanitised) ones."""
    category = CATEGORIES[i % len(CATEGORIES)]
    item = ItemView(
        title=f"Ales Bialiatski visits Brussels and Strasbourg, part {i}",
        link=f"https://portal.example.org/2014/07/visit-{i}/?utm=none&part={i}",
        summary_html=SUMMARY,
        published_at=datetime(2014, 7, 2, 9, 30, tzinfo=UTC) - timedelta(hours=7 * i),
        categories=(category,) if category else (),
    )
    return dataclasses.replace(item, **changes)


def make_view(n_items: int, kind: str = "digest", **changes: Any) -> CampaignView:
    """A digest of n items, or an alert about the first of them."""
    items = tuple(make_item(i) for i in range(n_items))
    view = CampaignView(kind=kind, list_name="Weekly news", items=items)
    return dataclasses.replace(view, **changes)


def render(kind: str, lang: str, n_items: int = 5, **changes: Any) -> RenderedVariant:
    """Render a typical campaign with the embedded default settings."""
    view = make_view(n_items if kind == "digest" else 1, kind, **changes)
    return render_variant(view, lang=lang, settings=Settings())


def visible_text(page: str) -> str:
    """The text a reader sees in the HTML part."""
    return " ".join(lxml_html.document_fromstring(page).text_content().split())


@pytest.mark.parametrize(("kind", "lang"), CASES)
def test_html_declares_language_and_direction(kind: str, lang: str) -> None:
    """The <html> element carries the reader's language and the text direction."""
    variant = render(kind, lang)
    assert variant.lang == lang
    assert variant.html.startswith("<!DOCTYPE html>")
    assert f'<html lang="{lang}" dir="ltr"' in variant.html


@pytest.mark.parametrize("lang", LANGS)
def test_digest_of_20_items_is_under_100_kb(lang: str) -> None:
    """A 20-item digest stays well under Gmail's 102 KB clipping limit."""
    variant = render("digest", lang, n_items=20)
    assert len(variant.html.encode()) < 100_000


@pytest.mark.parametrize(("kind", "lang"), CASES)
def test_every_item_title_and_link_is_in_both_parts(kind: str, lang: str) -> None:
    """Each item's title and link appear in the HTML (escaped) and in the text part (in full)."""
    view = make_view(20 if kind == "digest" else 1, kind)
    variant = render_variant(view, lang=lang, settings=Settings())
    for item in view.items:
        assert item.title in visible_text(variant.html)
        assert f'href="{item.link.replace("&", "&amp;")}"' in variant.html
        assert item.title in variant.text
        assert item.link in variant.text


@pytest.mark.parametrize(("kind", "lang"), CASES)
def test_both_markers_are_in_html_links_and_text(kind: str, lang: str) -> None:
    """The unsubscribe and preferences markers survive MJML and premailer, in both parts."""
    variant = render(kind, lang)
    markers = variant.markers
    assert f'href="{markers["unsubscribe"]}"' in variant.html
    assert f'href="{markers["preferences"]}"' in variant.html
    assert markers["unsubscribe"] in variant.text
    assert markers["preferences"] in variant.text


@pytest.mark.parametrize(("kind", "lang"), CASES)
def test_html_loads_nothing_remote_and_runs_nothing(kind: str, lang: str) -> None:
    """No web fonts, scripts, stylesheets or images (tracking pixels) in the HTML."""
    page = render(kind, lang).html.lower()
    for needle in ("googleapis", "fonts.", "<script", "<img", "<link", "@import", "url("):
        assert needle not in page


@pytest.mark.parametrize(("kind", "lang"), CASES)
def test_render_opens_no_network_connection(
    kind: str, lang: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendering (MJML, premailer) works with every outgoing connection refused."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("render tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert render(kind, lang).html


@pytest.mark.parametrize(("kind", "lang"), CASES)
@pytest.mark.parametrize(
    "title",
    [
        pytest.param("Ales Bialiatski is free", id="short"),
        pytest.param("Free them all\r\nBcc: someone@example.org", id="crlf"),
        pytest.param("Free all political prisoners in Belarus now " * 8, id="long"),
    ],
)
def test_subject_is_one_line_under_150_chars(kind: str, lang: str, title: str) -> None:
    """The subject never contains CR/LF and stays under 150 characters."""
    subject = render(kind, lang, title=title, items=(make_item(0, title=title),)).subject
    assert "\n" not in subject and "\r" not in subject
    assert 0 < len(subject) < 150
    assert subject == " ".join(subject.split())


@pytest.mark.parametrize(
    ("kind", "lang", "expected"),
    [
        pytest.param(
            "digest", "en", "News from Ales Bialiatski: weekly digest, July 2, 2014", id="en"
        ),
        pytest.param("digest", "be", "штотыднёвы дайджэст, 2 ліпеня 2014", id="digest-be"),
        pytest.param("digest", "ru", "еженедельный дайджест, 2 июля 2014", id="digest-ru"),
        pytest.param("alert", "en", "Urgent action: Ales Bialiatski visits", id="alert-en"),
        pytest.param("alert", "be", "Тэрміновая акцыя: Ales Bialiatski", id="alert-be"),
        pytest.param("alert", "ru", "Срочная акция: Ales Bialiatski", id="alert-ru"),
    ],
)
def test_subject_is_localised(kind: str, lang: str, expected: str) -> None:
    """The subject is in the reader's language, with the date in their locale."""
    assert expected in render(kind, lang).subject


@pytest.mark.parametrize(("kind", "lang"), CASES)
def test_text_lines_fit_78_columns_except_urls(kind: str, lang: str) -> None:
    """Every text line fits 78 columns, unless it is a URL that cannot be broken."""
    long_item = make_item(0, link=LONG_URL, title="Bialiatski " * 20)
    variant = render(kind, lang, items=(long_item, *make_view(4).items[1:]))
    for line in variant.text.splitlines():
        assert len(line) <= 78 or re.fullmatch(r"https?://\S+", line), line
    assert LONG_URL in variant.text.splitlines()


def test_personalise_replaces_markers_and_escapes_html() -> None:
    """personalise() puts the URLs in, html-escaped in the HTML and verbatim in the text."""
    variant = render("digest", "en")
    unsubscribe = 'https://news.example.org/u/abc?list=1&lang="be"'
    preferences = "https://news.example.org/p/abc?x=<1>&y=2"
    page, text = personalise(variant, unsubscribe_url=unsubscribe, preferences_url=preferences)
    for body in (page, text):
        assert not any(marker in body for marker in variant.markers.values())
    assert 'href="https://news.example.org/u/abc?list=1&amp;lang=&quot;be&quot;"' in page
    assert 'href="https://news.example.org/p/abc?x=&lt;1&gt;&amp;y=2"' in page
    assert unsubscribe in text and preferences in text
    links = {a.get("href") for a in lxml_html.document_fromstring(page).iter("a")}
    assert {unsubscribe, preferences} <= links


@pytest.mark.parametrize(("kind", "lang"), CASES)
@pytest.mark.parametrize(
    "title",
    [
        pytest.param("<b>Bold</b> claims", id="tag"),
        pytest.param('He said "free" & <script>alert(1)</script>', id="quotes-script"),
    ],
)
def test_title_markup_is_escaped(kind: str, lang: str, title: str) -> None:
    """A title with tags or quotes shows as text and never becomes markup or breaks attributes."""
    variant = render(kind, lang, items=(make_item(0, title=title),))
    tree = lxml_html.document_fromstring(variant.html)
    assert "<b>Bold</b>" not in variant.html and "<script" not in variant.html
    assert title in visible_text(variant.html)
    assert tree.findtext(".//title") == variant.subject
    assert tree.xpath("//div[@aria-label]/@aria-label") == [variant.subject]
    assert title in variant.text


@pytest.mark.parametrize(("kind", "lang"), CASES)
def test_markers_in_feed_content_are_not_filled_in(kind: str, lang: str) -> None:
    """Markers smuggled into item text or links stay inert: only our links get personalised."""
    item = make_item(
        0,
        title=f"Win {UNSUBSCRIBE_URL}",
        link=f"https://evil.example/?t={UNSUBSCRIBE_URL}",
        summary_html=f'<p><a href="https://evil.example/?p={PREFERENCES_URL}">x</a></p>',
    )
    variant = render(kind, lang, items=(item,))
    page, text = personalise(variant, unsubscribe_url="https://u.example/T", preferences_url="P")
    for body in (page, text):
        assert "evil.example/?t=https://u.example/T" not in body
        assert "evil.example/?p=P" not in body
        assert "https://u.example/T" in body


def test_summary_html_becomes_readable_text() -> None:
    """Summaries lose their tags, keep paragraph breaks, decode entities and write links out."""
    text = html_to_text(
        '<p>Viasna &amp; FIDH&nbsp;say:<br>free\n  <a href="https://x.example/a">them</a>.</p>'
        "<ul><li>one</li><li>two</li></ul><p>Quote &laquo;ok&raquo;</p>"
    )
    assert text == (
        "Viasna & FIDH\xa0say:\nfree them (https://x.example/a).\n\n- one\n\n- two\n\nQuote «ok»"
    )


def test_digest_groups_items_by_first_category_in_order() -> None:
    """Items sit under their first category; groups keep the order items arrive in."""
    items = (
        make_item(0, categories=("Viasna", "News")),
        make_item(1, categories=("Statements",)),
        make_item(2, categories=("Viasna",)),
        make_item(3, categories=()),
    )
    text = render("digest", "en", items=items).text
    positions = [text.index(s) for s in ("Viasna\n", "part 0", "part 2", "Statements\n", "part 1")]
    assert positions == sorted(positions)
    assert text.index("More news\n") < text.index("part 3")


@pytest.mark.parametrize("lang", LANGS)
def test_staff_alert_without_item_has_title_body_and_button(lang: str) -> None:
    """An alert written by staff shows its title and body first, with a call-to-action button."""
    variant = render(
        "alert",
        lang,
        items=(),
        title="Write to Ales today",
        body_html="<p>Send a postcard &mdash; it matters.</p>",
        url="https://portal.example.org/act?now=1",
    )
    assert "Write to Ales today" in variant.subject
    page = visible_text(variant.html)
    assert page.index("Write to Ales today") < page.index("Send a postcard — it matters.")
    assert variant.html.count('href="https://portal.example.org/act?now=1"') == 2
    assert "https://portal.example.org/act?now=1" in variant.text


@pytest.mark.parametrize(
    ("mirror", "expected"),
    [
        pytest.param("", False, id="none"),
        pytest.param("https://mirror.example.net/", True, id="set"),
    ],
)
def test_mirror_link_only_when_configured(mirror: str, expected: bool) -> None:
    """The footer links to the mirror only when one is configured."""
    settings = Settings(brand=dataclasses.replace(Settings().brand, mirror_url=mirror))
    variant = render_variant(make_view(2), lang="en", settings=settings)
    assert ('href="https://mirror.example.net/"' in variant.html) is expected
    assert ("https://mirror.example.net/" in variant.text) is expected
    assert Settings().brand.postal_address in variant.text


@pytest.mark.parametrize(
    ("view", "lang"),
    [
        pytest.param(make_view(2, "newsletter"), "en", id="unknown-kind"),
        pytest.param(make_view(2), "de", id="unknown-language"),
        pytest.param(make_view(0), "en", id="empty-digest"),
        pytest.param(make_view(0, "alert"), "en", id="alert-without-item-or-title"),
    ],
)
def test_impossible_campaigns_raise_render_error(view: CampaignView, lang: str) -> None:
    """A view that cannot be rendered raises RenderError with a clear message."""
    with pytest.raises(RenderError):
        render_variant(view, lang=lang, settings=Settings())


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("<mjml><mj-body><mj-section>", id="unclosed"),
        pytest.param(
            "<mjml><mj-body><mj-include path='/etc/passwd' /></mj-body></mjml>", id="include"
        ),
    ],
)
def test_broken_mjml_raises_render_error(source: str) -> None:
    """Invalid MJML, or an attempt to include a file, raises RenderError."""
    with pytest.raises(RenderError):
        compile_mjml(source)


@pytest.mark.parametrize(
    ("lang", "expected"),
    [
        pytest.param("en", "July 2, 2014", id="en"),
        pytest.param("be", "2 ліпеня 2014", id="be"),
        pytest.param("ru", "2 июля 2014", id="ru"),
    ],
)
def test_dates_are_formatted_in_the_readers_locale(lang: str, expected: str) -> None:
    """Item dates use Babel's long date format for the reader's language."""
    variant = render("digest", lang)
    assert expected in visible_text(variant.html)
    assert expected in variant.text


def test_po_catalogues_are_not_compiled_into_the_repo() -> None:
    """Catalogues are compiled at load time; no .mo files sit beside the .po files."""
    assert not list(Path(LOCALE_DIR).rglob("*.mo"))


@pytest.mark.parametrize(
    ("fragment", "limit", "expected"),
    [
        pytest.param("<p>Short.</p>", 100, "<p>Short.</p>", id="short-kept-as-is"),
        pytest.param(
            '<p>One two three. Four <a href="https://x.example/?a=1&amp;b=2">five</a> six. '
            "Seven eight nine ten eleven twelve.</p>",
            40,
            '<p>One two three. Four <a href="https://x.example/?a=1&amp;b=2">five</a> six.</p>',
            id="sentence-end-links-kept",
        ),
        pytest.param(
            "<p>Один два три чатыры <b>пяць шэсць сем восем дзевяць дзесяць</b></p>",
            30,
            "<p>Один два три чатыры <b>пяць…</b></p>",
            id="word-boundary-ellipsis-tags-closed",
        ),
        pytest.param(
            "<p>Free them «now»! Then more words follow here.</p>",
            25,
            "<p>Free them «now»!</p>",
            id="closing-quote-after-sentence",
        ),
        pytest.param("<p>Anything.</p>", 0, "", id="zero-is-empty"),
    ],
)
def test_summaries_are_shortened_at_a_sentence_end(
    fragment: str, limit: int, expected: str
) -> None:
    """shorten_html cuts at a sentence end when one is near, else between words, tags closed."""
    assert shorten_html(fragment, limit) == expected


def test_long_summary_in_digest_is_shortened_in_both_parts() -> None:
    """A summary over [render] summary_max_chars is cut in the HTML and in the text."""
    long_summary = "<p>" + "Ales Bialiatski was freed today. " * 60 + "</p>"
    variant = render("digest", "en", items=(make_item(0, summary_html=long_summary),))
    assert variant.text.count("Ales Bialiatski was freed today.") <= 600 // 33
    assert visible_text(variant.html).count("freed today") <= 600 // 33


def test_feeds_own_read_more_link_is_dropped() -> None:
    """The feed's trailing "Read More" link to the item itself goes; the template has its own."""
    link = "https://portal.example.org/2014/07/visit/?a=1&b=2"
    summary = f'<p>He was freed. <a href="{link.replace("&", "&amp;")}">Read More</a></p>'
    variant = render("digest", "en", items=(make_item(0, link=link, summary_html=summary),))
    assert "Read More" not in variant.html and "Read More" not in variant.text
    assert "He was freed." in variant.text


def test_languages_take_their_feeds_items_else_the_default() -> None:
    """items_for_language: own language first, then the default language, then everything."""
    from types import SimpleNamespace

    from newsletter.assemble import items_for_language

    def item(lang: str) -> Any:
        return SimpleNamespace(source=SimpleNamespace(lang=lang), lang=lang)

    en, be = item("en"), item("be")
    assert items_for_language([en, be], lang="be", default_lang="en") == [be]
    assert items_for_language([en, be], lang="ru", default_lang="en") == [en]
    assert items_for_language([be], lang="ru", default_lang="en") == [be]


def test_brand_settings_reach_the_email() -> None:
    """Logo text, colours and footer lines come from [brand], not from the templates."""
    brand = dataclasses.replace(
        Settings().brand,
        logo_text="Viasna News",
        accent_color="#123456",
        footer_lines=("Registered charity 000",),
    )
    variant = render_variant(make_view(2), lang="en", settings=Settings(brand=brand))
    assert "Viasna News" in visible_text(variant.html) and "Viasna News" in variant.text
    assert "#123456" in variant.html
    assert "Registered charity 000" in variant.text and "Registered charity 000" in variant.html


def test_headings_form_an_outline() -> None:
    """A digest has one h1, a h2 per category and a h3 per item; layout tables are presentation."""
    variant = render("digest", "en", n_items=8)
    tree = lxml_html.document_fromstring(variant.html)
    assert len(tree.findall(".//h1")) == 1
    assert len(tree.findall(".//h2")) == len(set(CATEGORIES))
    assert len(tree.findall(".//h3")) == 8
    assert all(t.get("role") == "presentation" for t in tree.iter("table"))
    assert 'name="color-scheme" content="light dark"' in variant.html


def test_warm_up_compiles_the_alert_and_digest_templates_of_every_language() -> None:
    """The service's start-up render leaves each language's alert and digest templates
    compiled, so the first urgent alert does not pay for compiling them."""
    _environment.cache_clear()
    settings = Settings()
    warm_up(settings)
    for lang in settings.render.languages:
        cache = _environment(lang).cache
        assert cache is not None
        compiled = {name for _loader, name in cache.keys()}  # noqa: SIM118 (not a dict)
        assert {"email/alert.mjml.j2", "email/digest.mjml.j2"} <= compiled, lang
