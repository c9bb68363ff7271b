"""Ingest: fetch a source (conditional GET or a file), check and parse it, upsert its items.

A document is checked in this order, and rejected whole with a FeedParseError at the first
problem, so a bad feed is never half-ingested:

1. shape: empty, an HTML page or JSON are named as such;
2. encoding: a byte-order mark wins, else the XML declaration, else UTF-8. The bytes are decoded
   strictly with that encoding (windows-1251, UTF-16 … are ingested correctly) and handed on as
   UTF-8. A declared single-byte encoding whose bytes are in fact UTF-8 is refused, because
   decoding it "as declared" would silently store mojibake;
3. DTDs: any <!ENTITY declaration is refused before any XML parser runs (entity-expansion
   bombs, external entities such as file:///etc/passwd), and defusedxml enforces the same
   while checking the document is well-formed XML whose root is a feed (rss, RDF, Atom). A
   bare DOCTYPE (old RSS 0.91) is fine: its DTD is never fetched. HTML entities such as
   &nbsp; outside CDATA are undefined in XML, so such a feed is refused as malformed;
4. feedparser reads the checked UTF-8 bytes from memory, never from a path or URL.

Item identity is the guid (Atom id), else the link, else a hash of title and summary; a feed
that repeats an identity keeps the last entry with it, as a run of upserts would.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import defusedxml.ElementTree as SafeET
import feedparser
from defusedxml import DefusedXmlException
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import Clock
from newsletter.config import SourcesSettings
from newsletter.db import unit_of_work
from newsletter.db.models import Item, Source
from newsletter.errors import FeedError, FeedParseError
from newsletter.fetch import FetchResult, fetch_source, file_path, is_file_source
from newsletter.lock import acquire_lock, release_lock
from newsletter.sanitize import clean_html, clean_text, clean_url, to_utc

TITLE_MAX = 300
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
XML_DECLARATION = re.compile(rb"^\s*<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._:-]+)[\"']")
DECLARATION_ENCODING = re.compile(r"^(\s*<\?xml[^>]*?encoding\s*=\s*)[\"'][^\"']*[\"']")
ENTITY_DECLARATION = re.compile(r"<!ENTITY", re.IGNORECASE)
HTML_START = re.compile(r"^\s*(<!--.*?-->\s*)*<(!doctype\s+html|html[\s>])", re.IGNORECASE | re.S)
UNICODE_FAMILY = ("utf-8", "utf-16", "utf-32")
# feedparser flags these as "bozo" although the document is fine for us: we chose and applied
# the encoding ourselves, and we never hand it an HTTP Content-Type. Anything else it flags
# (a SAX error, an undeclared namespace, an unknown encoding) means it read the document
# differently from how defusedxml did, so the feed is refused.
HARMLESS_BOZO = (feedparser.CharacterEncodingOverride, feedparser.NonXMLContentType)


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


@dataclass(frozen=True)
class IngestReport:
    """What ingesting one source did."""

    source: str
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    not_modified: bool = False
    error: str | None = None
    redirected_to: str | None = None  # where the feed's redirects led, when it had any
    busy: bool = False  # skipped: another ingest of this source was running


# --- parse -----------------------------------------------------------------------------------


def parse_feed(
    content: bytes, *, source: str, base_url: str, urgent_category: str, now: datetime
) -> list[ParsedItem]:
    """Check and parse a feed document into cleaned items, or raise FeedParseError."""
    text = _decode(content, source)
    _check_document(text, source)
    parsed = feedparser.parse(io.BytesIO(_as_utf8_document(text)), sanitize_html=True)
    if parsed.bozo and not isinstance(parsed.bozo_exception, HARMLESS_BOZO):
        raise FeedParseError(source, f"malformed feed: {_one_line(parsed.bozo_exception)}")
    site = clean_url(parsed.feed.get("link", ""), base_url=base_url) or base_url
    items = (
        _parse_entry(entry, base_url=site, urgent_category=urgent_category, now=now)
        for entry in parsed.entries
    )
    return _last_per_guid(items)


def _decode(content: bytes, source: str) -> str:
    """Decode the document by BOM, else XML declaration, else UTF-8; refuse what does not fit."""
    if not content.strip():
        raise FeedParseError(source, "empty document, not a feed")
    encoding, body = _sniff_encoding(content)
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


def _sniff_encoding(content: bytes) -> tuple[str, bytes]:
    """Return the encoding to decode with and the bytes without any byte-order mark."""
    for bom, encoding in BOMS:
        if content.startswith(bom):
            return encoding, content[len(bom) :]
    for prefix, encoding in BOMLESS_UTF16:
        if content.startswith(prefix):
            return encoding, content
    declared = XML_DECLARATION.match(content)
    return (declared.group(1).decode("ascii") if declared else "utf-8"), content


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
    if HTML_START.match(text):
        raise FeedParseError(source, "an HTML page, not a feed")
    if _is_json(text):
        raise FeedParseError(source, "a JSON document, not an RSS or Atom feed")
    if ENTITY_DECLARATION.search(text):
        raise FeedParseError(source, "DTD entity declarations are refused (<!ENTITY)")
    try:
        root = SafeET.fromstring(
            _as_utf8_document(text), forbid_dtd=False, forbid_entities=True, forbid_external=True
        )
    except DefusedXmlException as e:
        raise FeedParseError(source, f"refused: {type(e).__name__}") from None
    except SafeET.ParseError as e:
        raise FeedParseError(source, f"not well-formed XML: {e}") from None
    if root.tag not in FEED_ROOTS:
        raise FeedParseError(source, f"not a feed: root element is <{_local(root.tag)}>")


def _is_json(text: str) -> bool:
    """True for a document that parses as a JSON object or array."""
    if not text.lstrip().startswith(("{", "[")):
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _as_utf8_document(text: str) -> bytes:
    """Encode as UTF-8 and make the XML declaration say so."""
    return DECLARATION_ENCODING.sub(r'\1"utf-8"', text, count=1).encode("utf-8")


def _local(tag: str) -> str:
    """An element name without its {namespace}, cleaned for an error line."""
    return clean_text(tag.rpartition("}")[2], max_length=40)


def _one_line(error: object) -> str:
    """An exception as one short line."""
    return clean_text(str(error) or type(error).__name__, max_length=200)


def _parse_entry(entry: Any, *, base_url: str, urgent_category: str, now: datetime) -> ParsedItem:
    """Clean one feedparser entry into a ParsedItem."""
    summary = clean_html(entry.get("summary", ""), base_url=base_url)
    contents = entry.get("content") or [{}]
    content = clean_html(contents[0].get("value", ""), base_url=base_url)
    title = clean_text(entry.get("title", ""), max_length=TITLE_MAX)
    link = clean_url(entry.get("link", ""), base_url=base_url)
    link = link if len(link) <= LINK_MAX else ""
    categories = _categories(entry)
    fields: dict[str, Any] = {
        "link": link,
        "title": title,
        "summary_html": summary,
        "content_html": content,
        "published_at": to_utc(_entry_date(entry), fallback=now),
        "categories": categories,
        "urgent": urgent_category.casefold() in {c.casefold() for c in categories},
    }
    guid = _identity(entry.get("id", ""), link, title, summary)
    return ParsedItem(guid=guid, content_hash=_hash_fields(fields), **fields)


def _entry_date(entry: Any) -> Any:
    """The entry's publication date, else its update date (feedparser's UTC struct_time)."""
    return entry.get("published_parsed") or entry.get("updated_parsed")


def _categories(entry: Any) -> tuple[str, ...]:
    """Cleaned, de-duplicated category names in feed order."""
    names = (
        clean_text(tag.get("term") or "", max_length=CATEGORY_MAX) for tag in entry.get("tags", [])
    )
    return tuple(dict.fromkeys(name for name in names if name))


def _identity(guid: str, link: str, title: str, summary: str) -> str:
    """The item's id: its guid, else its link, else a hash of its title and summary."""
    guid = clean_text(guid, max_length=10_000)
    if guid and len(guid) <= GUID_MAX:
        return guid
    if guid:
        return "sha256:" + _sha256(guid)
    return link or "sha256:" + _sha256(f"{title}\n{summary}")


