"""Staff Markdown: the small subset, hostile input made safe or refused in one line."""

from __future__ import annotations

import time

import pytest
from lxml import html as lxml_html

from newsletter.errors import CampaignError
from newsletter.markdown import MAX_MARKDOWN_CHARS, markdown_to_html
from newsletter.sanitize import ALLOWED_TAGS, html_depth

BASE = "https://portal.example.org/"


def md(text: str) -> str:
    return markdown_to_html(text, base_url=BASE)


def test_the_subset_becomes_allowed_html() -> None:
    out = md("# Act\n\n## Now\n\n**strong** *em* [site](/act)\nnext line\n\n- a\n- b\n\n> quoted")
    assert "<h3>Act</h3>" in out and "<h4>Now</h4>" in out
    assert "<strong>strong</strong>" in out and "<em>em</em>" in out
    assert '<a href="https://portal.example.org/act" rel="noopener noreferrer">site</a>' in out
    assert "<br>" in out and "<li>a</li>" in out and "<blockquote>" in out


@pytest.mark.parametrize(
    "hostile",
    [
        "<script>alert(1)</script>",
        "[x](javascript:alert(1))",
        "[x](JaVa\tScRiPt:alert(1))",
        "[x](data:text/html;base64,PHNjcmlwdD4=)",
        "![pixel](https://tracker.example.com/p.gif)",
        '<img src=x onerror="alert(1)">',
        "<a href='javascript:x'>y</a>",
        "<iframe src=https://evil.example.com></iframe>",
    ],
)
def test_hostile_markdown_gives_no_active_content(hostile: str) -> None:
    tree = lxml_html.fragment_fromstring(md(hostile) or "<p></p>", create_parent="div")
    for element in tree.iter():
        assert element.tag in ALLOWED_TAGS | {"div"}
        for name, value in element.attrib.items():
            assert not name.startswith("on")
            if name == "href":
                assert value.startswith(("https://", "http://", "mailto:"))


def test_only_allowed_tags_come_out() -> None:
    out = md("```\ncode\n```\n\n`inline`\n\n***\n\n| a | b |\n|---|---|\n\n<div>x</div>")
    tags = {t.split(">")[0].split()[0].strip("/") for t in out.split("<")[1:]}
    assert tags <= ALLOWED_TAGS


@pytest.mark.parametrize("opener", [">", "- ", "* ", "1. "])
def test_deep_nesting_is_capped_and_fast(opener: str) -> None:
    start = time.perf_counter()
    out = md(opener * 5000 + "x")
    assert time.perf_counter() - start < 2
    assert html_depth(out) <= 45


def test_too_long_a_text_is_one_line_of_error() -> None:
    with pytest.raises(CampaignError, match="over the limit") as info:
        md("a" * (1024 * 1024))
    assert "\n" not in str(info.value)
    assert md("a" * MAX_MARKDOWN_CHARS).startswith("<p>a")


@pytest.mark.parametrize(
    "pathological", ["[" * 19000, "*a " * 6000, "_" * 19000 + "x", "\\" * 19000]
)
def test_pathological_text_at_the_limit_is_quick(pathological: str) -> None:
    start = time.perf_counter()
    md(pathological)
    assert time.perf_counter() - start < 2
