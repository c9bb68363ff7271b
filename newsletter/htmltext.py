"""HTML to plain text for emails: shorten a summary, write HTML out as text, wrap and tidy it.

Pure functions on sanitised HTML (html.parser, never a browser or the network); the Jinja2
filters shorten, to_text and wrap of the campaign templates, and the text part of notices.
"""

from __future__ import annotations

import html
import re
import textwrap
from html.parser import HTMLParser

TEXT_WIDTH = 72

# Each expression below is linear on any text: none nests a quantifier, and each repeated part
# is one character class followed by nothing that could match the same character.
# One character, repeated: a run of newlines is matched once, from its first character.
_BLANK_LINES = re.compile(r"\n{3,}")
# HTML collapses ASCII whitespace only: no-break spaces in summaries are kept on purpose.
# One class, repeated: each run is matched once and consumed, so sub() is a single pass.
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")
# The number html_to_text writes before an item of an ordered list ("1. " to "999. "): matched
# at the start of a line only and at most five characters long, so constant time per line.
_NUMBERED_ITEM = re.compile(r"[0-9]{1,3}\. ")


# --- shortening summaries ----------------------------------------------------------------------

# A sentence ends with . ! ? or … (and any closing quotes or brackets), then a space.
# Linear: it starts only at a punctuation mark, and the quote run after it can hold no mark, so
# no character is scanned by two attempts; it is applied to max_chars + 1 characters only.
_SENTENCE_END = re.compile(r"[.!?…][\"'»”’)\]]*(?=\s)")
_VOID_TAGS = frozenset({"br", "hr", "img"})


class _Tokenizer(HTMLParser):
    """Splits sanitised HTML into start tags, end tags and text, keeping attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tokens: list[tuple[str, str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tokens.append(("start", tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tokens.append(("start", tag, attrs))

    def handle_endtag(self, tag: str) -> None:
        self.tokens.append(("end", tag, []))

    def handle_data(self, data: str) -> None:
        self.tokens.append(("text", data, []))


def shorten_html(fragment: str, max_chars: int) -> str:
    """Cut sanitised HTML to about max_chars of text, at a sentence end if one is near, tags closed.

    0 gives "". Without a sentence end in the second half of the limit, the cut falls between
    words and ends with an ellipsis.
    """
    if max_chars <= 0:
        return ""
    tokenizer = _Tokenizer()
    tokenizer.feed(fragment)
    tokenizer.close()
    tokens = tokenizer.tokens
    text = "".join(value for kind, value, _ in tokens if kind == "text")
    if len(_HTML_SPACE.sub(" ", text).strip()) <= max_chars:
        return fragment
    cut, ellipsis = _cut_point(text, max_chars)
    return _serialise_until(tokens, cut, ellipsis)


def _cut_point(text: str, max_chars: int) -> tuple[int, bool]:
    """Where to cut the text (an offset) and whether an ellipsis is needed."""
    head = text[: max_chars + 1]
    ends = [m.end() for m in _SENTENCE_END.finditer(head) if m.end() <= max_chars]
    if ends and ends[-1] >= max_chars // 2:
        return ends[-1], False
    space = head.rfind(" ", 0, max_chars)
    cut = space if space > max_chars // 2 else max_chars
    return len(text[:cut].rstrip(" ,;:-–—")), True


def _serialise_until(
    tokens: list[tuple[str, str, list[tuple[str, str | None]]]], cut: int, ellipsis: bool
) -> str:
    out: list[str] = []
    open_tags: list[str] = []
    seen = 0
    for kind, value, attrs in tokens:
        if kind == "text":
            take = value[: max(cut - seen, 0)]
            seen += len(value)
            out.append(html.escape(take, quote=False))
            if seen >= cut:
                break
        elif kind == "start":
            out.append(_start_tag(value, attrs))
            if value not in _VOID_TAGS:
                open_tags.append(value)
        elif value in open_tags:
            while open_tags:
                out.append(f"</{open_tags[-1]}>")
                if open_tags.pop() == value:
                    break
    if ellipsis:
        out.append("…")
    out.extend(f"</{tag}>" for tag in reversed(open_tags))
    return "".join(out)


def _start_tag(tag: str, attrs: list[tuple[str, str | None]]) -> str:
    rendered = "".join(f' {name}="{html.escape(value or "", quote=True)}"' for name, value in attrs)
    return f"<{tag}{rendered}>"


# --- plain text ------------------------------------------------------------------------------

_PARAGRAPH = "\x00"
_BLOCK_TAGS = frozenset(
    {"p", "div", "ul", "ol", "li", "blockquote", "pre", "table", "tr", "hr"}
    | {f"h{level}" for level in range(1, 7)}
)


class _TextExtractor(HTMLParser):
    """Collects the text of sanitised HTML, marking paragraph breaks and writing out links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._links: list[tuple[str, int]] = []
        # The open lists, innermost last: the items an <ol> numbered so far, None for a <ul>.
        self._lists: list[int | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append(_PARAGRAPH)
        if tag in ("ol", "ul"):
            self._lists.append(0 if tag == "ol" else None)
        elif tag == "li":
            self.parts.append(self._item_prefix())
        elif tag == "br":
            self.parts.append("\n")
        elif tag == "a":
            self._links.append((dict(attrs).get("href") or "", len(self.parts)))

    def _item_prefix(self) -> str:
        """A list item's prefix: "1. ", "2. " … in an ordered list, else "- "."""
        count = self._lists[-1] if self._lists else None
        if count is None:
            return "- "
        self._lists[-1] = count + 1
        return f"{count + 1}. "

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append(_PARAGRAPH)
        if tag in ("ol", "ul") and self._lists:
            self._lists.pop()
        elif tag == "a" and self._links:
            href, start = self._links.pop()
            label = "".join(self.parts[start:]).strip()
            if href and href != label:
                self.parts.append(f" ({href})")

    def handle_data(self, data: str) -> None:
        self.parts.append(_HTML_SPACE.sub(" ", data))


def html_to_text(fragment: str) -> str:
    """Sanitised HTML to plain paragraphs: tags dropped, entities decoded, links written out."""
    extractor = _TextExtractor()
    extractor.feed(fragment)
    extractor.close()
    paragraphs = []
    for block in "".join(extractor.parts).split(_PARAGRAPH):
        lines = (line.strip(" ") for line in block.split("\n"))
        paragraph = "\n".join(line for line in lines if line)
        if paragraph:
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def wrap_text(value: str, width: int = TEXT_WIDTH) -> str:
    """Wrap each line of plain text at `width` columns, never breaking a URL or a word."""
    wrapped = []
    for line in value.split("\n"):
        filled = textwrap.fill(
            line,
            width=width,
            subsequent_indent=_hanging_indent(line),
            break_long_words=False,
            break_on_hyphens=False,
        )
        wrapped.append(filled)
    return "\n".join(wrapped)


def _hanging_indent(line: str) -> str:
    """Spaces as wide as a list item's "- " or "12. " prefix, so its wrapped lines align."""
    if line.startswith("- "):
        return "  "
    numbered = _NUMBERED_ITEM.match(line)
    return " " * numbered.end() if numbered else ""


def tidy_text(text: str) -> str:
    """Plain text with no trailing spaces, at most one blank line in a row, one final newline."""
    lines = (line.rstrip() for line in text.splitlines())
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip() + "\n"
