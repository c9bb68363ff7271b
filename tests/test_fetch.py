"""Fetching hostile sources: one deadline, checked redirects, bounded decompression, one ingest
per source at a time, and a service that keeps answering while a slow feed is ingested.

Every server here is real and on 127.0.0.1: it drips bytes, redirects, serves compression bombs
or speaks TLS with a certificate from a local test CA (trustme).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import SourcesSettings
from newsletter.db import make_engine, make_sessionmaker, unit_of_work
from newsletter.db.models import Item, Source
from newsletter.devsmtp import free_port
from newsletter.errors import FeedFetchError
from newsletter.fetch import (
    MAX_REDIRECTS,
    address_kind,
    address_refusal,
    allowed_kinds,
    fetch_source,
    redirect_refusal,
)
from newsletter.ingest import describe_report, ingest_all, ingest_source
from tests.conftest import SECRET, rss

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "newsletter" / "data" / "portal-feed.xml"
NOW = datetime(2024, 3, 4, 9, 0, tzinfo=UTC)
SETTINGS = SourcesSettings(timeout_seconds=5.0, max_bytes=200_000)
DRIP_SECONDS = 40  # how long a dripping server goes on when nobody hangs up (base: forever)


# --- a real HTTP(S) server with hostile routes ---------------------------------------------------


@dataclass
class Server:
    """A server on 127.0.0.1; `routes[path](handler, server)` answers a GET."""

    routes: dict[str, Callable[[BaseHTTPRequestHandler, Server], None]]
    base: str = ""
    requests: list[dict[str, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    active: int = 0  # requests being answered right now

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])


@contextlib.contextmanager
def serve(
    routes: dict[str, Callable[[BaseHTTPRequestHandler, Server], None]],
    *,
    tls: ssl.SSLContext | None = None,
    host_name: str = "127.0.0.1",
) -> Iterator[Server]:
    """Run a ThreadingHTTPServer on a free loopback port until the block ends."""
    server = Server(routes)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.requests.append({"path": self.path, **dict(self.headers)})
            route = server.routes.get(self.path.split("?")[0])
            server.active += 1
            try:
                if route is None:
                    send(self, 404, {}, b"not found")
                else:
                    route(self, server)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should at its deadline
            finally:
                server.active -= 1

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    scheme = "https" if tls is not None else "http"
    server.base = f"{scheme}://{host_name}:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def send(
    handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes
) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    if "Content-Length" not in headers:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def feed(body: bytes, **headers: str) -> Callable[[BaseHTTPRequestHandler, Server], None]:
    return lambda h, s: send(h, 200, {k.replace("_", "-"): v for k, v in headers.items()}, body)


def redirect(location: str, status: int = 302) -> Callable[[BaseHTTPRequestHandler, Server], None]:
    return lambda h, s: send(h, status, {"Location": location}, b"")


def drip_body(h: BaseHTTPRequestHandler, s: Server) -> None:
    """Headers at once, then the body one byte every 50 ms, for DRIP_SECONDS."""
    h.send_response(200)
    h.send_header("Content-Length", "1000000")
    h.end_headers()
    h.wfile.write(b'<?xml version="1.0"?><rss version="2.0"><channel>')
    deadline = time.monotonic() + DRIP_SECONDS
    while time.monotonic() < deadline and not s.stop.wait(0.05):
        h.wfile.write(b" ")
        h.wfile.flush()


def drip_headers(h: BaseHTTPRequestHandler, s: Server) -> None:
    """The status line, then header bytes one at a time, never finishing the headers."""
    h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    deadline = time.monotonic() + DRIP_SECONDS
    while time.monotonic() < deadline and not s.stop.wait(0.05):
        h.wfile.write(b"a")
        h.wfile.flush()


def silent(h: BaseHTTPRequestHandler, s: Server) -> None:
    """Read the request and never answer."""
    s.stop.wait(DRIP_SECONDS)


def fetch(url: str, settings: SourcesSettings = SETTINGS) -> Any:
    return fetch_source(url, etag=None, last_modified=None, settings=settings)


# --- item 7: one deadline for the whole fetch ----------------------------------------------------


@pytest.mark.parametrize(
    "route",
    [
        pytest.param(drip_body, id="body-one-byte-at-a-time"),
        pytest.param(drip_headers, id="headers-one-byte-at-a-time"),
        pytest.param(silent, id="never-answers"),
    ],
)
def test_a_slow_server_is_cut_off_at_the_deadline(
    route: Callable[[BaseHTTPRequestHandler, Server], None],
) -> None:
    """However a server stalls, the fetch fails with one line at about timeout_seconds."""
    settings = SourcesSettings(timeout_seconds=1.0, max_bytes=2_000_000)
    with serve({"/slow": route, "/to-slow": redirect("/slow")}) as server:
        for path in ("/slow", "/to-slow"):
            started = time.monotonic()
            with pytest.raises(FeedFetchError) as caught:
                fetch(f"{server.base}{path}", settings)
            elapsed = time.monotonic() - started
            assert 0.9 < elapsed < 10, elapsed  # 1 s asked; 10x for a loaded machine
            assert "no complete answer within timeout_seconds=1" in str(caught.value)
            assert "\n" not in str(caught.value)
        assert f"(at {server.base}/slow, after 1 redirect)" in str(caught.value)


def test_a_slow_source_does_not_delay_the_others(factory: sessionmaker[Session]) -> None:
    """In one ingest_all, a fast source is stored while a slow one still drips its body."""
    settings = SourcesSettings(timeout_seconds=5.0, max_bytes=2_000_000)
    clock = FrozenClock(NOW)
    with serve({"/slow": drip_body, "/fast": feed(SAMPLE.read_bytes())}) as server:
        sources = [(f"{server.base}/slow", "slow", "en"), (f"{server.base}/fast", "fast", "en")]
        done: list[Any] = []
        started = time.monotonic()
        thread = threading.Thread(
            target=lambda: done.append(
                ingest_all(factory=factory, sources=sources, settings=settings, clock=clock)
            )
        )
        thread.start()
        stored_while_slow_runs = False
        while thread.is_alive() and not stored_while_slow_runs:
            with factory() as session:
                stored = session.scalar(select(func.count()).select_from(Item)) or 0
            stored_while_slow_runs = stored == 10 and thread.is_alive() and server.active > 0
            time.sleep(0.05)
        thread.join(timeout=30)
        elapsed = time.monotonic() - started
    assert stored_while_slow_runs, "the fast source waited for the slow one"
    slow, fast = done[0]
    assert fast.new == 10 and fast.error is None
    assert "no complete answer within timeout_seconds=5" in (slow.error or "")
    assert elapsed < 30
    with factory() as session:
        row = session.scalars(select(Source).where(Source.name == "slow")).one()
        assert "within timeout_seconds=5" in (row.last_error or "")


@pytest.mark.parametrize(
    ("content", "key"),
    [
        pytest.param("timeout_seconds = 0\n", "sources.timeout_seconds", id="no-deadline"),
        pytest.param("max_bytes = 0\n", "sources.max_bytes", id="no-size"),
        pytest.param("concurrent_fetches = 0\n", "sources.concurrent_fetches", id="none-at-once"),
        pytest.param("concurrent_fetches = 99\n", "sources.concurrent_fetches", id="too-many"),
    ],
)
def test_unusable_fetch_settings_are_refused(tmp_path: Path, content: str, key: str) -> None:
    """A fetch needs a deadline, a size cap and between 1 and 16 fetches at once."""
    from newsletter.config import load_settings
    from newsletter.errors import ConfigError

    (tmp_path / "config.toml").write_text("[sources]\n" + content)
    with pytest.raises(ConfigError, match=key):
        load_settings(tmp_path / "config.toml", {})


# --- item 8: redirects ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        pytest.param("93.184.216.34", None, id="public-v4"),
        pytest.param("2606:4700::1111", None, id="public-v6"),
        pytest.param("127.0.0.1", "loopback", id="loopback"),
        pytest.param("127.200.1.1", "loopback", id="loopback-range"),
        pytest.param("::1", "loopback", id="loopback-v6"),
        pytest.param("0.0.0.0", "unspecified", id="zero"),
        pytest.param("0.1.2.3", "unspecified", id="this-network"),
        pytest.param("::", "unspecified", id="zero-v6"),
        pytest.param("169.254.169.254", "link-local", id="cloud-metadata"),
        pytest.param("fe80::1", "link-local", id="link-local-v6"),
        pytest.param("10.0.0.1", "private", id="rfc1918-10"),
        pytest.param("172.16.5.4", "private", id="rfc1918-172"),
        pytest.param("192.168.1.1", "private", id="rfc1918-192"),
        pytest.param("100.100.100.200", "private", id="cgnat-alibaba-metadata"),
        pytest.param("fd00::1", "private", id="ula-fd00"),
        pytest.param("fd00:ec2::254", "private", id="aws-metadata-v6"),
        pytest.param("fec0::1", "private", id="site-local"),
        pytest.param("::ffff:127.0.0.1", "loopback", id="mapped-loopback"),
        pytest.param("::ffff:169.254.169.254", "link-local", id="mapped-metadata"),
        pytest.param("::ffff:10.1.1.1", "private", id="mapped-private"),
        pytest.param("::ffff:8.8.8.8", None, id="mapped-public"),
        pytest.param("::127.0.0.1", "loopback", id="v4-compatible"),
        pytest.param("64:ff9b::a9fe:a9fe", "link-local", id="nat64-metadata"),
        pytest.param("2002:7f00:1::", "loopback", id="6to4-loopback"),
        pytest.param("2002:0808:0808::", None, id="6to4-public"),
        pytest.param("224.0.0.1", "multicast", id="multicast"),
        pytest.param("ff02::1", "multicast", id="multicast-v6"),
        pytest.param("240.0.0.1", "reserved", id="reserved"),
        pytest.param("255.255.255.255", "reserved", id="broadcast"),
    ],
)
def test_address_kind(address: str, kind: str | None) -> None:
    """Each loopback, private, link-local, unspecified or embedded form is named; public is None."""
    assert address_kind(ip_address(address)) == kind


@pytest.mark.parametrize(
    ("source", "target", "refused"),
    [
        pytest.param(["93.184.216.34"], ["127.0.0.1"], True, id="public-to-loopback"),
        pytest.param(["93.184.216.34"], ["169.254.169.254"], True, id="public-to-metadata"),
        pytest.param(["93.184.216.34"], ["8.8.8.8", "10.0.0.1"], True, id="one-private-answer"),
        pytest.param(["93.184.216.34"], ["::ffff:127.0.0.1"], True, id="public-to-mapped"),
        pytest.param(["93.184.216.34"], ["8.8.8.8"], False, id="public-to-public"),
        pytest.param(["127.0.0.1"], ["::1"], False, id="loopback-within-loopback"),
        pytest.param(["127.0.0.1"], ["8.8.8.8"], False, id="loopback-to-public"),
        pytest.param(["127.0.0.1"], ["169.254.169.254"], True, id="loopback-to-metadata"),
        pytest.param(["127.0.0.1"], ["10.0.0.1"], True, id="loopback-to-private"),
        pytest.param(["127.0.0.1"], ["0.0.0.0"], True, id="loopback-to-zero"),
        pytest.param(["10.0.0.5"], ["10.9.9.9"], False, id="private-within-private"),
        pytest.param(["10.0.0.5"], ["127.0.0.1"], True, id="private-to-loopback"),
    ],
)
def test_address_refusal(source: list[str], target: list[str], refused: bool) -> None:
    """A redirect may reach public addresses, or the kinds of address the source itself has."""
    allowed = allowed_kinds([ip_address(a) for a in source])
    reason = address_refusal([ip_address(a) for a in target], allowed)
    assert (reason is not None) == refused
    if reason:
        assert "it resolves to " in reason and " address" in reason


def test_a_name_is_judged_by_the_addresses_it_resolves_to() -> None:
    """'localhost' looks harmless as text; what it resolves to is loopback, refused from outside."""
    import socket

    found = [ip_address(i[4][0]) for i in socket.getaddrinfo("localhost", None)]
    assert address_refusal(found, frozenset()) is not None
    assert address_refusal(found, frozenset({"loopback"})) is None


@pytest.mark.parametrize(
    ("current", "target", "hops", "reason"),
    [
        pytest.param("https://a.example/", "http://a.example/", 1, "leaves https", id="downgrade"),
        pytest.param("http://a.example/", "ftp://a.example/f", 1, "only http(s)", id="ftp"),
        pytest.param("http://a.example/", "file:///etc/passwd", 1, "only http(s)", id="file"),
        pytest.param("http://a.example/", "gopher://a:70/", 1, "only http(s)", id="gopher"),
        pytest.param("http://a.example/", "javascript:alert(1)", 1, "only http(s)", id="js"),
        pytest.param("http://a.example/", "http:///nohost", 1, "no host", id="no-host"),
        pytest.param(
            "http://a.example/", "http://b.example/", MAX_REDIRECTS + 1, "more than 5", id="hops"
        ),
        pytest.param("http://a.example/", "https://b.example/", 1, None, id="upgrade"),
        pytest.param("https://a.example/", "https://b.example/", MAX_REDIRECTS, None, id="fifth"),
    ],
)
def test_redirect_refusal(current: str, target: str, hops: int, reason: str | None) -> None:
    """Only http(s), never from https to http, at most MAX_REDIRECTS hops."""
    refusal = redirect_refusal(current, target, hops=hops)
    assert (refusal is None) == (reason is None)
    if reason:
        assert reason in (refusal or "")


@pytest.fixture
def redirects() -> Iterator[Server]:
    """A loopback server whose routes redirect to other schemes, addresses and hosts."""
    sample = SAMPLE.read_bytes()
    routes = {
        "/feed": feed(sample, ETag='"v1"'),
        "/to-ftp": redirect("ftp://127.0.0.1/feed"),
        "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-mapped-metadata": redirect("http://[::ffff:169.254.169.254]/latest/"),
        "/to-private": redirect("http://10.11.12.13/feed", 301),
        "/to-nowhere": lambda h, s: send(h, 302, {}, b""),
        "/to-missing": redirect("/missing", 307),
        "/page": feed(b"<!doctype html><html><body>a page</body></html>"),
        "/to-page": redirect("/page"),
    }
    with serve(routes) as server:
        server.routes["/to-zero"] = redirect(f"http://0.0.0.0:{server.port}/feed")
        server.routes["/to-localhost"] = redirect(f"http://localhost:{server.port}/feed", 308)
        for n in range(MAX_REDIRECTS + 2):
            server.routes[f"/hop{n}"] = redirect(f"/hop{n + 1}")
        yield server


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param("/to-ftp", "redirect to ftp://127.0.0.1/feed refused: only http(s)", id="ftp"),
        pytest.param(
            "/to-metadata",
            "redirect to http://169.254.169.254/latest/meta-data/ refused: it resolves to "
            "169.254.169.254, a link-local address",
            id="metadata",
        ),
        pytest.param(
            "/to-mapped-metadata",
            "[::ffff:169.254.169.254]/latest/ refused: it resolves to ::ffff:",
            id="mapped",
        ),
        pytest.param("/to-private", "http://10.11.12.13/feed refused", id="private"),
        pytest.param("/to-zero", "0.0.0.0, an unspecified address", id="zero"),
        pytest.param("/hop0", "/hop6 refused: more than 5 redirects", id="too-many-hops"),
        pytest.param("/to-nowhere", "HTTP 302 redirect without a Location", id="no-location"),
        pytest.param("/to-missing", "HTTP 404 Not Found (at http://", id="names-the-hop"),
    ],
)
def test_refused_redirects_say_where_they_went(redirects: Server, path: str, message: str) -> None:
    """A refused redirect is one line naming its target; nothing is fetched from there."""
    with pytest.raises(FeedFetchError) as caught:
        fetch(f"{redirects.base}{path}")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not any(r["path"].startswith("/latest") for r in redirects.requests)
    if path == "/to-zero":  # 0.0.0.0 would have reached this very server
        assert [r["path"] for r in redirects.requests] == ["/to-zero"]


def test_redirect_within_loopback_is_followed_and_reported(
    redirects: Server, factory: sessionmaker[Session]
) -> None:
    """A loopback source may redirect to loopback; the report says where it went."""
    url = f"{redirects.base}/to-localhost"
    result = fetch(url)
    target = f"http://localhost:{redirects.port}/feed"
    assert result.content == SAMPLE.read_bytes() and result.redirected_to == target
    assert redirects.requests[-1]["Host"] == f"localhost:{redirects.port}"  # the name is kept
    with unit_of_work(factory) as session:
        report = ingest_source(
            session=session, url_or_path=url, settings=SETTINGS, clock=FrozenClock(NOW)
        )
    assert report.new == 10 and report.redirected_to == target
    assert describe_report(report) == f"ok (redirected to {target})"


def test_a_refused_document_names_where_the_redirect_led(
    redirects: Server, factory: sessionmaker[Session]
) -> None:
    """A redirect to something that is not a feed: the error and last_error say where it went."""
    url = f"{redirects.base}/to-page"
    [report] = ingest_all(
        factory=factory, sources=[(url, "", "en")], settings=SETTINGS, clock=FrozenClock(NOW)
    )
    expected = f"an HTML page, not a feed (redirected to {redirects.base}/page)"
    assert expected in (report.error or "")
    with factory() as session:
        assert expected in (session.scalars(select(Source)).one().last_error or "")


@pytest.mark.parametrize(
    "url", ["http://exa mple.org/feed", "http://[::1/feed", "http://example.org:99999/"]
)
def test_an_unusable_configured_url_is_one_line(url: str) -> None:
    """A malformed source URL is refused with one line, not a crash."""
    with pytest.raises(FeedFetchError) as caught:
        fetch(url)
    assert "\n" not in str(caught.value)


def test_cli_ingest_says_where_redirects_went(redirects: Server, tmp_path: Path) -> None:
    """`newsletter ingest` prints where a followed redirect led, and a refused one's target
    (also kept as the source's last error)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
        "NEWSLETTER_SECRET": SECRET,
        "NEWSLETTER_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "COLUMNS": "400",
    }

    def newsletter(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "newsletter", *args]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)

    newsletter("init")
    followed = newsletter("ingest", f"{redirects.base}/to-localhost")
    assert followed.returncode == 0, followed.stderr
    assert f"ok (redirected to http://localhost:{redirects.port}/feed)" in followed.stdout
    refused = newsletter("ingest", f"{redirects.base}/to-metadata")
    assert refused.returncode == 1
    reason = "/latest/meta-data/ refused: it resolves to 169.254.169.254, a link-local address"
    assert reason in refused.stdout
    engine = make_engine(env["NEWSLETTER_DATABASE_URL"])
    with make_sessionmaker(engine)() as session:
        source = session.scalars(select(Source).where(Source.url.like("%/to-metadata"))).one()
        assert reason in (source.last_error or "")
    engine.dispose()


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    """A server context with a certificate for 'localhost' only, and the CA file that trusts it."""
    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return context, str(path)


