"""Hostile shapes of text finish in seconds: ingest, render and the pre-send check.

Each risky call runs in a forked child that is killed when its time budget is spent, so an
expression that backtracks for hours (holding the GIL) fails the test instead of freezing it.
The budgets are generous (about ten times what a loaded two-core machine needs).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any
from xml.sax.saxutils import escape

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from newsletter import bounces
from newsletter.check import check_message, check_variant
from newsletter.config import Settings
from newsletter.errors import FeedParseError, RenderError
from newsletter.htmltext import html_to_text, shorten_html
from newsletter.message import ListInfo
from newsletter.parse import ParsedItem, parse_feed
from newsletter.render import (
    CampaignView,
    ItemView,
    _drop_trailing_link,
    render_variant,
)
from tests.conftest import SECRET

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
SITE = "https://portal.example.org/"
LINK = "https://portal.example.org/2026/01/item/"
MLIST = ListInfo(1, "weekly", "weekly.portal.example.org")
BUDGET = 30.0  # seconds for one regression case; each takes well under two
EXAMPLE_BUDGET = 30.0  # seconds for one generated example (several documents, two renders)

# --- running a call with a time budget ------------------------------------------------------


def _child(connection: Any, call: Callable[..., str], args: tuple[Any, ...]) -> None:
    try:
        connection.send(("ok", call(*args)))
    except BaseException as e:  # reported to the parent, which decides
        connection.send(("error", f"{type(e).__name__}: {e}"[:300]))


def within(budget: float, call: Callable[..., str], *args: Any) -> str:
    """call(*args) in a forked child; fail if it crashes, raises or outlives the budget."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, call, args), daemon=True)
    child.start()
    send.close()
    ready = receive.poll(budget)
    if not ready:
        child.kill()
        child.join()
        pytest.fail(f"{call.__name__} took longer than {budget:.0f} s")
    try:
        status, value = receive.recv()
    except EOFError:
        child.join()
        pytest.fail(f"{call.__name__} died (exit code {child.exitcode})")
    child.join()
    assert status == "ok", value
    return str(value)


# --- the steps under test, as the service runs them -------------------------------------------


def parse(document: bytes) -> list[ParsedItem] | str:
    """parse_feed as ingest runs it; a refusal is a one-line FeedParseError, returned here."""
    try:
        return parse_feed(
            document, source="feed", base_url=SITE, urgent_category="urgent-action", now=NOW
        )
    except FeedParseError as e:
        message = str(e)
        assert "\n" not in message
        return message


def rss(summary: str = "Text.", title: str = "Title", extra: str = "", prolog: str = "") -> bytes:
    """An RSS 2.0 feed of one item around the given (unescaped) text."""
    return (
        f'<?xml version="1.0" encoding="utf-8"?>{prolog}<rss version="2.0"><channel>'
        f"<title>Portal</title><link>{SITE}</link><item><title>{escape(title)}</title>"
        f"<link>{LINK}</link><guid>item-1</guid><description>{escape(summary)}</description>"
        f"{extra}</item></channel></rss>"
    ).encode()


def atom(content: str) -> bytes:
    """An Atom feed of one entry with the text as HTML title, summary and content."""
    text = escape(content)
    return (
        '<?xml version="1.0" encoding="utf-8"?><feed xmlns="http://www.w3.org/2005/Atom">'
        f'<title>Portal</title><id>urn:portal</id><link href="{SITE}"/>'
        "<updated>2026-01-05T09:00:00Z</updated><entry><id>urn:item-1</id>"
        f'<title type="html">{text[:2000]}</title><link href="{LINK}"/>'
        f'<updated>2026-01-05T09:00:00Z</updated><summary type="html">{text}</summary>'
        f'<content type="html">{text}</content></entry></feed>'
    ).encode()


def view(summary: str, kind: str = "digest") -> CampaignView:
    """A campaign of one item whose summary is the given sanitised HTML."""
    item = ItemView(title="Title", link=LINK, summary_html=summary, published_at=NOW, categories=())
    return CampaignView(kind=kind, list_name="Weekly", items=(item,))


