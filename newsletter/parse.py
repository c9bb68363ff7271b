"""Parse a feed document into cleaned items: pure (no database, no network, no clock).

A document is checked in this order, and rejected whole with a FeedParseError at the first
problem, so a bad feed is never half-ingested:

1. shape: empty, an HTML page or JSON are named as such;
2. encoding: a byte-order mark wins, else the XML declaration, else UTF-8. The bytes are decoded
   strictly with that encoding (windows-1251, UTF-16 … are ingested correctly) and handed on as
   UTF-8. A declared single-byte encoding whose bytes are in fact UTF-8 is refused, because
   decoding it "as declared" would silently store mojibake. A codec no feed is written in
   (punycode, whose decoder is quadratic, utf-7 …) is refused by name;
3. DTDs: any <!ENTITY declaration is refused before any XML parser runs (entity-expansion
   bombs, external entities such as file:///etc/passwd), and defusedxml enforces the same
   while checking the document is well-formed XML whose root is a feed (rss, RDF, Atom). A
   bare DOCTYPE (old RSS 0.91) is fine: its DTD is never fetched. HTML entities such as
   &nbsp; outside CDATA are undefined in XML, so such a feed is refused as malformed;
4. feedparser reads the checked UTF-8 bytes from memory, never from a path or URL: from the
   root element on, behind a declaration of our own, without elements naming people (which
   the newsletter never uses) and with at most MAX_ATTRIBUTES attributes on any element;
5. each HTML field goes through feedparser's sanitiser (made linear) and then nh3, nested at
   most MAX_HTML_DEPTH deep.

Every step is linear in the size of the document (at most [sources] max_bytes): each regular
expression says why next to it, and the steps of feedparser and nh3 that were not linear are
guarded where they are called.

Item identity is the guid (Atom id), else the link, else a hash of title and summary; a feed
that repeats an identity keeps the last entry with it, as a run of upserts would.
"""

from __future__ import annotations

import codecs
import hashlib
import html
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urljoin
from xml.parsers import expat

import defusedxml.ElementTree as SafeET
import feedparser
from defusedxml import DefusedXmlException
from feedparser.sanitizer import _HTMLSanitizer

from newsletter.errors import FeedParseError
from newsletter.sanitize import (
    ALLOWED_ATTRIBUTES,
    MAX_HTML_DEPTH,
    UNESCAPE_ROUNDS,
    VOID_TAGS,
    clean_html,
    clean_line,
    clean_text,
    clean_url,
    html_depth,
    to_utc,
)