def test_https_never_redirects_to_http(
    tls_contexts: tuple[ssl.SSLContext, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over real TLS: the feed is fetched (certificate checked against the name, connected by
    address); a redirect from https to plain http is refused, naming its target."""
    context, ca_file = tls_contexts
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    with (
        serve({"/feed": feed(SAMPLE.read_bytes())}) as plain,
        serve({}, tls=context, host_name="localhost") as secure,
    ):
        secure.routes["/feed"] = feed(SAMPLE.read_bytes())
        secure.routes["/downgrade"] = redirect(f"{plain.base}/feed")
        secure.routes["/upgrade-only"] = redirect("/feed")
        assert fetch(f"{secure.base}/feed").content == SAMPLE.read_bytes()
        assert fetch(f"{secure.base}/upgrade-only").redirected_to == f"{secure.base}/feed"
        with pytest.raises(FeedFetchError) as caught:
            fetch(f"{secure.base}/downgrade")
        assert f"redirect to {plain.base}/feed refused: it leaves https for plain http" in str(
            caught.value
        )
        assert plain.requests == []
        with pytest.raises(FeedFetchError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(f"https://127.0.0.1:{secure.port}/feed")  # the certificate names localhost


# --- lesser: compression bombs -------------------------------------------------------------------


@cache
def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GB of zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join([*(packer.compress(zeros) for _ in range(1024)), packer.flush()])


@cache
def deflate_bomb() -> bytes:
    """The same as raw deflate (no zlib header), as some servers send it."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    return b"".join([*(packer.compress(zeros) for _ in range(1024)), packer.flush()])


PEAK_SCRIPT = """
import json, resource, sys
from newsletter.config import SourcesSettings
from newsletter.errors import FeedFetchError
from newsletter.fetch import fetch_source
settings = SourcesSettings(timeout_seconds=60.0, max_bytes=5_000_000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    fetch_source(sys.argv[1], etag=None, last_modified=None, settings=settings)
    error = None
except FeedFetchError as e:
    error = str(e)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"error": error, "peak_kb": after - before}))
"""


@cache
def double_gzip_bomb() -> bytes:
    """The gzip bomb gzipped again: 2 KB that inflate to 1 MB, then to 1 GB."""
    return gzip.compress(gzip_bomb(), 9)


@pytest.mark.parametrize(
    ("bomb", "encoding", "reason"),
    [
        pytest.param(gzip_bomb, "gzip", "larger than max_bytes=5000000", id="gzip"),
        pytest.param(deflate_bomb, "deflate", "larger than max_bytes=5000000", id="deflate"),
        pytest.param(double_gzip_bomb, "gzip, gzip", "stacked", id="stacked-gzip"),
    ],
)
def test_compression_bomb_is_refused_with_bounded_memory(
    bomb: Callable[[], bytes], encoding: str, reason: str
) -> None:
    """A bomb (1 GB once inflated) is refused while the process grows by < 40 MB: the cap is
    5 MB, so only the capped document and one bounded step of inflation are ever in memory."""
    with serve({"/bomb": feed(bomb(), Content_Encoding=encoding)}) as server:
        done = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, f"{server.base}/bomb"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))},
        )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["error"] and "\n" not in result["error"], result
    assert result["peak_kb"] < 40 * 1024, result
    assert reason in result["error"], result


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        pytest.param(gzip.compress(SAMPLE.read_bytes()), "gzip", id="gzip"),
        pytest.param(zlib.compress(SAMPLE.read_bytes()), "deflate", id="zlib-deflate"),
        pytest.param(zlib.compress(SAMPLE.read_bytes())[2:-4], "deflate", id="raw-deflate"),
        pytest.param(SAMPLE.read_bytes(), "identity", id="identity"),
    ],
)
def test_compressed_feeds_are_read(body: bytes, encoding: str) -> None:
    """An honest compressed feed is inflated to exactly the document; gzip is asked for."""
    with serve({"/feed": feed(body, Content_Encoding=encoding)}) as server:
        assert fetch(f"{server.base}/feed").content == SAMPLE.read_bytes()
    assert server.requests[0]["Accept-Encoding"] == "gzip, deflate"