def _hash_fields(fields: dict[str, Any]) -> str:
    """A stable hash of the cleaned fields, to tell changed items from unchanged ones."""
    payload = {**fields, "published_at": fields["published_at"].isoformat()}
    return _sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _last_per_guid(items: Iterator[ParsedItem]) -> list[ParsedItem]:
    """Keep the last entry for each guid, in the order the guids first appeared."""
    by_guid: dict[str, ParsedItem] = {}
    for item in items:
        by_guid[item.guid] = item
    return list(by_guid.values())


# --- store -----------------------------------------------------------------------------------


def ingest_source(
    *,
    session: Session,
    url_or_path: str,
    settings: SourcesSettings,
    clock: Clock,
    name: str = "",
    lang: str = "en",
) -> IngestReport:
    """Fetch, parse and upsert one source in the caller's transaction (flushes, never commits)."""
    key, now = source_key(url_or_path), clock.now()
    etag, last_modified = stored_validators(session, key)
    try:
        fetched = fetch_source(key, etag=etag, last_modified=last_modified, settings=settings)
    except FeedError as e:
        _get_or_create_source(session, key, name=name, lang=lang).last_error = str(e)
        session.flush()
        raise
    return store_fetched(
        session=session, key=key, fetched=fetched, settings=settings, now=now, name=name, lang=lang
    )