TITLE_MAX = 300
# A date further ahead than this is no date: it would keep an item first in every list, and
# "recent" for the urgent alerts, for years. A day covers any time zone written wrong.
FUTURE_SLACK = timedelta(days=1)
CATEGORY_MAX = 100
GUID_MAX = 500
LINK_MAX = 2000  # the items.link column; PostgreSQL refuses longer values
FEED_ROOTS = frozenset(
    {
        "rss",
        "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}RDF",
        "{http://www.w3.org/2005/Atom}feed",
        "{http://purl.org/atom/ns#}feed",
    }
)
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# UTF-16 without a BOM still starts with "<?" (XML 1.0, appendix F).
BOMLESS_UTF16 = ((b"<\x00?\x00", "utf-16-le"), (b"\x00<\x00?", "utf-16-be"))
# An XML declaration is a few dozen characters; one that does not close (">") within this many
# is refused, so nothing ever searches a whole document for the end of one.
DECLARATION_MAX = 1024
# Both expressions run on the declaration alone (at most DECLARATION_MAX characters), and are
# linear anyway: one literal, then single character-class loops each followed by a character
# outside its class, so a failed attempt backtracks over one run at most once.
DECLARED_ENCODING = re.compile(r"encoding\s*=\s*[\"']([A-Za-z0-9._:-]+)[\"']")
ENCODING_VALUE = re.compile(r"(encoding\s*=\s*)[\"'][^\"']*[\"']")
# A literal: re compares at most eight characters at each position, so the search is linear.
ENTITY_DECLARATION = re.compile(r"<!ENTITY", re.IGNORECASE)
# One character-class loop anchored where it is applied: linear, with nothing after it to retry.
SPACE = re.compile(r"\s*")
# nh3's tokenizer takes time quadratic in the named character references ("&amp;", even a bare
# "&") of one text: a million took 12 s. Fifty thousand take milliseconds, and no article needs
# as many.
MAX_REFERENCES = 50_000
# Two fixed characters: no quantifier at all, so findall is one linear pass.
TAG_START = re.compile(r"<[A-Za-z]")
# What feedparser reads instead of the document's own prolog (see _for_feedparser).
FEEDPARSER_DECLARATION = b'<?xml version="1.0" encoding="utf-8"?>\n'
# feedparser looks each attribute up by a linear scan of the element's attributes (quadratic in
# their number); no feed element needs more than a dozen.
MAX_ATTRIBUTES = 32
# feedparser keeps every namespace prefix a document declares, and matches each element of a
# namespace it does not know against all of them (quadratic: 19,000 prefixes and 125,000 such
# elements took 240 s for 1 MB). A feed declares a dozen or two (atom, dc, content, itunes, ...);
# capping the distinct prefixes makes that match a bounded cost per element.
MAX_NAMESPACE_PREFIXES = 50
# Elements naming people, which feedparser splits with an expression quadratic in their length;
# the newsletter never uses them, so feedparser does not get them.
PEOPLE_ELEMENTS = frozenset(
    {"author", "creator", "managingeditor", "webmaster", "publisher", "owner"}
)
# Elements feedparser makes categories ("tags") of, one each or one per comma of their text
# (itunes:keywords, media:keywords, tags). It checks each new one against all the entry's others
# (a linear scan, so quadratic in their number: 20,000 keywords in 109 KB took 7 s). A feed
# with more than MAX_TAGS of them (counting commas) on one item, or MAX_FEED_TAGS in all, is
# refused before feedparser runs: the scans then compare at most MAX_FEED_TAGS * MAX_TAGS / 2
# pairs, a fraction of a second.
TAG_ELEMENTS = frozenset({"category", "subject", "keywords", "tags"})
ENTRY_ELEMENTS = frozenset({"item", "entry"})
MAX_TAGS = 100
MAX_FEED_TAGS = 20_000
UNICODE_FAMILY = ("utf-8", "utf-16", "utf-32")
# The encodings a feed may declare, by Python's codec name: Unicode, the single-byte code pages
# (charmap tables: one lookup per byte) and the usual East Asian multi-byte ones. Python also
# decodes "punycode" (quadratic: 1.3 MB took 80 s, a 5 MB feed would hold its ingest about 20
# minutes), "idna", "utf-7" and the escape codecs, which no feed is written in.
SINGLE_BYTE_PREFIXES = ("iso8859-", "cp", "mac-", "koi8-")
OTHER_ENCODINGS = frozenset(
    {"ascii", "tis-620", "kz1048", "ptcp154", "hp-roman8", "gbk", "gb2312", "gb18030", "big5"}
    | {"big5hkscs", "euc_jp", "euc_jis_2004", "euc_jisx0213", "euc_kr", "iso2022_jp", "johab"}
    | {"iso2022_kr", "shift_jis", "shift_jis_2004", "shift_jisx0213", "hz"}
)
# feedparser flags these as "bozo" although the document is fine for us: we chose and applied
# the encoding ourselves, and we never hand it an HTTP Content-Type. Anything else it flags
# (a SAX error, an undeclared namespace, an unknown encoding) means it read the document
# differently from how defusedxml did, so the feed is refused.
HARMLESS_BOZO = (feedparser.CharacterEncodingOverride, feedparser.NonXMLContentType)
# The content types feedparser sanitises as HTML.
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# html5ever's "special" elements and scope boundaries, as its tree builder uses them for end tags
# (the HTML standard, 13.2.4.2 and 13.2.4.3): _FirstPass mirrors them to follow its nesting.
SPECIAL = frozenset(
    {
        "address", "applet", "area", "article", "aside", "base", "basefont", "bgsound",
        "blockquote", "body", "br", "button", "caption", "center", "col", "colgroup", "dd",
        "details", "dialog", "dir", "div", "dl", "dt", "embed", "fieldset", "figcaption",
        "figure", "footer", "form", "frame", "frameset", "h1", "h2", "h3", "h4", "h5", "h6",
        "head", "header", "hgroup", "hr", "html", "iframe", "img", "input", "keygen", "li",
        "link", "listing", "main", "marquee", "menu", "meta", "nav", "noembed", "noframes",
        "noscript", "object", "ol", "p", "param", "plaintext", "pre", "script", "search",
        "section", "select", "source", "style", "summary", "table", "tbody", "td", "template",
        "textarea", "tfoot", "th", "thead", "title", "tr", "track", "ul", "wbr", "xmp",
        "mi", "mo", "mn", "ms", "mtext", "annotation-xml", "foreignobject", "desc",
    }
)  # fmt: skip
SCOPE_BOUNDARIES = frozenset(
    {"applet", "caption", "html", "table", "td", "th", "marquee", "object", "template"}
    | {"mi", "mo", "mn", "ms", "mtext", "annotation-xml", "foreignobject", "desc", "title"}
)
SCOPE_EXTRA = {"p": {"button"}, "li": {"ol", "ul"}}
# A start tag that closes an open element of these names when it is the innermost one, as
# HTML does: feeds often leave <p> and <li> unclosed.
IMPLIED_END = {
    "p": {"p"},
    "li": {"li"},
    "dt": {"dt", "dd"},
    "dd": {"dt", "dd"},
    "tr": {"tr", "td", "th"},
    "td": {"td", "th"},
    "th": {"td", "th"},
    "option": {"option"},
}


