"""The sanitisers: HTML allow-list, one-line text, safe URLs, UTC dates."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from newsletter.sanitize import clean_html, clean_text, clean_url, control_character, to_utc

BASE = "https://portal.example.org/2014/07/item/"
FALLBACK = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        pytest.param(
            "<p>One <strong>two</strong> <em>three</em></p>",
            "<p>One <strong>two</strong> <em>three</em></p>",
            id="allowed-tags-kept",
        ),
        pytest.param(
            "<ul><li>a</li></ul><ol><li>b</li></ol>",
            "<ul><li>a</li></ul><ol><li>b</li></ol>",
            id="lists",
        ),
        pytest.param(
            "<blockquote><h3>T</h3></blockquote>", "<blockquote><h3>T</h3></blockquote>", id="quote"
        ),
        pytest.param("<div><span>text</span></div>", "text", id="other-tags-unwrapped"),
        pytest.param(
            '<img src="https://tracker.example/p.gif">after', "after", id="images-dropped"
        ),
        pytest.param("a<script>alert(1)</script>b", "ab", id="script-and-content-dropped"),
        pytest.param("a<style>p{}</style>b", "ab", id="style-block-dropped"),
        pytest.param("a<!-- secret -->b", "ab", id="comments-dropped"),
        pytest.param(
            '<p style="width:expression(alert(1))" class="x" id="y">p</p>',
            "<p>p</p>",
            id="attributes-dropped",
        ),
        pytest.param(
            '<a href="/x" title="T">x</a>',
            '<a href="https://portal.example.org/x" title="T" rel="noopener noreferrer">x</a>',
            id="link-made-absolute-with-rel",
        ),
        pytest.param(
            '<a href="mailto:info@portal.example.org">m</a>',
            '<a href="mailto:info@portal.example.org" rel="noopener noreferrer">m</a>',
            id="mailto-kept",
        ),
        pytest.param(
            '<a href="jav&#x09;ascript:alert(1)">j</a>',
            '<a rel="noopener noreferrer">j</a>',
            id="js-tab",
        ),
        pytest.param(
            '<a href="&#106;avascript:alert(1)">j</a>',
            '<a rel="noopener noreferrer">j</a>',
            id="js-entity",
        ),
        pytest.param(
            '<a href=" JaVaScRiPt:alert(1)">j</a>',
            '<a rel="noopener noreferrer">j</a>',
            id="js-case",
        ),
        pytest.param(
            '<a href="data:text/html,x">d</a>', '<a rel="noopener noreferrer">d</a>', id="data-url"
        ),
        pytest.param(
            '<a href="https://x.example/" rel="opener">r</a>',
            '<a href="https://x.example/" rel="noopener noreferrer">r</a>',
            id="rel-forced",
        ),
        pytest.param("<svg onload=alert(1)><text>t</text></svg>ok", "ok", id="svg-dropped"),
        pytest.param("<iframe src=x>&lt;script&gt;</iframe>ok", "ok", id="iframe-dropped"),
        pytest.param("<p>a&#0;b&#1;c\x7fd\x9ae</p>", "<p>a\ufffdbcde</p>", id="controls-dropped"),
        pytest.param(
            "<p>line one&#11;line two\x0cthree\x85four</p>",
            "<p>line one\nline two\nthree\nfour</p>",
            id="line-separating-controls-break-lines",
        ),
        pytest.param("<p>x&#xFFFE;y&#xFFFF;</p>", "<p>xy</p>", id="noncharacters-dropped"),
    ],
)
def test_clean_html(fragment: str, expected: str) -> None:
    """clean_html keeps a small allow-list and makes links absolute, safe and rel=noopener."""
    assert clean_html(fragment, base_url=BASE) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("Plain title", "Plain title", id="unchanged"),
        pytest.param("Hello\r\nBcc: x@example.org", "Hello Bcc: x@example.org", id="crlf"),
        pytest.param("Hello&#13;&#10;Bcc: x", "Hello Bcc: x", id="crlf-as-references"),
        pytest.param("a\u202egpj.exe\u202c b", "agpj.exe b", id="bidi-override"),
        pytest.param("\u2066x\u2069\u200e\u200f\u061c", "x", id="bidi-isolates-and-marks"),
        pytest.param("zero\u200bwidth\ufeff", "zerowidth", id="zero-width"),
        pytest.param("a\x00b\x07c\x1bd", "abcd", id="controls"),
        pytest.param("T &#xFFFF; x\ufffe", "T x", id="noncharacters"),
        pytest.param("  many \t  spaces\u2028here ", "many spaces here", id="whitespace-collapsed"),
        pytest.param(
            "<b>Bold</b> &amp; <i>it</i>", "Bold & it", id="tags-stripped-entities-unescaped"
        ),
        pytest.param("&lt;script&gt;alert(1)&lt;/script&gt;Hi", "Hi", id="escaped-script-removed"),
        pytest.param("a < b & c > d", "a < b & c > d", id="plain-comparisons-kept"),
        pytest.param("Füle “Viasna” – Бяляцкі", "Füle “Viasna” – Бяляцкі", id="unicode-kept"),
    ],
)
def test_clean_text(value: str, expected: str) -> None:
    """clean_text gives one line with no markup, controls, bidi or zero-width characters."""
    assert clean_text(value, max_length=300) == expected


@pytest.mark.parametrize(
    ("value", "max_length", "expected"),
    [
        pytest.param("short", 10, "short", id="fits"),
        pytest.param("one two three four", 12, "one two…", id="word-boundary"),
        pytest.param("x" * 50, 10, "x" * 9 + "…", id="no-boundary"),
    ],
)
def test_clean_text_truncates(value: str, max_length: int, expected: str) -> None:
    """clean_text truncates to max_length at a word boundary and marks the cut with "…"."""
    result = clean_text(value, max_length=max_length)
    assert result == expected
    assert len(result) <= max_length


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("https://x.example/a?b=1#c", "https://x.example/a?b=1#c", id="absolute"),
        pytest.param("/2014/07/x/", "https://portal.example.org/2014/07/x/", id="root-relative"),
        pytest.param("../y/", "https://portal.example.org/2014/07/y/", id="dot-relative"),
        pytest.param("//cdn.example/z", "https://cdn.example/z", id="scheme-relative"),
        pytest.param('/a b"<c>', "https://portal.example.org/a%20b%22%3Cc%3E", id="quoted"),
        pytest.param("javascript:alert(1)", "", id="javascript"),
        pytest.param("java\nscript:alert(1)", "", id="javascript-newline"),
        pytest.param("\tJAVASCRIPT:alert(1)", "", id="javascript-tab-case"),
        pytest.param("data:text/html,x", "", id="data"),
        pytest.param("mailto:a@example.org", "", id="mailto-not-a-web-link"),
        pytest.param("ftp://x.example/", "", id="ftp"),
        pytest.param("https://x\x00.example/", "", id="control-character"),
        pytest.param("https://", "", id="no-host"),
        pytest.param("https:\\\\evil.example", "", id="backslashes-no-host"),
        pytest.param("", "", id="empty"),
    ],
)
def test_clean_url(url: str, expected: str) -> None:
    """clean_url returns an absolute http(s) URL, or "" for anything else."""
    assert clean_url(url, base_url=BASE) == expected


@pytest.mark.parametrize(
    ("parsed", "expected"),
    [
        pytest.param(None, FALLBACK, id="missing"),
        pytest.param(
            time.struct_time((2014, 7, 2, 10, 0, 0, 2, 183, 0)),
            datetime(2014, 7, 2, 10, 0, tzinfo=UTC),
            id="utc-struct-time",
        ),
        pytest.param(time.struct_time((2014, 13, 40, 0, 0, 0, 0, 0, 0)), FALLBACK, id="impossible"),
    ],
)
def test_to_utc(parsed: time.struct_time | None, expected: datetime) -> None:
    """to_utc turns feedparser's struct_time into aware UTC, falling back when absent or bad."""
    result = to_utc(parsed, fallback=FALLBACK)
    assert result == expected
    assert result.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "allowed", "found"),
    [
        ("Weekly news", "", ""),
        ("Weekly\x00", "", "U+0000"),
        ("Weekly\ufffe", "", "U+FFFE"),
        ("a\tb\nc", "\t\n", ""),
        ("a\tb", "", "U+0009"),
        ("bad \udce9 byte", "", "U+DCE9"),
        ("non\u00a0breaking", "", ""),
    ],
)
def test_control_character_names_the_first_refused_character(
    text: str, allowed: str, found: str
) -> None:
    """Controls, lone surrogates and U+FFFE/U+FFFF are reported; other unprintables are not."""
    assert control_character(text, allowed=allowed) == found