@pytest.mark.parametrize(
    ("body", "encoding", "reason"),
    [
        pytest.param(b"\x1b\x00", "br", "Content-Encoding 'br' is refused", id="brotli"),
        pytest.param(b"x", "zstd", "Content-Encoding 'zstd' is refused", id="zstd"),
        pytest.param(
            gzip.compress(gzip.compress(b"x")), "gzip, gzip", "stacked", id="stacked-gzip"
        ),
        pytest.param(b"not gzip at all", "gzip", "compressed body is corrupt", id="corrupt"),
    ],
)
def test_other_encodings_are_refused(body: bytes, encoding: str, reason: str) -> None:
    """Encodings that were not asked for, stacked or corrupt bodies get one line."""
    with (
        serve({"/feed": feed(body, Content_Encoding=encoding)}) as server,
        pytest.raises(FeedFetchError, match=reason),
    ):
        fetch(f"{server.base}/feed")


# --- lesser: the service under concurrent and slow ingests ---------------------------------------


def post_hook(url: str, secret: str, timeout: float = 60) -> tuple[int, dict[str, Any], str]:
    """POST the webhook; returns (status, JSON body, Retry-After header)."""
    request = urllib.request.Request(url, method="POST", headers={"X-Newsletter-Secret": secret})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), e.headers.get("Retry-After", "")


