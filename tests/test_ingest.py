"""Ingest: the hostile feed corpus, the sample feed, fetching, and upserts on real SQLite files."""

from __future__ import annotations

import json
import re
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import SourcesSettings
from newsletter.db import unit_of_work
from newsletter.db.models import Item, Source
from newsletter.errors import FeedFetchError, FeedParseError
from newsletter.fetch import fetch_source
from newsletter.ingest import IngestReport, ingest_all, ingest_source
from newsletter.parse import ParsedItem, parse_feed

CORPUS = Path(__file__).parent / "data" / "feeds"
SAMPLE = Path(__file__).parent.parent / "newsletter" / "data" / "portal-feed.xml"
FEED_URL = "https://portal.example.org/feed/"
NOW = datetime(2024, 3, 4, 9, 0, tzinfo=UTC)
SETTINGS = SourcesSettings(timeout_seconds=5.0, max_bytes=200_000)


def parse(content: bytes, source: str = "test") -> list[ParsedItem]:
    """parse_feed with the test defaults."""
    return parse_feed(
        content, source=source, base_url=FEED_URL, urgent_category="urgent-action", now=NOW
    )


def all_text(item: ParsedItem) -> str:
    """Every string an item carries, to search for hostile markers."""
    fields = (item.guid, item.link, item.title, item.summary_html, item.content_html)
    return "\n".join((*fields, *item.categories))


def is_one_line(text: str) -> bool:
    """True when text has no control, format (bidi, zero-width) or line-break characters."""
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


# --- the hostile corpus: one directory per case --------------------------------------------


def corpus_cases() -> list[Any]:
    return [pytest.param(d, id=d.name) for d in sorted(CORPUS.iterdir()) if d.is_dir()]


@pytest.mark.parametrize("case", corpus_cases())
def test_corpus_case(case: Path) -> None:
    """Each corpus feed is rejected with its reason, or yields clean items as expected.json says."""
    expected = json.loads((case / "expected.json").read_text(encoding="utf-8"))
    content = (case / "feed.xml").read_bytes()
    if "rejected" in expected:
        with pytest.raises(FeedParseError, match=re.escape(expected["rejected"])) as caught:
            parse(content, source=case.name)
        assert "\n" not in str(caught.value)
        for marker in expected.get("absent", []):
            assert marker.casefold() not in str(caught.value).casefold()
        return
    check_accepted(parse(content, source=case.name), expected)


def check_accepted(items: list[ParsedItem], expected: dict[str, Any]) -> None:
    """Assert the expectations of an accepted corpus case and the invariants of every item."""
    assert len(items) == expected["items"]
    titles = [item.title for item in items]
    for wanted in expected.get("title_contains", []):
        assert any(wanted in title for title in titles), (wanted, titles)
    text = "\n".join(all_text(item) for item in items).casefold()
    for marker in expected.get("absent", []):
        assert marker.casefold() not in text, marker
    html = "\n".join(item.summary_html + item.content_html for item in items)
    for wanted in expected.get("contains", []):
        assert wanted in html, wanted
    for item in items:
        check_item_invariants(item, expected)
    if "urgent" in expected:
        assert sum(item.urgent for item in items) == expected["urgent"]


def check_item_invariants(item: ParsedItem, expected: dict[str, Any]) -> None:
    """What holds for every accepted item: one-line titles, safe links, UTC dates, an id."""
    assert is_one_line(item.title) and all(is_one_line(c) for c in item.categories)
    assert len(item.title) <= expected.get("title_max", 300)
    assert item.link == "" or item.link.startswith(("https://", "http://"))
    assert item.published_at.tzinfo is UTC
    assert item.guid and re.fullmatch(r"[0-9a-f]{64}", item.content_hash)
    if "link" in expected:
        assert item.link == expected["link"]
    if "guid_prefix" in expected:
        assert item.guid.startswith(expected["guid_prefix"])