@dataclass(frozen=True)
class ParsedItem:
    """One feed entry, cleaned and ready to upsert."""

    guid: str
    link: str
    title: str
    summary_html: str
    content_html: str
    published_at: datetime
    categories: tuple[str, ...]
    urgent: bool
    content_hash: str
    # False when the entry had no usable date (none, unreadable, or more than FUTURE_SLACK
    # ahead): published_at is then `now`, and the content hash leaves it out, so the next
    # ingest sees the item unchanged instead of moving it to the top again.
    dated: bool = True
    # True when its date was more than FUTURE_SLACK ahead: once that date comes, the same
    # document gives the item its date (and a new content hash).
    ahead: bool = False


def parse_feed(
    content: bytes, *, source: str, base_url: str, urgent_category: str, now: datetime
) -> list[ParsedItem]:
    """Check and parse a feed document into cleaned items, or raise FeedParseError."""
    text = _decode(content, source)
    _check_document(text, source)
    document = _for_feedparser(_as_utf8_document(text, source), source)
    # feedparser's own sanitiser is quadratic in two steps: it runs below as _FirstPass, with
    # those two made linear. nh3 resolves links, against each field's xml:base.
    parsed = feedparser.parse(
        io.BytesIO(document), sanitize_html=False, resolve_relative_uris=False
    )
    if parsed.bozo and not isinstance(parsed.bozo_exception, HARMLESS_BOZO):
        raise FeedParseError(source, f"malformed feed: {_one_line(parsed.bozo_exception)}")
    site = clean_url(parsed.feed.get("link", ""), base_url=base_url) or base_url
    atom = str(parsed.get("version", "")).startswith("atom")
    items = (
        _parse_entry(entry, base_url=site, urgent_category=urgent_category, now=now, atom=atom)
        for entry in parsed.entries
    )
    try:
        return _last_per_guid(items)
    except _TooComplex as e:
        raise FeedParseError(source, str(e)) from None


def _decode(content: bytes, source: str) -> str:
    """Decode the document by BOM, else XML declaration, else UTF-8; refuse what does not fit."""
    if not content.strip():
        raise FeedParseError(source, "empty document, not a feed")
    encoding, body = _sniff_encoding(content, source)
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise FeedParseError(source, f"unknown encoding {encoding!r} declared") from None
    if not _feed_encoding(codec):
        raise FeedParseError(
            source, f"encoding {encoding!r} is refused: feeds are not written in it"
        )
    try:
        text = body.decode(encoding)
    except LookupError:
        raise FeedParseError(source, f"unknown encoding {encoding!r} declared") from None
    except UnicodeDecodeError as e:
        raise FeedParseError(
            source, f"bytes are not valid {encoding} (at byte {e.start})"
        ) from None
    if not encoding.lower().replace("_", "-").startswith(UNICODE_FAMILY) and _is_utf8(body):
        raise FeedParseError(
            source, f"declares encoding {encoding!r} but the bytes are UTF-8; fix the declaration"
        )
    return text


def _feed_encoding(codec: str) -> bool:
    """True for a Python codec name a feed may be decoded with (see OTHER_ENCODINGS)."""
    return codec.startswith((*UNICODE_FAMILY, *SINGLE_BYTE_PREFIXES)) or codec in OTHER_ENCODINGS