@contextlib.contextmanager
def running_service(
    tmp_path: Path, database_url: str, config: str, *, ingest_first: bool = False
) -> Iterator[str]:
    """`newsletter init` (and `ingest`), then `newsletter run` until the block ends; yields its
    base URL. On leaving, SIGTERM must stop it cleanly."""
    from tests.test_service import wait_for

    (tmp_path / "config.toml").write_text(f"[database]\nurl = '{database_url}'\n{config}")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
        "NEWSLETTER_SECRET": SECRET,
    }
    newsletter = [sys.executable, "-m", "newsletter"]
    for args in (["init"], ["ingest"]) if ingest_first else (["init"],):
        subprocess.run([*newsletter, *args], cwd=tmp_path, env=env, check=True, capture_output=True)
    port = free_port()
    with (tmp_path / "run.log").open("w") as log:
        proc = subprocess.Popen(
            [*newsletter, "run", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/healthz", expect='"scheduler":true')
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    assert code == 0
    text = (tmp_path / "run.log").read_text()
    assert "Traceback" not in text and " ERROR " not in text, text


def item(n: int) -> dict[str, object]:
    return {
        "title": f"Item {n}",
        "link": f"https://portal.example.org/item-{n}",
        "guid": f"portal-{n}",
        "date": datetime.now(UTC) - timedelta(days=1),
    }


def test_two_webhook_calls_at_once_one_ingests_the_other_is_told(
    tmp_path: Path, database_url: str
) -> None:
    """Two POST /hooks/ingest at once: one ingests (200), the other gets 409 with Retry-After;
    no 500, nothing logged as an error, the new item stored once."""
    hook_secret = "h" * 40
    document: dict[str, Any] = {"body": rss([item(1)]), "delay": 0.0}

    def slow_feed(h: BaseHTTPRequestHandler, s: Server) -> None:
        s.stop.wait(document["delay"])
        send(h, 200, {}, document["body"])

    with serve({"/feed": slow_feed}) as server:
        config = (
            f"[sources]\nfeeds = [{{ url = '{server.base}/feed' }}]\ntimeout_seconds = 15.0\n"
            f"[alerts]\nwebhook_secret = '{hook_secret}'\n"
        )
        with running_service(tmp_path, database_url, config, ingest_first=True) as base:
            document.update(body=rss([item(1), item(2)]), delay=3.0)
            seen = len(server.requests)
            answers: list[tuple[int, dict[str, Any], str]] = []
            first = threading.Thread(
                target=lambda: answers.append(post_hook(f"{base}/hooks/ingest", hook_secret))
            )
            first.start()
            deadline = time.monotonic() + 30
            while len(server.requests) == seen and time.monotonic() < deadline:
                time.sleep(0.02)
            answers.append(post_hook(f"{base}/hooks/ingest", hook_secret))
            first.join(timeout=60)
    by_status = {status: (body, retry) for status, body, retry in answers}
    assert sorted(by_status) == [200, 409], answers
    assert by_status[200][0]["sources"][0]["new"] == 1
    busy, retry_after = by_status[409]
    assert busy["sources"][0]["busy"] is True and retry_after == "15"
    assert len(server.requests) == seen + 1  # the second call fetched nothing
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Item)) == 2
    engine.dispose()


