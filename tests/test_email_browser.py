"""Emails in a real browser (Debian's chromium): readable at 375 px with no sideways scrolling."""

from __future__ import annotations

import dataclasses
import importlib.util
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from newsletter.config import Settings
from newsletter.render import CampaignView, ItemView, personalise, render_variant

LANGS = ("en", "be", "ru")
LONG_URL = "https://portal.example.org/2014/07/" + "ales-bialiatski-meets-eu-commissioner-" * 4
LONG_WORD = "Праваабаронча" * 8
# Worst cases a phone must survive: unbreakable URLs as link text and in prose, a very long word,
# a long title and category, a blockquote and a list.
HARD_SUMMARY = (
    f'<p>Read <a href="{LONG_URL}">{LONG_URL}</a> or {LONG_URL} now.</p>'
    f"<p>{LONG_WORD} — Viasna &amp; FIDH.</p><blockquote><p>Free them all.</p></blockquote>"
    "<ul><li>one</li><li>two</li></ul>"
)
SETTINGS = dataclasses.replace(
    Settings(),
    brand=dataclasses.replace(
        Settings().brand,
        mirror_url=LONG_URL,
        footer_lines=("Registered charity " + "0" * 60,),
    ),
)


def hard_item(i: int) -> ItemView:
    """An item built to overflow a narrow screen if anything can."""
    return ItemView(
        title=f"{LONG_WORD} Ales Bialiatski visits Brussels and Strasbourg {i}",
        link=LONG_URL + str(i),
        summary_html=HARD_SUMMARY,
        published_at=datetime(2014, 7, 2, tzinfo=UTC) - timedelta(days=i),
        categories=(f"Political prisoners and {LONG_WORD}",),
        lang="be" if i % 2 else "",
    )


VIEWS = {
    "digest": CampaignView(
        kind="digest", list_name="Weekly", items=tuple(hard_item(i) for i in range(4))
    ),
    "alert": CampaignView(kind="alert", list_name="Alerts", items=(hard_item(1),)),
    "staff-alert": CampaignView(
        kind="alert",
        list_name="Alerts",
        items=(),
        title=LONG_WORD,
        body_html=HARD_SUMMARY * 3,
        url=LONG_URL,
    ),
}


def campaign_page(kind: str, lang: str) -> str:
    """A campaign email as a reader gets it, with long personal links."""
    variant = render_variant(VIEWS[kind], lang=lang, settings=SETTINGS)
    page, _text = personalise(
        variant,
        unsubscribe_url="https://news.portal.example.org/u/" + "T" * 120,
        preferences_url="https://news.portal.example.org/preferences/" + "P" * 120,
    )
    return page


def notice_page(kind: str, lang: str) -> str:
    """The audience's confirmation or goodbye email, when that module exists."""
    from newsletter.notices import render_notice

    context: dict[str, Any] = (
        {"lists": ["Weekly digest"], "confirm_url": LONG_URL, "max_age_hours": 48}
        if kind == "confirm"
        else {"reason": "unsubscribed"}
    )
    return render_notice(kind, lang=lang, settings=SETTINGS, **context).html


HAS_NOTICES = importlib.util.find_spec("newsletter.notices") is not None
CASES = [
    pytest.param(campaign_page, kind, lang, id=f"{kind}-{lang}") for kind in VIEWS for lang in LANGS
] + [
    pytest.param(
        notice_page,
        kind,
        lang,
        id=f"{kind}-{lang}",
        marks=pytest.mark.skipif(not HAS_NOTICES, reason="no confirm/goodbye emails yet"),
    )
    for kind in ("confirm", "goodbye")
    for lang in LANGS
]


@pytest.mark.parametrize(("make", "kind", "lang"), CASES)
def test_nothing_overflows_a_375px_phone(browser: Any, make: Any, kind: str, lang: str) -> None:
    """At 375 px the page is no wider than the viewport, and the text is not shrunk to fit."""
    page = browser.new_page(viewport={"width": 375, "height": 700})
    try:
        page.set_content(make(kind, lang))
        width = page.evaluate("document.documentElement.scrollWidth")
        smallest = page.evaluate(
            "Math.min(...[...document.querySelectorAll('p, h1, h2, h3, li, a')]"
            ".map(e => parseFloat(getComputedStyle(e).fontSize)))"
        )
    finally:
        page.close()
    assert width <= 375
    assert smallest >= 13


@pytest.mark.parametrize("lang", LANGS)
def test_desktop_width_is_a_centred_column(browser: Any, lang: str) -> None:
    """At 800 px the email is a 600 px column, not stretched across the window."""
    page = browser.new_page(viewport={"width": 800, "height": 700})
    try:
        page.set_content(campaign_page("digest", lang))
        box = page.evaluate(
            "(() => { const r = document.querySelector('h1').closest('div[style*=\"max-width\"]')"
            ".getBoundingClientRect(); return [r.left, r.width]; })()"
        )
    finally:
        page.close()
    assert box == [100, 600]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_body_text_contrast_in_light_and_dark(browser: Any, scheme: str) -> None:
    """Summary text keeps a 4.5:1 contrast with its card, in light and in dark mode."""
    page = browser.new_page(viewport={"width": 375, "height": 700}, color_scheme=scheme)
    try:
        page.set_content(campaign_page("digest", "en"))
        colours = page.evaluate(
            "(() => { const p = document.querySelector('.summary p');"
            " const card = p.closest('.card');"
            " return [getComputedStyle(p).color, getComputedStyle(card).backgroundColor]; })()"
        )
    finally:
        page.close()
    assert contrast(*colours) >= 4.5, colours


def contrast(foreground: str, background: str) -> float:
    """WCAG contrast ratio of two CSS rgb() colours."""

    def luminance(css: str) -> float:
        channels = [int(v) / 255 for v in css[css.index("(") + 1 : -1].split(",")[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    high, low = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (high + 0.05) / (low + 0.05)