def _sniff_encoding(content: bytes, source: str) -> tuple[str, bytes]:
    """Return the encoding to decode with and the bytes without any byte-order mark."""
    for bom, encoding in BOMS:
        if content.startswith(bom):
            return encoding, content[len(bom) :]
    for prefix, encoding in BOMLESS_UTF16:
        if content.startswith(prefix):
            return encoding, content
    start = len(content) - len(content.lstrip())
    # The declaration is ASCII in every ASCII-compatible encoding; latin-1 decodes any byte.
    head = content[start : start + DECLARATION_MAX + 1].decode("latin-1")
    declared = DECLARED_ENCODING.search(_declaration(head, source))
    return (declared.group(1) if declared else "utf-8"), content


def _declaration(head: str, source: str) -> str:
    """The XML declaration head starts with, up to its first ">" ("" when there is none)."""
    if not head.startswith("<?xml") or not head[5:6].isspace():
        return ""
    end = head.find(">", 0, DECLARATION_MAX)
    if end < 0:
        raise FeedParseError(
            source, f"the XML declaration does not end within {DECLARATION_MAX} characters"
        )
    return head[: end + 1]


def _is_utf8(body: bytes) -> bool:
    """True when non-ASCII bytes decode as UTF-8 (practically never true of legacy text)."""
    if body.isascii():
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_document(text: str, source: str) -> None:
    """Refuse HTML, JSON, entity declarations, malformed XML and non-feed roots."""
    if _is_html(text):
        raise FeedParseError(source, "an HTML page, not a feed")
    if _is_json(text):
        raise FeedParseError(source, "a JSON document, not an RSS or Atom feed")
    if ENTITY_DECLARATION.search(text):
        raise FeedParseError(source, "DTD entity declarations are refused (<!ENTITY)")
    try:
        root = SafeET.fromstring(
            _as_utf8_document(text, source),
            forbid_dtd=False,
            forbid_entities=True,
            forbid_external=True,
        )
    except DefusedXmlException as e:
        raise FeedParseError(source, f"refused: {type(e).__name__}") from None
    except SafeET.ParseError as e:
        raise FeedParseError(source, f"not well-formed XML: {e}") from None
    if root.tag not in FEED_ROOTS:
        raise FeedParseError(source, f"not a feed: root element is <{_local(root.tag)}>")


def _is_html(text: str) -> bool:
    """True when, after whitespace and comments, the text opens with <!doctype html or <html."""
    # A scan, not one expression: "(<!--.*?-->\s*)*<html" backtracks exponentially on a few
    # hundred bytes of comments. Each comment ends at its first "-->", as in HTML.
    pos = _after_space(text, 0)
    while text.startswith("<!--", pos):
        end = text.find("-->", pos + 4)
        if end < 0:
            return False
        pos = _after_space(text, end + 3)
    head = text[pos : pos + 9].lower()
    if head == "<!doctype":
        name = _after_space(text, pos + 9)
        return name > pos + 9 and text[name : name + 4].lower() == "html"
    return head[:5] == "<html" and (head[5:6].isspace() or head[5:6] == ">")


def _after_space(text: str, pos: int) -> int:
    """The position of the first non-whitespace character at or after pos."""
    match = SPACE.match(text, pos)
    return match.end() if match else pos


def _is_json(text: str) -> bool:
    """True for a document that parses as a JSON object or array."""
    if not text.lstrip().startswith(("{", "[")):
        return False
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # "[[[[…" deeper than the interpreter's stack
        return False
    return True


def _as_utf8_document(text: str, source: str) -> bytes:
    """Encode as UTF-8 and make the XML declaration say so."""
    start = len(text) - len(text.lstrip())
    declaration = _declaration(text[start : start + DECLARATION_MAX + 1], source)
    if not declaration:
        return text.encode("utf-8")
    end = start + len(declaration)
    declaration = ENCODING_VALUE.sub(r'\1"utf-8"', declaration, count=1)
    return (text[:start] + declaration + text[end:]).encode("utf-8")