def test_corpus_covers_the_required_cases() -> None:
    """The corpus keeps every hostile case the design asks for (new cases only need files)."""
    required = {
        "not_a_feed", "json_document", "empty", "truncated_xml", "billion_laughs", "xxe_file",
        "xxe_parameter_entity", "windows1251_encoding", "utf16_encoding",
        "latin1_declared_but_utf8_bytes", "script_in_description", "script_in_content_encoded",
        "iframe_form_meta", "svg_onload", "event_handlers", "javascript_urls", "data_url",
        "css_expression", "crlf_in_title", "huge_title", "bidi_override_title", "no_guid_no_link",
        "relative_links", "atom_feed", "duplicate_guids",
    }  # fmt: skip
    assert required <= {d.name for d in CORPUS.iterdir()}


# --- the sample feed -------------------------------------------------------------------------


def test_sample_feed_has_ten_items_one_urgent() -> None:
    """The shipped sample feed yields ten 2014 items under the portal, exactly one urgent."""
    items = parse(SAMPLE.read_bytes())
    assert len(items) == 10
    urgent = [item for item in items if item.urgent]
    assert [item.title for item in urgent] == [
        "Open letter to the UN Human Rights Committee by Natalia Pinchuk and Antoine Bernard"
    ]
    assert all(item.published_at.year == 2014 for item in items)
    assert all(item.link.startswith("https://portal.example.org/2014/") for item in items)
    assert all(item.guid.startswith("https://portal.example.org/?p=") for item in items)
    assert all('href="https://portal.example.org/' in item.content_html for item in items)


def test_parse_is_deterministic() -> None:
    """Parsing the same bytes twice gives equal items, so content hashes are stable."""
    assert parse(SAMPLE.read_bytes()) == parse(SAMPLE.read_bytes())


def test_items_without_a_date_get_now() -> None:
    """An item with no date is published 'now' (the injected time)."""
    feed = SAMPLE.read_bytes()
    feed = re.sub(rb"<pubDate>.*?</pubDate>", b"", feed)
    assert {item.published_at for item in parse(feed)} == {NOW}


# --- fetching --------------------------------------------------------------------------------


@dataclass
class FeedServer:
    """A real HTTP server on 127.0.0.1 serving test routes, recording request headers."""

    base: str
    requests: list[dict[str, str]] = field(default_factory=list)