def stored_validators(session: Session, key: str) -> tuple[str | None, str | None]:
    """The ETag and Last-Modified stored for a source (a read only: nothing is written)."""
    row = session.execute(
        select(Source.etag, Source.last_modified).where(Source.url == key)
    ).one_or_none()
    return (row.etag, row.last_modified) if row else (None, None)


def store_fetched(
    *,
    session: Session,
    key: str,
    fetched: FetchResult,
    settings: SourcesSettings,
    now: datetime,
    name: str = "",
    lang: str = "en",
) -> IngestReport:
    """Parse a fetched document and upsert its items in the caller's transaction."""
    source = _get_or_create_source(session, key, name=name, lang=lang)
    if fetched.content is None:
        report = IngestReport(source.url, not_modified=True, redirected_to=fetched.redirected_to)
        return _record_fetch(session, source, fetched, now, report)
    try:
        items = parse_feed(
            fetched.content,
            source=source.url,
            base_url=_base_url(source.url),
            urgent_category=settings.urgent_category,
            now=now,
        )
    except FeedError as e:
        source.last_error = str(e)
        session.flush()
        raise
    report = _upsert_items(session, source, items, now)
    report = dataclasses.replace(report, redirected_to=fetched.redirected_to)
    return _record_fetch(session, source, fetched, now, report)


def source_key(url_or_path: str) -> str:
    """How a source is stored: URLs as given, files as absolute paths."""
    return str(file_path(url_or_path)) if is_file_source(url_or_path) else url_or_path


def _base_url(key: str) -> str:
    """The URL relative links resolve against when the feed names no site link."""
    return key if urlsplit(key).scheme in ("http", "https") else Path(key).as_uri()


def _get_or_create_source(session: Session, url: str, *, name: str, lang: str) -> Source:
    """The Source row for url; a new row takes name and lang, an old one a new name if given."""
    source = session.scalars(select(Source).where(Source.url == url)).one_or_none()
    if source is None:
        source = Source(url=url, name=name, lang=lang)
        session.add(source)
        session.flush()
    elif name and source.name != name:
        source.name = name
    return source


def _record_fetch(
    session: Session, source: Source, fetched: FetchResult, now: datetime, report: IngestReport
) -> IngestReport:
    """Store the validators and fetch time after a successful fetch and parse."""
    source.etag = fetched.etag
    source.last_modified = fetched.last_modified
    source.last_fetched_at = now
    source.last_error = None
    session.flush()
    return report


def _upsert_items(
    session: Session, source: Source, items: list[ParsedItem], now: datetime
) -> IngestReport:
    """Insert new items, update changed ones, count the rest as unchanged."""
    guids = [item.guid for item in items]
    existing = {
        row.guid: row
        for row in session.scalars(
            select(Item).where(Item.source_id == source.id, Item.guid.in_(guids))
        )
    }
    counts = {"new": 0, "updated": 0, "unchanged": 0}
    for item in items:
        row = existing.get(item.guid)
        if row is None:
            session.add(Item(source_id=source.id, ingested_at=now, **_item_values(item, now)))
            counts["new"] += 1
        elif row.content_hash == item.content_hash:
            counts["unchanged"] += 1
        else:
            for key, value in _item_values(item, now).items():
                setattr(row, key, value)
            counts["updated"] += 1
    session.flush()
    return IngestReport(
        source.url, new=counts["new"], updated=counts["updated"], unchanged=counts["unchanged"]
    )


def _item_values(item: ParsedItem, now: datetime) -> dict[str, Any]:
    """The Item column values for a parsed item."""
    return {
        "guid": item.guid,
        "link": item.link,
        "title": item.title,
        "summary_html": item.summary_html,
        "content_html": item.content_html,
        "published_at": item.published_at,
        "categories": list(item.categories),
        "urgent": item.urgent,
        "content_hash": item.content_hash,
        "updated_at": now,
    }


# --- every source at once ----------------------------------------------------------------------