def _for_feedparser(document: bytes, source: str) -> bytes:
    """The checked document as feedparser reads it: a fresh declaration, the root element on.

    feedparser searches the prolog with expressions that are quadratic on runs of blank lines
    and break on comments naming a DOCTYPE, and splits people's names quadratically; none of
    that is needed, so the prolog and PEOPLE_ELEMENTS are left out. The document was already
    checked (no entity declarations, well-formed), so expat reads it safely here.
    """
    scan = _ElementScan(source)
    scan.run(document)
    pieces = [FEEDPARSER_DECLARATION]
    keep_from = scan.root
    for cut_start, cut_end in scan.cuts:
        pieces.append(document[keep_from:cut_start])
        keep_from = cut_end
    pieces.append(document[keep_from:])
    return b"".join(pieces)


class _ElementScan:
    """One expat pass: where the root starts, which byte ranges to leave out, attribute and
    category counts."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.root = -1
        self.cuts: list[tuple[int, int]] = []
        self._cut_start = -1
        self._skip_depth = 0
        self._cut_pending = False
        self._tags = 0  # categories of the current entry (or of the feed, before the first)
        self._feed_tags = 0
        self._tag_depth = 0  # inside a TAG_ELEMENTS element: its commas count too
        self._prefixes: set[str] = set()
        self._parser = expat.ParserCreate()

    def run(self, document: bytes) -> None:
        parser = self._parser
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._text
        for name in ("Comment", "ProcessingInstruction", "StartCdataSection"):
            setattr(parser, f"{name}Handler", self._event)
        parser.Parse(document, True)

    def _text(self, data: str) -> None:
        self._event()
        if self._tag_depth:
            self._count_tags(data.count(","))

    def _count_tags(self, more: int) -> None:
        self._tags += more
        self._feed_tags += more
        if self._tags > MAX_TAGS:
            raise FeedParseError(self.source, f"an item has more than {MAX_TAGS} categories")
        if self._feed_tags > MAX_FEED_TAGS:
            raise FeedParseError(self.source, f"the feed has more than {MAX_FEED_TAGS} categories")

    def _event(self, *_: object) -> None:
        """Any event after a left-out element's end marks where that element ended."""
        if self._cut_pending:
            self.cuts.append((self._cut_start, self._parser.CurrentByteIndex))
            self._cut_pending = False

    def _start(self, name: str, attributes: dict[str, str]) -> None:
        self._event()
        if len(attributes) > MAX_ATTRIBUTES:
            raise FeedParseError(
                self.source, f"<{_local(name)}> has more than {MAX_ATTRIBUTES} attributes"
            )
        for key in attributes:  # at most MAX_ATTRIBUTES
            if key == "xmlns" or key.startswith("xmlns:"):
                self._prefixes.add(key)
        if len(self._prefixes) > MAX_NAMESPACE_PREFIXES:
            raise FeedParseError(
                self.source, f"the feed declares more than {MAX_NAMESPACE_PREFIXES} namespaces"
            )
        if self.root < 0:
            self.root = self._parser.CurrentByteIndex
        local = name.rpartition(":")[2].lower()
        if local in ENTRY_ELEMENTS:
            self._tags = 0
        elif local in TAG_ELEMENTS:
            self._tag_depth += 1
            self._count_tags(1)
        if self._skip_depth:
            self._skip_depth += 1
        elif local in PEOPLE_ELEMENTS:
            self._skip_depth = 1
            self._cut_start = self._parser.CurrentByteIndex

    def _end(self, name: str) -> None:
        self._event()
        if self._tag_depth and name.rpartition(":")[2].lower() in TAG_ELEMENTS:
            self._tag_depth -= 1
        if self._skip_depth:
            self._skip_depth -= 1
            self._cut_pending = self._skip_depth == 0


def _local(tag: str) -> str:
    """An element name without its {namespace}, cleaned for an error line."""
    return clean_text(tag.rpartition("}")[2], max_length=40)


def _one_line(error: object) -> str:
    """An exception as one short line."""
    return clean_text(str(error) or type(error).__name__, max_length=200)