def check_settings() -> Settings:
    """Defaults with a secret and an https base URL, as the check needs them."""
    base = Settings()
    return dataclasses.replace(
        base,
        web=dataclasses.replace(base.web, base_url="https://news.portal.example.org"),
        security=dataclasses.replace(base.security, secret=SECRET),
    )


def render_and_check(summary: str) -> str:
    """Render a digest and an alert around a summary, then run the pre-send check on both."""
    config = check_settings()
    found = []
    for kind in ("digest", "alert"):
        try:
            variant = render_variant(view(summary, kind), lang="en", settings=config)
        except RenderError as e:  # a refusal must be one line
            assert "\n" not in str(e)
            continue
        found += check_variant(variant, mlist=MLIST, settings=config, now=NOW)
    return f"{len(found)} problems"


def ingest_render_check(content: str) -> str:
    """Every document shape around the content through ingest; what it keeps, through render."""
    documents = [
        rss(summary=content),
        rss(title=content[:20_000], summary="Text."),
        rss(extra=f"<author>{escape(content[:50_000])}</author>"),
        rss(prolog=content if content.isspace() else ""),
        atom(content),
        (content + "<html><body>" + content + "</body></html>").encode(),
        content.encode(),
    ]
    kept = [item for document in documents for item in _items(parse(document))]
    for item in kept[:1]:
        render_and_check(item.summary_html)
        shorten_html(item.summary_html, 600)
        html_to_text(item.summary_html)
    _drop_trailing_link(content + f'<a href="{LINK}">Read more</a>', LINK)
    _drop_trailing_link(content, LINK)
    return f"{len(kept)} items"


def _items(result: list[ParsedItem] | str) -> list[ParsedItem]:
    return result if isinstance(result, list) else []


# --- generated adversarial documents ----------------------------------------------------------

ATOMS = (
    "<!--", "-->", "<!-- a -->", "--", "--!>", "<!---->", " ", "\n", "\t", "\u2003", "\r\n",
    "<div>", "</div>", "<b>", "</b>", "<p>", "<li>", "<ul>", "<span>", "</span>", "<table>",
    "<td>", "<blockquote>", '<a href="x">', "</a>", '<b title="1">', '<b title="2">', "<i>",
    "<x a=1 b=2 c=3 d=4>", " a=1", "&amp;", "&#x41;", "&#65;", "&nbsp;", "&foo;", "&", "<", ">",
    '"', "'", ' style="', "a:b;", "color", "<![CDATA[", "]]>", "<?", "<!", "<scr", "ipt>",
    "<!doctype", "html", "<html", "http://", "<https://", "@", "a.", "aaaa", "...", ". ", "»",
    "<?xml", " encoding=", "'utf-8'", "[", "{", "\\",
)  # fmt: skip
REPEATS = (1, 2, 3, 10, 100, 1_000, 5_000, 20_000)
chunks = st.tuples(st.sampled_from(ATOMS), st.sampled_from(ATOMS), st.sampled_from(REPEATS))
# Hypothesis gets the recipe (short to print when a case fails); the test builds the text.
recipes = st.lists(chunks, min_size=1, max_size=6)


def build(recipe: list[tuple[str, str, int]]) -> str:
    """The text a recipe describes: each pair of atoms repeated, at most 100 KB in all."""
    return "".join((a + b) * n for a, b, n in recipe)[:100_000]


# No shrinking: each failing try costs a whole time budget. No example database: derandomized.
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(recipes)
def test_generated_hostile_text_goes_through_ingest_render_and_check(
    recipe: list[tuple[str, str, int]],
) -> None:
    """Comments, whitespace runs, deep tags, attribute lists, entities and mixtures of them."""
    within(EXAMPLE_BUDGET, ingest_render_check, build(recipe))


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
)
@given(
    st.sampled_from(("<!-- a -->", "<!---->", "<!-- <!-- -->", " <!-- --> ")),
    st.integers(min_value=1, max_value=3_000),
    st.sampled_from(("<x", "<htm", "<html>", "<!doctype html>", "<rss/>", "")),
)
def test_comments_before_a_document_are_quick(comment: str, count: int, tail: str) -> None:
    """Any number of comments before any start: one quick answer (the old check backtracked)."""
    within(BUDGET, _parse_summary, (comment * count + tail).encode())


