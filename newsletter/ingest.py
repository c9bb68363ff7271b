"""Ingest: per source, fetch (newsletter.fetch), parse (newsletter.parse), upsert its items.

A source is fetched with no transaction open (a conditional GET with the stored ETag and
Last-Modified, or a file) and its document parsed whole before anything is written: a document
newsletter.parse refuses is stored as the source's last error, never half-ingested. Items are
upserted by (source, guid): new ones inserted, changed ones (by content hash) updated, the rest
counted as unchanged.

ingest_all runs the sources at the same time, each on a thread and in a transaction of its own,
and one ingest per source at a time across threads and processes (a lease in service_locks).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import math
import os
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import String, any_, bindparam, insert, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import Clock
from newsletter.config import SourcesSettings
from newsletter.db import unit_of_work
from newsletter.db.models import Item, Source
from newsletter.errors import FeedError
from newsletter.fetch import FetchResult, fetch_source, file_path, is_file_source
from newsletter.lock import acquire_lock, release_lock
from newsletter.parse import ParsedItem, parse_feed

GUID_BATCH = 1000  # guids looked up per query
INSERT_BATCH = 5000  # new items per executemany (bounded memory for the statement's rows)


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
    """Parse a fetched document and upsert its items in the caller's transaction.

    Nothing is written before the document is parsed: on SQLite the first write takes the
    database's write lock, and a long parse would hold it against every other writer (an
    unsubscribe, the sender's ledger, the other sources).
    """
    stored = session.execute(
        select(Source.document_digest, Source.last_error).where(Source.url == key)
    ).one_or_none()
    digest = None
    if fetched.content is not None:
        digest = document_digest(fetched.content, urgent_category=settings.urgent_category)
    if fetched.content is None or (
        stored is not None and digest == stored.document_digest and not stored.last_error
    ):
        # Not modified, by the server's word or by the bytes: the last store of this very
        # document, by this very code, stands (a server without validators sends it whole).
        source = _get_or_create_source(session, key, name=name, lang=lang)
        report = IngestReport(source.url, not_modified=True, redirected_to=fetched.redirected_to)
        return _record_fetch(session, source, fetched, now, report)
    try:
        items = parse_feed(
            fetched.content,
            source=key,
            base_url=_base_url(key),
            urgent_category=settings.urgent_category,
            now=now,
        )
    except FeedError as e:
        _get_or_create_source(session, key, name=name, lang=lang).last_error = str(e)
        session.flush()
        raise
    source = _get_or_create_source(session, key, name=name, lang=lang)
    report = _upsert_items(session, source, items, now)
    report = dataclasses.replace(report, redirected_to=fetched.redirected_to)
    # An item dated ahead gets its date once that comes: the same document must be read again.
    source.document_digest = None if any(item.ahead for item in items) else digest
    return _record_fetch(session, source, fetched, now, report)


def document_digest(content: bytes, *, urgent_category: str) -> str:
    """sha256 of a fetched document with what parsing it depends on: code, libraries, settings."""
    digest = hashlib.sha256(_parser_fingerprint())
    digest.update(urgent_category.encode("utf-8") + b"\0")
    digest.update(content)
    return digest.hexdigest()


@functools.cache
def _parser_fingerprint() -> bytes:
    """The parsing code and the libraries it uses: an upgrade that may clean items otherwise
    (a sanitiser fixed) reads every feed again, and so updates the items it changes."""
    from newsletter import parse, sanitize

    digest = hashlib.sha256(sys.version.encode())  # expat, html.parser and urljoin are Python's
    for module in (parse, sanitize):
        digest.update(Path(module.__file__ or "").read_bytes())
    for package in ("feedparser", "nh3", "defusedxml"):
        digest.update(f"{package}=={importlib.metadata.version(package)};".encode())
    return digest.digest()


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
    existing = {row.guid: row for row in _stored_items(session, source, items)}
    counts = {"new": 0, "updated": 0, "unchanged": 0}
    new: list[dict[str, Any]] = []
    for item in items:
        row = existing.get(item.guid)
        if row is None:
            new.append({"source_id": source.id, "ingested_at": now, **_item_values(item, now)})
            counts["new"] += 1
        elif row.content_hash == item.content_hash:
            counts["unchanged"] += 1
        else:
            values = _item_values(item, now)
            if not item.dated:  # "now" is only when it was first seen: keep that date
                del values["published_at"]
            for key, value in values.items():
                setattr(row, key, value)
            counts["updated"] += 1
    session.flush()
    # New items in one executemany, not one ORM object each: a long feed's store holds SQLite's
    # write lock (every other writer waits) for a fraction of the time.
    for start in range(0, len(new), INSERT_BATCH):
        session.execute(insert(Item), new[start : start + INSERT_BATCH])
    return IngestReport(
        source.url, new=counts["new"], updated=counts["updated"], unchanged=counts["unchanged"]
    )


def _stored_items(session: Session, source: Source, items: list[ParsedItem]) -> Iterator[Item]:
    """The source's stored items that share a guid with items."""
    guids = [item.guid for item in items]
    by_source = select(Item).where(Item.source_id == source.id)
    if session.get_bind().dialect.name == "postgresql":
        # One array parameter, whatever the feed's length (70,000 tiny items fit in max_bytes):
        # no 65,535-parameter limit, and the generic plan of the prepared statement still looks
        # up (source_id, guid) in the index (3 ms for 1,000 guids). IN lists of 1,000 were
        # planned generically as a filter of every stored item against every parameter: 2 s a
        # list at 70,000 stored items.
        yield from session.scalars(
            by_source.where(Item.guid == any_(bindparam(None, guids, ARRAY(String))))
        )
        return
    for start in range(0, len(guids), GUID_BATCH):  # SQLite takes at most 32,766 parameters
        yield from session.scalars(
            by_source.where(Item.guid.in_(guids[start : start + GUID_BATCH]))
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
    """Ingest one source unless another ingest of it holds its lease (then report it busy).

    A database that cannot take the source's writes (SQLite's write lock held past the busy
    timeout by a long store, a lost PostgreSQL connection) fails this source only: its
    transaction is rolled back whole and a later run tries it again (once its lease runs out,
    if the database could not take that back either).
    """
    key, holder = source_key(url), _holder()
    try:
        if not _take_lease(factory, key, holder=holder, clock=clock, settings=settings):
            return IngestReport(key, busy=True)
        try:
            return _fetch_and_store(
                factory, key, name=name, lang=lang, settings=settings, clock=clock
            )
        except IntegrityError:  # another process stored this source at once (lease ran out)
            return IngestReport(key, busy=True)
        finally:
            _release_lease(factory, key, holder=holder)
    except (OperationalError, PoolTimeout) as e:  # the first line only: a DETAIL line has values
        cause = e.orig if isinstance(e, OperationalError) else e
        reason = (str(cause).strip().splitlines() or ["unavailable"])[0]
        return IngestReport(key, error=f"database: {reason}; nothing stored, tried again later")


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
    return "ingest:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]


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
    """Give the lease back; one the database cannot take back now runs out on its own."""
    try:
        with unit_of_work(factory) as session:
            release_lock(session, name=lease_name(key), holder=holder)
    except (OperationalError, PoolTimeout):  # the store (if any) is committed: its report stands
        pass


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
