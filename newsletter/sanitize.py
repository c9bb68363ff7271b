"""Pure sanitisers for everything a feed hands us: HTML fragments, one-line text, URLs, dates.

Feeds are untrusted input that ends up in people's inboxes, so the rules are allow-lists:
a few text tags, links only to http/https/mailto (made absolute), no images (a remote image is
a tracking pixel for whoever controls the feed), and header-safe single lines of text. The
control-character rules here serve the other ways text comes in too (the console's forms, list
and segment files).
"""

from __future__ import annotations

import html
import time
import unicodedata
from datetime import UTC, datetime
from html.parser import HTMLParser
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import nh3

ALLOWED_TAGS = frozenset(
    {"p", "br", "a", "strong", "b", "em", "i", "ul", "ol", "li", "blockquote", "h3", "h4"}
)
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}}
LINK_SCHEMES = frozenset({"http", "https", "mailto"})
WEB_SCHEMES = frozenset({"http", "https"})
# Elements whose *content* is dropped with them: code, styles, embedded documents and foreign
# markup (svg/math) whose text would otherwise leak into the output as stray words.
DROP_WITH_CONTENT = frozenset(
    {
        "script", "style", "iframe", "frame", "frameset", "object", "embed", "applet",
        "noscript", "noembed", "noframes", "template", "svg", "math", "textarea", "select",
        "title", "xmp", "head",
    }
)  # fmt: skip
ELLIPSIS = "…"
# How often clean_text unescapes a line to find markup escaped within it. Bounded: each round is
# a pass of nh3 over the line (parse.py checks as many unescapings of feed text beforehand).
UNESCAPE_ROUNDS = 3
# Safe characters left as they are when re-quoting a URL's path, query and fragment; "%"
# keeps existing escapes intact.
URL_SAFE = "/:@!$&'()*+,;=-._~%?#[]"
NETLOC_FORBIDDEN = frozenset(' "<>\\^`{|}')
# HTML nested deeper than this is refused: nh3's parser (html5ever) takes time quadratic in the
# nesting depth, and mjml's compiler overflows its stack (a crash, not an error) near 10,000.
MAX_HTML_DEPTH = 100
VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)
# Never kept in stored text: PostgreSQL refuses NUL, and MJML's parser refuses the other C0
# controls and U+FFFE/U+FFFF (one "&#x1;" in a feed item stopped every digest). DEL and the C1
# controls go too: no one writes them. Tab and line breaks stay.
_CONTROLS: dict[int, str | None] = dict.fromkeys(
    [*range(0x09), *range(0x0E, 0x1C), *range(0x7F, 0x85), *range(0x86, 0xA0), 0xFFFE, 0xFFFF]
)
# The controls that separate lines (Word's soft line break is a VT): a line break, so that
# the words on either side stay apart.
_CONTROLS.update(dict.fromkeys([0x0B, 0x0C, *range(0x1C, 0x20), 0x85], "\n"))
_NONCHARACTERS = "\ufffe\uffff"
# The bidi embeddings, overrides and isolates (LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI, PDI) show
# the text after them in another order than it is written: "\u202egro.latrop//:sptth" reads as
# the portal's address, and one left open in a link's text reverses the address the plain-text
# part writes out after it. Dropped from HTML bodies as clean_text drops them from lines; other
# format characters (ZWJ in emoji, soft hyphens, the LRM and RLM marks) override no order: kept.
_BIDI_CONTROLS: dict[int, str | None] = dict.fromkeys(
    [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)
_HTML_TEXT_DROPS = _CONTROLS | _BIDI_CONTROLS


def clean_html(html_fragment: str, *, base_url: str) -> str:
    """Reduce an HTML fragment to the allow-list, with absolute, safe, rel=noopener links."""

    def keep_attribute(tag: str, attribute: str, value: str) -> str | None:
        if tag == "a" and attribute == "href":
            return _clean_link(value, base_url=base_url) or None
        return value

    cleaner = nh3.Cleaner(
        tags=set(ALLOWED_TAGS),
        clean_content_tags=set(DROP_WITH_CONTENT),
        attributes={tag: set(names) for tag, names in ALLOWED_ATTRIBUTES.items()},
        attribute_filter=keep_attribute,
        url_schemes=set(LINK_SCHEMES),
        link_rel="noopener noreferrer",
        strip_comments=True,
    )
    return cleaner.clean(html_fragment).translate(_HTML_TEXT_DROPS).strip()


def drop_controls(text: str) -> str:
    """Text without control characters (tab, LF and CR kept; line separators become LF) and
    without U+FFFE or U+FFFF."""
    return text.translate(_CONTROLS)


def control_character(text: str, *, allowed: str = "") -> str:
    """The first control character of text not in `allowed`, a lone surrogate (bytes that were
    not UTF-8) too, as "U+XXXX"; "" when there is none. For values refused, not cleaned."""
    if text.isprintable():  # the common case, checked in C
        return ""
    for char in text:
        if char in allowed:
            continue
        if unicodedata.category(char) in ("Cc", "Cs") or char in _NONCHARACTERS:
            return f"U+{ord(char):04X}"
    return ""


def clean_text(value: str, *, max_length: int) -> str:
    """Make one safe line of plain text: no tags, entities, controls or bidi tricks; truncated."""
    text = value
    # Unescaping can reveal markup that was escaped once more ("&lt;script&gt;"): repeat until
    # nothing changes, so the line never carries tags into a subject or a plain-text part.
    for _ in range(UNESCAPE_ROUNDS):
        stripped = html.unescape(_strip_tags(text))
        if stripped == text:
            return _truncate(_one_line(text), max_length)
        text = stripped
    # Escaped more often than that (only a hostile feed is): what the rounds revealed loses its
    # tags once more and stays escaped ("&lt;b&gt;"), so no depth of escaping brings a tag in.
    stripped = _strip_tags(text)
    if html.unescape(stripped) != text:
        text = stripped
    return _truncate(_one_line(text), max_length)


def _strip_tags(text: str) -> str:
    """The text as HTML with every tag dropped (script and style with their content), escaped."""
    return nh3.clean(text, tags=set(), clean_content_tags={"script", "style"})


def clean_line(value: str, *, max_length: int) -> str:
    """One line of plain text kept as written ("<" and "&" too: it is escaped where it is
    shown), without controls, format or bidi characters; truncated."""
    return _truncate(_one_line(value), max_length)


def _one_line(text: str) -> str:
    """Turn all whitespace into single spaces; drop control, format and bidi characters, and
    U+FFFE and U+FFFF (MJML refuses them)."""
    kept = []
    for char in text:
        if char.isspace():
            kept.append(" ")
        elif unicodedata.category(char) not in ("Cc", "Cf", "Cs") and char not in _NONCHARACTERS:
            kept.append(char)
    return " ".join("".join(kept).split())


def _truncate(text: str, max_length: int) -> str:
    """Cut text to max_length characters at a word boundary, marking the cut with an ellipsis."""
    if len(text) <= max_length:
        return text
    cut = text[: max_length - len(ELLIPSIS)]
    space = cut.rfind(" ")
    if space > max_length // 2:
        cut = cut[:space]
    return cut.rstrip() + ELLIPSIS


def clean_url(url: str, *, base_url: str) -> str:
    """Return an absolute http(s) URL, or "" when the value is not a safe web link."""
    return _absolute_url(url, base_url=base_url, schemes=WEB_SCHEMES)


def _clean_link(url: str, *, base_url: str) -> str:
    """Like clean_url, but mailto: links are allowed too (inside HTML bodies)."""
    return _absolute_url(url, base_url=base_url, schemes=LINK_SCHEMES)


def _absolute_url(url: str, *, base_url: str, schemes: frozenset[str]) -> str:
    """Resolve url against base_url and keep it only if its scheme is allowed."""
    # Browsers drop tabs and newlines anywhere in a URL ("java\tscript:"), so do the same
    # before looking at the scheme; any other control character makes the URL unusable.
    value = "".join(c for c in url if c not in "\t\n\r").strip(" \x0c\x00")
    if not value or any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
        return ""
    try:
        # A URL with its own scheme is taken as it is: urljoin would treat "https:" or
        # "https:\\host" as relative to a base of the same scheme.
        parts = urlsplit(value)
        if not parts.scheme:
            parts = urlsplit(urljoin(base_url, value))
    except ValueError:
        return ""
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        return ""
    if scheme == "mailto":
        return urlunsplit(
            ("mailto", "", quote(parts.path, safe=URL_SAFE), quote(parts.query, safe=URL_SAFE), "")
        )
    # Credentials go: "https://portal.example.org@evil.example/" leads to evil.example while
    # it reads as the portal's address, and no link in a newsletter needs a password. The host
    # is what follows the last "@", as for browsers and urlsplit's hostname.
    netloc = parts.netloc.rpartition("@")[2]
    if not netloc or NETLOC_FORBIDDEN & set(parts.netloc):
        return ""
    return urlunsplit(
        (
            scheme,
            netloc,
            quote(parts.path, safe=URL_SAFE),
            quote(parts.query, safe=URL_SAFE),
            quote(parts.fragment, safe=URL_SAFE),
        )
    )


def to_utc(parsed: time.struct_time | None, *, fallback: datetime) -> datetime:
    """Turn feedparser's UTC struct_time into an aware UTC datetime, or return fallback."""
    if parsed is None:
        return fallback
    try:
        return datetime(*parsed[:6], tzinfo=UTC)
    except (TypeError, ValueError, OverflowError):
        return fallback


class _DepthCounter(HTMLParser):
    """Counts how deep the elements of well-formed HTML nest."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # text in one piece: fewer calls
        self.depth = 0
        self.deepest = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID_TAGS:
            self.depth += 1
            self.deepest = max(self.deepest, self.depth)

    def handle_endtag(self, tag: str) -> None:
        self.depth = max(self.depth - 1, 0)


def html_depth(fragment: str) -> int:
    """How deep the elements of sanitised (well-formed, all tags closed) HTML nest."""
    counter = _DepthCounter()
    counter.feed(fragment)
    counter.close()
    return counter.deepest