def _parse_entry(
    entry: Any, *, base_url: str, urgent_category: str, now: datetime, atom: bool
) -> ParsedItem:
    """Clean one feedparser entry (of an Atom feed when `atom`) into a ParsedItem."""
    summary = _clean_field(entry.get("summary", ""), entry.get("summary_detail"), base_url, atom)
    contents = entry.get("content") or [{}]
    content = _clean_field(contents[0].get("value", ""), contents[0], base_url, atom)
    title = _title(entry.get("title", ""), entry.get("title_detail"), atom)
    link = clean_url(entry.get("link", ""), base_url=base_url)
    link = link if len(link) <= LINK_MAX else ""
    categories = _categories(entry, atom)
    published = to_utc(_entry_date(entry), fallback=now)
    ahead = published is not now and published > now + FUTURE_SLACK
    dated = published is not now and not ahead
    fields: dict[str, Any] = {
        "link": link,
        "title": title,
        "summary_html": summary,
        "content_html": content,
        "published_at": published if dated else now,
        "categories": categories,
        "urgent": urgent_category.casefold() in {c.casefold() for c in categories},
    }
    guid = _identity(entry.get("id", ""), link, title, summary)
    content_hash = _hash_fields(fields, dated)
    return ParsedItem(guid=guid, content_hash=content_hash, dated=dated, ahead=ahead, **fields)


def _plain(detail: Any, atom: bool) -> bool:
    """True for a field its feed declares plain text, to be shown as written."""
    # Atom declares each text's type (RFC 4287 3.1.1 and 4.1.3.3: "text", its default, and any
    # text/* but text/html are plain text), and feedparser reports it. RSS declares none:
    # feedparser's "text/plain" there is a guess, made for any text without an end tag or with
    # a tag it does not list (an escaped <script>), so RSS fields are read as HTML, as before.
    kind = str((detail or {}).get("type") or "")
    return atom and kind.startswith("text/") and kind not in HTML_TYPES


def _title(value: str, detail: Any, atom: bool) -> str:
    """The entry's title as one line: plain text kept as written, HTML without its tags."""
    if _plain(detail, atom):
        return clean_line(value, max_length=TITLE_MAX)
    return _text_field(_first_pass(value, detail), TITLE_MAX)


def _clean_field(value: str, detail: Any, base_url: str, atom: bool) -> str:
    """Sanitise a field as HTML (escaped first when it is plain text); its relative links
    resolve against its xml:base, else the site."""
    base = urljoin(base_url, (detail or {}).get("base") or "")
    plain = _plain(detail, atom)
    first = html.escape(value, quote=False) if plain else _first_pass(value, detail)
    _check_references(first)
    cleaned = clean_html(first, base_url=base)
    # The first pass estimates nesting as sgmllib reads it; this is nh3's exact result.
    if html_depth(cleaned) > MAX_HTML_DEPTH:
        raise _TooComplex(f"an item's HTML nests more than {MAX_HTML_DEPTH} elements deep")
    return cleaned


def _first_pass(value: str, detail: Any) -> str:
    """feedparser's sanitiser over an HTML field, as feedparser would run it; others unchanged."""
    if (detail or {}).get("type") not in HTML_TYPES:
        return value
    # Its sgmllib tokeniser reads broken markup ("<scr<script>ipt>") differently from nh3's
    # HTML5 one, so what either would leave as text, the other removes.
    sanitizer = _FirstPass("utf-8", detail["type"])
    sanitizer.feed(value.replace("<![CDATA[", "&lt;![CDATA["))
    return str(sanitizer.output()).strip().replace("\r\n", "\n")


class _TooComplex(ValueError):
    """An HTML field nests too deep or holds too many character references for nh3."""