def make_handler(server: FeedServer, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> Any:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.requests.append({"path": self.path, **dict(self.headers)})
            status, headers, body = routes.get(self.path, (404, {}, b"not found"))
            etag = headers.get("ETag")
            if status == 200 and etag and self.headers.get("If-None-Match") == etag:
                status, body = 304, b""
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers and self.path != "/stream-big":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


@pytest.fixture
def feed_server() -> Iterator[FeedServer]:
    """Serve the sample feed (with ETag), errors, oversized bodies and redirects."""
    sample = SAMPLE.read_bytes()
    big = b"<rss>" + b"x" * (SETTINGS.max_bytes + 10) + b"</rss>"
    routes = {
        "/feed": (200, {"ETag": '"v1"', "Last-Modified": "Thu, 03 Jul 2014 09:15:00 GMT"}, sample),
        "/other": (200, {}, sample.replace(b"?p=", b"?q=")),
        "/error": (500, {}, b"boom"),
        "/big": (200, {}, big),
        "/stream-big": (200, {}, big),
        "/lies-about-length": (200, {"Content-Length": str(SETTINGS.max_bytes + 1)}, b""),
        "/redirect": (302, {"Location": "/feed"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server = FeedServer(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.RequestHandlerClass = make_handler(server, routes)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_fetch_sends_conditional_headers_and_gets_304(feed_server: FeedServer) -> None:
    """A GET with the stored ETag and Last-Modified is answered 304 and returns no content."""
    first = fetch_source(
        f"{feed_server.base}/feed", etag=None, last_modified=None, settings=SETTINGS
    )
    assert first.content == SAMPLE.read_bytes() and first.etag == '"v1"'
    again = fetch_source(
        f"{feed_server.base}/feed",
        etag=first.etag,
        last_modified=first.last_modified,
        settings=SETTINGS,
    )
    assert again.content is None and again.etag == '"v1"'
    assert feed_server.requests[-1]["If-None-Match"] == '"v1"'
    assert feed_server.requests[-1]["If-Modified-Since"] == "Thu, 03 Jul 2014 09:15:00 GMT"


def test_fetch_follows_redirects(feed_server: FeedServer) -> None:
    """A redirect is followed to the feed."""
    result = fetch_source(
        f"{feed_server.base}/redirect", etag=None, last_modified=None, settings=SETTINGS
    )
    assert result.content == SAMPLE.read_bytes()


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        pytest.param("/error", "HTTP 500", id="server-error"),
        pytest.param("/missing", "HTTP 404", id="not-found"),
        pytest.param("/big", "max_bytes", id="too-large-by-content-length"),
        pytest.param("/stream-big", "larger than max_bytes", id="too-large-while-streaming"),
        pytest.param("/lies-about-length", "max_bytes", id="declared-too-large"),
        pytest.param("/loop", "more than 5 redirects", id="redirect-loop"),
    ],
)
def test_fetch_errors(feed_server: FeedServer, path: str, reason: str) -> None:
    """Non-2xx answers, oversized bodies and redirect loops raise FeedFetchError."""
    with pytest.raises(FeedFetchError, match=reason):
        fetch_source(f"{feed_server.base}{path}", etag=None, last_modified=None, settings=SETTINGS)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        pytest.param("ftp://portal.example.org/feed", "unsupported scheme", id="ftp"),
        pytest.param("gopher://x/", "unsupported scheme", id="gopher"),
        pytest.param("/nonexistent/feed.xml", "cannot read file", id="missing-file"),
    ],
)
def test_fetch_refuses_other_sources(source: str, reason: str) -> None:
    """Only http(s) URLs and readable files are fetched."""
    with pytest.raises(FeedFetchError, match=reason):
        fetch_source(source, etag=None, last_modified=None, settings=SETTINGS)


def test_fetch_file_is_size_capped(tmp_path: Path) -> None:
    """A feed file larger than max_bytes is refused; file:// URLs and paths read the same file."""
    big = tmp_path / "big.xml"
    big.write_bytes(b"x" * (SETTINGS.max_bytes + 1))
    with pytest.raises(FeedFetchError, match="max_bytes"):
        fetch_source(str(big), etag=None, last_modified=None, settings=SETTINGS)
    as_url = fetch_source(SAMPLE.as_uri(), etag=None, last_modified=None, settings=SETTINGS)
    assert as_url.content == SAMPLE.read_bytes()


# --- storing: real SQLite files --------------------------------------------------------------


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


def ingest(factory: sessionmaker[Session], source: str, clock: FrozenClock) -> IngestReport:
    """Ingest one source in its own transaction."""
    with unit_of_work(factory) as session:
        return ingest_source(session=session, url_or_path=source, settings=SETTINGS, clock=clock)


def count_items(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return session.scalar(select(func.count()).select_from(Item)) or 0


def test_ingest_twice_changes_nothing(
    factory: sessionmaker[Session], clock: FrozenClock, tmp_path: Path
) -> None:
    """Ingesting the sample feed twice inserts ten items once; the same bytes again are not
    modified, and a document that differs only where no item changes is all unchanged."""
    feed = tmp_path / "feed.xml"
    feed.write_bytes(SAMPLE.read_bytes())
    first = ingest(factory, str(feed), clock)
    clock.advance(hours=1)
    second = ingest(factory, str(feed), clock)
    feed.write_bytes(SAMPLE.read_bytes() + b"\n<!-- served again -->\n")
    third = ingest(factory, str(feed), clock)
    assert (first.new, first.updated, first.unchanged) == (10, 0, 0)
    assert second == IngestReport(str(feed), not_modified=True)
    assert (third.new, third.updated, third.unchanged, third.not_modified) == (0, 0, 10, False)
    assert count_items(factory) == 10
    with factory() as session:
        assert {i.updated_at for i in session.scalars(select(Item))} == {NOW}
        assert session.scalars(select(Source.last_fetched_at)).one() == clock.now()


def test_changed_item_is_updated(
    factory: sessionmaker[Session], clock: FrozenClock, tmp_path: Path
) -> None:
    """Changing one item's title updates that item only, keeping its ingested_at."""
    feed = tmp_path / "feed.xml"
    feed.write_bytes(SAMPLE.read_bytes())
    ingest(factory, str(feed), clock)
    feed.write_bytes(
        SAMPLE.read_bytes().replace(b"released!</title>", b"released (update)</title>")
    )
    clock.advance(hours=1)
    report = ingest(factory, str(feed), clock)
    assert (report.new, report.updated, report.unchanged) == (0, 1, 9)
    with factory() as session:
        row = session.scalars(select(Item).where(Item.title.like("%(update)"))).one()
        assert (row.ingested_at, row.updated_at) == (NOW, clock.now())


def test_source_is_stored_by_absolute_path(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relative path and a file:// URL name the same source, stored as an absolute path."""
    (tmp_path / "feed.xml").write_bytes(SAMPLE.read_bytes())
    monkeypatch.chdir(tmp_path)
    ingest(factory, "feed.xml", clock)
    report = ingest(factory, (tmp_path / "feed.xml").as_uri(), clock)
    assert report == IngestReport(str(tmp_path / "feed.xml"), not_modified=True)
    with factory() as session:
        assert session.scalars(select(Source.url)).all() == [str(tmp_path / "feed.xml")]


def test_ingest_source_never_commits(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """ingest_source only flushes: rolling back the caller's transaction leaves nothing behind."""
    with factory() as session:
        report = ingest_source(
            session=session, url_or_path=str(SAMPLE), settings=SETTINGS, clock=clock
        )
        assert report.new == 10
        session.rollback()
    assert count_items(factory) == 0


def test_bad_feed_sets_last_error_and_raises(
    factory: sessionmaker[Session], clock: FrozenClock, tmp_path: Path
) -> None:
    """A bad document raises FeedParseError, records source.last_error and inserts no item."""
    bad = tmp_path / "bad.xml"
    bad.write_bytes((CORPUS / "xxe_file" / "feed.xml").read_bytes())
    with factory() as session:
        with pytest.raises(FeedParseError, match="entity declarations"):
            ingest_source(session=session, url_or_path=str(bad), settings=SETTINGS, clock=clock)
        source = session.scalars(select(Source)).one()
        assert source.last_error is not None and "entity declarations" in source.last_error
        assert session.scalar(select(func.count()).select_from(Item)) == 0


def test_second_ingest_over_http_is_not_modified(
    factory: sessionmaker[Session], clock: FrozenClock, feed_server: FeedServer
) -> None:
    """The stored ETag is sent back; a 304 reports not_modified and changes no item."""
    url = f"{feed_server.base}/feed"
    assert ingest(factory, url, clock).new == 10
    clock.advance(hours=1)
    report = ingest(factory, url, clock)
    assert report == IngestReport(url, not_modified=True)
    assert feed_server.requests[-1]["If-None-Match"] == '"v1"'
    with factory() as session:
        source = session.scalars(select(Source)).one()
        assert (source.etag, source.last_fetched_at) == ('"v1"', clock.now())
        assert {i.updated_at for i in session.scalars(select(Item))} == {NOW}
    assert count_items(factory) == 10


def test_a_document_sent_whole_again_is_not_parsed_again(
    factory: sessionmaker[Session], clock: FrozenClock, feed_server: FeedServer
) -> None:
    """A server without ETag or Last-Modified sends the same bytes: not modified, and nothing
    is parsed or written (a row changed in the database stays); other parse settings are read
    again (the row is mended, the urgent item no longer urgent)."""
    url = f"{feed_server.base}/other"
    assert ingest(factory, url, clock).new == 10
    with unit_of_work(factory) as session:
        first = session.scalars(select(Item).order_by(Item.id)).first()
        assert first is not None
        title, first.title, first.content_hash = first.title, "changed in the database", "x"
    clock.advance(hours=1)
    assert ingest(factory, url, clock) == IngestReport(url, not_modified=True)
    assert "If-None-Match" not in feed_server.requests[-1]
    with factory() as session:
        assert session.scalar(select(func.count()).where(Item.title == title)) == 0
        assert session.scalars(select(Source.last_fetched_at)).one() == clock.now()
    other = replace(SETTINGS, urgent_category="something else")
    with unit_of_work(factory) as session:
        report = ingest_source(session=session, url_or_path=url, settings=other, clock=clock)
    assert (report.not_modified, report.new, report.updated) == (False, 0, 2)  # and urgent
    with factory() as session:
        assert session.scalar(select(func.count()).where(Item.title == title)) == 1
        assert session.scalar(select(func.count()).where(Item.urgent)) == 0


def test_after_an_error_the_same_document_is_parsed_again(
    factory: sessionmaker[Session], clock: FrozenClock, tmp_path: Path
) -> None:
    """A refused document in between: the good one again is read, then not modified."""
    feed = tmp_path / "feed.xml"
    feed.write_bytes(SAMPLE.read_bytes())
    assert ingest(factory, str(feed), clock).new == 10
    feed.write_bytes((CORPUS / "xxe_file" / "feed.xml").read_bytes())
    sources = [(str(feed), "", "en")]
    [refused] = ingest_all(factory=factory, sources=sources, settings=SETTINGS, clock=clock)
    assert refused.error and "entity declarations" in refused.error
    feed.write_bytes(SAMPLE.read_bytes())
    again = ingest(factory, str(feed), clock)
    assert (again.unchanged, again.not_modified) == (10, False)
    assert ingest(factory, str(feed), clock).not_modified


def test_a_document_with_an_item_dated_ahead_is_read_until_that_date_comes(
    factory: sessionmaker[Session], clock: FrozenClock, tmp_path: Path
) -> None:
    """An item dated days ahead is stored with the time it was seen; the same bytes are read
    at every poll, so the item takes its own date once it comes; then they are not modified."""
    ahead = datetime(2024, 3, 7, 9, 0, tzinfo=UTC)
    document = re.sub(
        rb"<pubDate>.*?</pubDate>",
        ahead.strftime("<pubDate>%a, %d %b %Y %H:%M:%S +0000</pubDate>").encode(),
        SAMPLE.read_bytes(),
        count=1,
    )
    feed = tmp_path / "feed.xml"
    feed.write_bytes(document)
    assert ingest(factory, str(feed), clock).new == 10
    clock.advance(hours=1)
    same = ingest(factory, str(feed), clock)
    assert (same.unchanged, same.not_modified) == (10, False)
    clock.advance(hours=72)
    dated = ingest(factory, str(feed), clock)
    assert (dated.updated, dated.unchanged) == (1, 9)
    with factory() as session:
        assert session.scalar(select(func.count()).where(Item.published_at == ahead)) == 1
    assert ingest(factory, str(feed), clock).not_modified


def test_one_bad_source_does_not_stop_the_others(
    factory: sessionmaker[Session], clock: FrozenClock, feed_server: FeedServer
) -> None:
    """ingest_all reports a failing source, records its error, and ingests the others."""
    sources = [
        (str(SAMPLE), "sample", "en"),
        (f"{feed_server.base}/error", "broken", "be"),
        (f"{feed_server.base}/other", "other", "ru"),
    ]
    reports = ingest_all(factory=factory, sources=sources, settings=SETTINGS, clock=clock)
    assert [(r.new, r.error is None) for r in reports] == [(10, True), (0, False), (10, True)]
    assert "HTTP 500" in (reports[1].error or "")
    with factory() as session:
        broken = session.scalars(select(Source).where(Source.name == "broken")).one()
        assert broken.lang == "be" and "HTTP 500" in (broken.last_error or "")
    assert count_items(factory) == 20


@pytest.mark.parametrize("label", ["ISO-8859-1", "latin1"])
def test_a_feed_labelled_latin1_keeps_words_curly_quotes_and_dashes(label: str) -> None:
    """Word's curly quote and en dash (0x92, 0x96) in a feed labelled latin-1 are read as
    windows-1252 (feedparser does, as browsers do), not dropped with the C1 controls; a byte
    windows-1252 leaves undefined (0x81) is a control and goes."""
    feed = (
        f'<?xml version="1.0" encoding="{label}"?><rss version="2.0"><channel><title>P</title>'
        "<link>https://portal.example.org/</link><description>d</description>"
        "<item><title>It\x92s 10\x9620 caf\xe9\x81</title>"
        "<link>https://portal.example.org/a</link><guid>a</guid>"
        "<pubDate>Mon, 04 Mar 2024 08:00:00 GMT</pubDate>"
        "<description>&lt;p&gt;It\x92s 10\x9620\x81&lt;/p&gt;</description></item>"
        "</channel></rss>"
    ).encode("latin-1")
    (item,) = parse(feed)
    assert item.title == "It\u2019s 10\u201320 caf\u00e9"
    assert item.summary_html == "<p>It\u2019s 10\u201320</p>"
