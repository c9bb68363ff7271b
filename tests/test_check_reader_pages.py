"""The check refuses a link to any reader's own page pasted into staff or feed text.

A reader's unsubscribe, preferences, confirmation, key or "I sent my letter" link acts for that
reader whoever clicks it. Pasted into an update (or a feed item), it would have everyone who
clicks it counted as, or unsubscribe, that one reader. Under the portal's address, the discreet
readers' one or a mirror; with or without a scheme, in any case, escaped or not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from newsletter.check import READER_PAGES, check_variant, item_problem
from newsletter.config import Settings
from newsletter.render import CampaignView, RenderedVariant, render_variant
from newsletter.tokens import PAGE_PATHS
from tests.test_check import MLIST, NOW, item
from tests.test_check import settings as check_settings

OURS = "https://news.portal.example.org"
NOTES = "https://notes.example.net"  # the discreet readers' links
MIRROR = "https://mirror.example.com/news"
TOKEN = "WzEsMV0.pasted-token"


def settings() -> Settings:
    """The check's settings with a discreet base URL and a mirror."""
    base = check_settings()
    return dataclasses.replace(
        base,
        web=dataclasses.replace(base.web, mirror_urls=(MIRROR,)),
        discreet=dataclasses.replace(base.discreet, base_url=NOTES),
    )


def alert() -> RenderedVariant:
    """An ordinary alert as rendered, in English."""
    view = CampaignView(kind="alert", list_name="Alerts", items=(item(0),))
    return render_variant(view, lang="en", settings=settings())


Change = Callable[[RenderedVariant], RenderedVariant]


def in_html(fragment: str) -> Change:
    """The variant with an HTML fragment added to its body."""
    return lambda v: dataclasses.replace(v, html=v.html.replace("</body>", fragment + "</body>"))


def in_text(line: str) -> Change:
    """The variant with a line added to its text part."""
    return lambda v: dataclasses.replace(v, text=v.text + line + "\n")


def problems(variant: RenderedVariant) -> list[str]:
    """The check's lines about readers' links."""
    found = check_variant(variant, mlist=MLIST, settings=settings(), now=NOW)
    return [str(p) for p in found if p.code == "links"]


PASTED = [
    pytest.param(in_html(f'<a href="{OURS}/wrote/{TOKEN}">I wrote</a>'), "HTML", id="wrote"),
    pytest.param(in_text(f"Confirm: {OURS}/confirm/{TOKEN}"), "text", id="confirm-text"),
    pytest.param(in_html(f'<a href="{OURS}/key/{TOKEN}">key</a>'), "HTML", id="key"),
    pytest.param(in_text(f"news.portal.example.org/wrote/{TOKEN}"), "text", id="no-scheme"),
    pytest.param(
        in_html(f'<a href="HTTPS://NEWS.Portal.example.org/u/{TOKEN}">x</a>'),
        "HTML",
        id="upper-case",
    ),
    pytest.param(in_html(f'<a href="{OURS}/%77rote/{TOKEN}">x</a>'), "HTML", id="escaped"),
    pytest.param(in_html(f'<a href="{OURS}/archive/../wrote/{TOKEN}">x</a>'), "HTML", id="dots"),
    pytest.param(in_html(f'<a href="{OURS}\\wrote\\{TOKEN}">x</a>'), "HTML", id="backslashes"),
    pytest.param(
        in_html(f"<p>news.portal.example.org&#47;wrote&#47;{TOKEN}</p>"), "HTML", id="entities"
    ),
    pytest.param(in_html(f'<a href="{NOTES}/u/{TOKEN}">x</a>'), "HTML", id="discreet-base"),
    pytest.param(in_text(f"{NOTES}/wrote/{TOKEN}"), "text", id="discreet-wrote"),
    pytest.param(in_html(f'<a href="{MIRROR}/preferences/{TOKEN}">x</a>'), "HTML", id="mirror"),
    pytest.param(
        in_html(f'<a href="https://news.portal.example.org:443/wrote/{TOKEN}">x</a>'),
        "HTML",
        id="default-port",
    ),
    pytest.param(in_text(f"https://news.portal.example.org./u/{TOKEN}"), "text", id="final-dot"),
    pytest.param(
        in_html(f'<a href="https://someone@NEWS.portal.example.org.:443/key/{TOKEN}">x</a>'),
        "HTML",
        id="user-dot-port",
    ),
]


@pytest.mark.parametrize(("change", "part"), PASTED)
def test_a_pasted_link_to_a_readers_own_page_is_refused(change: Change, part: str) -> None:
    """Each form of a reader's page link is refused, in one line naming where."""
    lines = problems(change(alert()))
    assert lines, "not refused"
    assert any(line.startswith(f"en {part}:") for line in lines), lines
    assert all("\n" not in line for line in lines)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(in_html(f'<a href="{OURS}/w/{TOKEN}">web copy</a>'), id="web-copy"),
        pytest.param(in_html(f'<a href="{OURS}/archive/wrote/">archive</a>'), id="other-path"),
        pytest.param(in_text(f"https://oldnews.portal.example.org/wrote/{TOKEN}"), id="other-host"),
        pytest.param(
            in_html(f'<a href="https://news.portal.example.org:8443/wrote/{TOKEN}">x</a>'),
            id="other-port",
        ),
    ],
)
def test_links_to_other_pages_pass(change: Change) -> None:
    """A web copy (its token names no reader), another path, another host: no problem."""
    assert problems(alert()) == []
    assert problems(change(alert())) == []


def test_every_tokened_page_but_the_web_copy_is_a_readers_own() -> None:
    """New pages count as a reader's own unless said otherwise."""
    assert set(READER_PAGES) == set(PAGE_PATHS) - {"copy"}
    assert {"unsubscribe", "preferences", "confirm", "key", "wrote"} <= set(READER_PAGES)


@pytest.mark.parametrize(
    ("summary", "page"),
    [
        pytest.param(
            f'<p><a href="{OURS}/wrote/{TOKEN}">done</a></p>',
            f"wrote page ({OURS}/wrote/)",
            id="wrote",
        ),
        pytest.param(
            f"<p>See {NOTES}/u/{TOKEN}</p>", f"unsubscribe page ({NOTES}/u/)", id="discreet"
        ),
        pytest.param(
            f'<p><a href="{MIRROR}/key/{TOKEN}">key</a></p>',
            f"key page ({MIRROR}/key/)",
            id="mirror",
        ),
        pytest.param(
            f"<p>news.portal.example.org/confirm/{TOKEN}</p>",
            f"confirm page ({OURS}/confirm/)",
            id="no-scheme",
        ),
        pytest.param(
            f'<p><a href="https://news.portal.example.org.:443/wrote/{TOKEN}">x</a></p>',
            f"wrote page ({OURS}/wrote/)",
            id="dot-and-default-port",
        ),
    ],
)
def test_a_feed_item_naming_a_readers_page_is_set_aside(summary: str, page: str) -> None:
    """A digest leaves out an item whose text names any reader's page under any base."""
    assert item_problem("A title", f"{OURS}/2026/item", summary, settings()) == (
        f"it names the readers' {page}"
    )
    assert item_problem("A title", f"{OURS}/2026/item", "<p>Fine.</p>", settings()) == ""