class _FirstPass(_HTMLSanitizer):  # type: ignore[misc]
    """feedparser's sanitiser without its two quadratic steps, and two guards for nh3.

    nh3's parser (html5ever) is quadratic in nesting depth, and given formatting elements that
    differ only in attributes (<b title=1><b title=2>…) misnested, it rebuilds each again and
    again: 120 KB of such markup became 224 MB. So a field nested deeper than MAX_HTML_DEPTH is
    refused here, and attributes nh3 would drop anyway are dropped first.
    """

    def __init__(self, encoding: str, content_type: str) -> None:
        super().__init__(encoding, content_type)
        self._unclosed_in: str | None = None
        self._unclosed_from = 0
        self._open: list[str] = []

    def unknown_starttag(self, tag: str, attrs: list[tuple[str, str]]) -> None:
        kept = ALLOWED_ATTRIBUTES.get(tag, set())
        super().unknown_starttag(tag, [(k, v) for k, v in attrs if k.lower() in kept])
        if tag in VOID_TAGS or tag in self.elements_no_end_tag:
            return
        if self._open and self._open[-1] in IMPLIED_END.get(tag, ()):
            self._open.pop()
        self._open.append(tag)
        if len(self._open) > MAX_HTML_DEPTH:
            raise _TooComplex(f"an item's HTML nests more than {MAX_HTML_DEPTH} elements deep")

    def unknown_endtag(self, tag: str) -> None:
        super().unknown_endtag(tag)
        # As html5ever does: a special element (div, p …) or, for a special end tag, a scope
        # boundary (table …) between here and the element makes the end tag a no-op.
        stops = SCOPE_BOUNDARIES | SCOPE_EXTRA.get(tag, set()) if tag in SPECIAL else SPECIAL
        for depth in range(len(self._open) - 1, -1, -1):
            if self._open[depth] == tag:
                del self._open[depth:]
                return
            if self._open[depth] in stops:
                return

    def sanitize_style(self, style: str) -> str:
        # Its checks backtrack quadratically on a long style value; nh3 drops style attributes.
        return ""

    def parse_comment(self, i: int, report: int = 1) -> int:
        # As feedparser ends a comment: at "--" [space] ">", else at "--" and the next ">", else
        # never. Searching the whole rest again for each unclosed comment was quadratic, so a
        # search that found no close is remembered, and the fallback is two find() calls.
        rawdata = self.rawdata
        if rawdata is not self._unclosed_in or i < self._unclosed_from:
            end = int(super(_HTMLSanitizer, self).parse_comment(i, report))
            if end >= 0:
                return end
            self._unclosed_in, self._unclosed_from = rawdata, i
        dashes = rawdata.find("--", i + 4)
        close = rawdata.find(">", dashes + 2) if dashes >= 0 else -1
        return close + 1 if close >= 0 else len(rawdata)


def _text_field(value: str, max_length: int) -> str:
    """clean_text, for a field with at most MAX_HTML_DEPTH tags however often it is unescaped."""
    # clean_text strips tags with nh3 (quadratic in nesting) once more than it unescapes; a
    # title, id or category never needs a hundred tags.
    unescaped = value
    for _ in range(UNESCAPE_ROUNDS + 1):
        if len(TAG_START.findall(unescaped)) > MAX_HTML_DEPTH:
            raise _TooComplex(f"an item's title, id or category has over {MAX_HTML_DEPTH} tags")
        _check_references(unescaped)
        unescaped = html.unescape(unescaped)
    return clean_text(value, max_length=max_length)


def _check_references(value: str) -> None:
    """Refuse more "&" than nh3 can take: it is quadratic in named references in one text."""
    if value.count("&") > MAX_REFERENCES:
        raise _TooComplex(f"an item's text has more than {MAX_REFERENCES} character references")


def _entry_date(entry: Any) -> Any:
    """The entry's publication date, else its update date (feedparser's UTC struct_time)."""
    # dict.get: feedparser's own get("updated_parsed") falls back to published_parsed with a
    # DeprecationWarning, one per entry whose date it could not read.
    return dict.get(entry, "published_parsed") or dict.get(entry, "updated_parsed")


def _categories(entry: Any, atom: bool) -> tuple[str, ...]:
    """Cleaned, de-duplicated category names in feed order."""
    terms = (tag.get("term") or "" for tag in entry.get("tags", []))
    # An Atom category's term is an attribute, plain text by definition; RSS ones are read as
    # titles are.
    names = (
        clean_line(term, max_length=CATEGORY_MAX) if atom else _text_field(term, CATEGORY_MAX)
        for term in terms
    )
    return tuple(dict.fromkeys(name for name in names if name))


def _identity(guid: str, link: str, title: str, summary: str) -> str:
    """The item's id: its guid, else its link, else a hash of its title and summary."""
    guid = _text_field(guid, 10_000)
    if guid and len(guid) <= GUID_MAX:
        return guid
    if guid:
        return "sha256:" + _sha256(guid)
    return link or "sha256:" + _sha256(f"{title}\n{summary}")


def _hash_fields(fields: dict[str, Any], dated: bool) -> str:
    """A stable hash of the cleaned fields, to tell changed items from unchanged ones."""
    published = fields["published_at"].isoformat() if dated else None  # `now` changes each run
    payload = {**fields, "published_at": published}
    return _sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _last_per_guid(items: Iterator[ParsedItem]) -> list[ParsedItem]:
    """Keep the last entry for each guid, in the order the guids first appeared."""
    by_guid: dict[str, ParsedItem] = {}
    for item in items:
        by_guid[item.guid] = item
    return list(by_guid.values())