def _parse_summary(document: bytes) -> str:
    result = parse(document)
    return result if isinstance(result, str) else f"{len(result)} items"


# --- the known cases: each froze or crashed on e8407da --------------------------------------


def _render_summary(summary: str) -> str:
    return render_and_check(summary)


def _render_whitespace() -> str:
    return _render_summary("<p>Freed." + " " * 100_000 + "More.</p>")


def _list_unsubscribe_header() -> str:
    message = EmailMessage()
    message["List-Unsubscribe"] = "<https://" * 150_000
    message.set_content("text")
    config = check_settings()
    found = check_message(message, lang="en", subject="Hi", unsubscribe_url="x", settings=config)
    return f"{len(found)} problems"


def _dsn_recipient_run() -> str:
    message = Message()
    message["To"] = "a" * 300_000
    return str(bounces.find_delivery(message, [], check_settings()))


def _dsn_unclosed_message_ids() -> str:
    message = MIMEMultipart("report")
    message.attach(MIMEText("<1.1.0123456789abcdef@x " * 150_000, "rfc822-headers"))
    return str(bounces.original_key(message, check_settings()))


KNOWN: dict[str, tuple[Callable[..., str], tuple[Any, ...]]] = {
    "nested-comments-before-html": (_parse_summary, (b"<!-- a -->" * 40 + b"<x",)),
    "comments-and-space-before-html": (_parse_summary, (b"<!---->  " * 40 + b"<htm",)),
    "blank-lines-in-prolog": (_parse_summary, (rss(prolog="\n" * 300_000),)),
    "long-style-attribute": (_parse_summary, (rss('<p style="' + "a" * 300_000 + '">x</p>'),)),
    "dashes-in-comment": (_parse_summary, (rss("<!--" + " --" * 200_000),)),
    "long-author": (_parse_summary, (rss(extra="<author>" + "a." * 100_000 + "</author>"),)),
    "many-attributes": (
        _parse_summary,
        (rss(extra="<x " + " ".join(f"a{i}=''" for i in range(100_000)) + "/>"),),
    ),
    "deep-divs": (_parse_summary, (rss("<div>" * 300_000),)),
    "rebuilt-formatting": (
        _parse_summary,
        (rss("".join(f'<p><b title="{i}"></p>' for i in range(8_000))),),
    ),
    "deep-json": (_parse_summary, (b"[" * 100_000,)),
    "many-named-references": (_parse_summary, (rss("&zz;" * 1_200_000),)),
    "whitespace-in-summary-render": (_render_whitespace, ()),
    "deep-summary-render": (_render_summary, ("<b>" * 20_000 + "x",)),
    "list-unsubscribe-header": (_list_unsubscribe_header, ()),
    "dsn-recipient-run": (_dsn_recipient_run, ()),
    "dsn-unclosed-message-ids": (_dsn_unclosed_message_ids, ()),
}


@pytest.mark.parametrize("case", list(KNOWN))
def test_known_hostile_case_finishes_quickly(case: str) -> None:
    """Each case that froze (or crashed) the old code gets a one-line answer within budget."""
    call, args = KNOWN[case]
    answer = within(BUDGET, call, *args)
    assert "\n" not in answer


def test_whitespace_summary_still_loses_its_trailing_link() -> None:
    """The 100 KB whitespace case is not just quick: the feed's own link is still dropped."""
    summary = "<p>Freed." + " " * 100_000 + f'<a href="{LINK}">Read more</a></p>'
    assert _drop_trailing_link(summary, LINK) == "<p>Freed.</p>"


def test_deep_html_is_refused_in_one_line() -> None:
    """A summary nested deeper than the limit is refused whole, naming the limit."""
    result = parse(rss("<blockquote>" * 500 + "x"))
    assert isinstance(result, str) and "nests more than 100 elements deep" in result
    with pytest.raises(RenderError, match="more than 100 elements deep"):
        render_variant(view("<b>" * 500 + "x"), lang="en", settings=check_settings())