def ingest_all(
    *,
    factory: sessionmaker[Session],
    sources: list[tuple[str, str, str]],
    settings: SourcesSettings,
    clock: Clock,
) -> list[IngestReport]:
    """Ingest each (url, name, lang) at the same time; a failing or busy source is only reported.

    Each source is fetched on a thread of its own ([sources] concurrent_fetches at most), with no
    transaction open while it waits on the network, and stored in a transaction of its own, so a
    slow source delays none of the others and a bad one stops none of them.
    """
    if not sources:
        return []
    workers = min(settings.concurrent_fetches, len(sources))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="newsletter-ingest") as pool:
        futures = [
            pool.submit(
                _ingest_one, factory, url, name=name, lang=lang, settings=settings, clock=clock
            )
            for url, name, lang in sources
        ]
        return [future.result() for future in futures]


def _ingest_one(
    factory: sessionmaker[Session],
    url: str,
    *,
    name: str,
    lang: str,
    settings: SourcesSettings,
    clock: Clock,
) -> IngestReport:
    """Ingest one source unless another ingest of it holds its lease (then report it busy)."""
    key, holder = source_key(url), _holder()
    if not _take_lease(factory, key, holder=holder, clock=clock, settings=settings):
        return IngestReport(key, busy=True)
    try:
        return _fetch_and_store(factory, key, name=name, lang=lang, settings=settings, clock=clock)
    except IntegrityError:  # another process stored this source at the same moment (lease ran out)
        return IngestReport(key, busy=True)
    finally:
        _release_lease(factory, key, holder=holder)


def _fetch_and_store(
    factory: sessionmaker[Session],
    key: str,
    *,
    name: str,
    lang: str,
    settings: SourcesSettings,
    clock: Clock,
) -> IngestReport:
    """Read the validators, fetch outside any transaction, then store in one transaction."""
    now, fetched = clock.now(), None
    with unit_of_work(factory) as session:
        etag, last_modified = stored_validators(session, key)
    try:
        fetched = fetch_source(key, etag=etag, last_modified=last_modified, settings=settings)
        with unit_of_work(factory) as session:
            return store_fetched(
                session=session,
                key=key,
                fetched=fetched,
                settings=settings,
                now=now,
                name=name,
                lang=lang,
            )
    except FeedError as e:  # a document refused after redirects names where they led
        redirected = fetched.redirected_to if fetched else None
        error = str(e) + (f" (redirected to {redirected})" if redirected else "")
        _record_error(factory, key, name=name, lang=lang, error=error)
        return IngestReport(key, error=error, redirected_to=redirected)


def _record_error(
    factory: sessionmaker[Session], key: str, *, name: str, lang: str, error: str
) -> None:
    """Keep a source's last error in a transaction of its own (the failed one rolled back)."""
    with unit_of_work(factory) as session:
        source = _get_or_create_source(session, key, name=name, lang=lang)
        source.last_error = error


# One ingest per source at a time, in this process and across processes: a lease per source in
# service_locks (the scheduler's table). Its holder names the thread too, so two threads of one
# process exclude each other the same way two processes do. A holder that dies mid-ingest
# frees the source when the lease runs out: the fetch deadline plus time to parse and store.
LEASE_MARGIN_SECONDS = 120


def lease_name(key: str) -> str:
    """The service_locks name of a source's ingest lease (a hash: keys can be long URLs)."""
    return "ingest:" + _sha256(key)[:40]


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _take_lease(
    factory: sessionmaker[Session],
    key: str,
    *,
    holder: str,
    clock: Clock,
    settings: SourcesSettings,
) -> bool:
    """Take the source's lease; False while another holder's lease on it runs."""
    seconds = math.ceil(settings.timeout_seconds) + LEASE_MARGIN_SECONDS
    try:
        with unit_of_work(factory) as session:
            return acquire_lock(
                session, name=lease_name(key), holder=holder, now=clock.now(), seconds=seconds
            )
    except IntegrityError:  # two first-time takers raced on the insert: the other one won
        return False


def _release_lease(factory: sessionmaker[Session], key: str, *, holder: str) -> None:
    with unit_of_work(factory) as session:
        release_lock(session, name=lease_name(key), holder=holder)


def describe_report(report: IngestReport) -> str:
    """One line for a report: its error, busy, not modified or ok, and where it was redirected."""
    if report.error:
        return report.error
    if report.busy:
        return "busy: another ingest of this source is running; skipped"
    outcome = "not modified" if report.not_modified else "ok"
    if report.redirected_to:
        outcome += f" (redirected to {report.redirected_to})"
    return outcome