def test_healthz_answers_while_a_slow_huge_feed_is_ingested(
    tmp_path: Path, database_url: str
) -> None:
    """While a 'huge' feed drips in, /healthz answers each time within 2 s, and the webhook
    answers within the fetch deadline (plus a margin) rather than when the drip ends."""
    hook_secret = "h" * 40
    with serve({"/huge": drip_body}) as server:
        config = (
            f"[sources]\nfeeds = [{{ url = '{server.base}/huge' }}]\ntimeout_seconds = 5.0\n"
            f"[alerts]\nwebhook_secret = '{hook_secret}'\n"
        )
        with running_service(tmp_path, database_url, config) as base:
            answers: list[tuple[int, dict[str, Any], str]] = []
            posted = time.monotonic()
            hook = threading.Thread(
                target=lambda: answers.append(post_hook(f"{base}/hooks/ingest", hook_secret))
            )
            hook.start()
            during = 0
            for _ in range(10):
                started = time.monotonic()
                with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
                    assert json.loads(response.read())["status"] == "ok"
                assert time.monotonic() - started < 2
                during += server.active > 0
                time.sleep(0.2)
            hook.join(timeout=30)
            answered_after = time.monotonic() - posted
            assert not hook.is_alive(), "the webhook is held by the slow source"
            assert during >= 5  # most answers came while the feed was still dripping
    [(status, body, _retry)] = answers
    assert status in (200, 409) and answered_after < 30
    if status == 200:
        assert "within timeout_seconds=5" in (body["sources"][0]["error"] or "")
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        source = session.scalars(select(Source)).one()
        assert "no complete answer within timeout_seconds=5" in (source.last_error or "")
    engine.dispose()


@pytest.mark.parametrize("warm", [True, False], ids=["warmed", "cold"])
def test_warm_up_loads_what_a_first_fetch_would_load(warm: bool) -> None:
    """A new process that ran fetch.warm_up has httpx's asyncio machinery loaded (the service
    does it at start, so the first urgent item's fetch does not); one that did not, has not."""
    code = (
        "import sys\n"
        "from newsletter import fetch\n"
        "from newsletter.config import SourcesSettings\n"
        + ("fetch.warm_up(SourcesSettings())\n" if warm else "")
        + "print('anyio._backends._asyncio' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == str(warm), result.stderr
