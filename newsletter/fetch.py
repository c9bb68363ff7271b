"""Fetch a source: an http(s) URL under one deadline with checked redirects, or a local file.

What a feed's server (or whoever controls it) can make this module do is bounded:

- time: one deadline, `[sources] timeout_seconds`, covers the whole fetch (name lookup,
  connect, TLS, headers, body, every redirect hop), so a server that drips its answer a byte at
  a time is cut off when the deadline passes, not when a single read stalls;
- redirects: followed by hand, at most MAX_REDIRECTS hops, only to http(s) with a usable host
  and port, never from https to plain http;
- addresses: every host is resolved once, each address is classified (`address_kind`), and the
  request goes to the checked address itself (the name stays in the Host header and in the TLS
  server name, so the certificate is still checked against it). A DNS answer that changes
  between the check and the connection (rebinding) therefore cannot steer it. Loopback,
  private, link-local (cloud metadata at 169.254.169.254), unspecified, multicast and reserved
  addresses, also when embedded in IPv6 (::ffff:127.0.0.1, NAT64, 6to4), are refused unless the
  configured source itself resolves to that kind of address (a source at http://127.0.0.1/ may
  redirect within loopback). Proxy variables (HTTP_PROXY …) are ignored: a proxy would make the
  connection on its own, unchecked;
- size: `[sources] max_bytes` caps the body as received and again as decoded: gzip and deflate
  are inflated in steps that never produce more than the cap, so a compression bomb costs at
  most about max_bytes of memory. Only those two encodings are asked for; any other is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx

from newsletter.config import SourcesSettings
from newsletter.errors import FeedFetchError
from newsletter.sanitize import clean_text

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "newsletter-ingest/0.1 (+https://portal.example.org/)"
ACCEPT_ENCODING = "gzip, deflate"
SHOWN_MAX = 200  # how much of a URL an error line shows
# The sources.etag and sources.last_modified columns: PostgreSQL refuses longer values.
ETAG_MAX = 500
LAST_MODIFIED_MAX = 100

IPAddress = IPv4Address | IPv6Address
THIS_NETWORK = ip_network("0.0.0.0/8")  # "this host" on Linux: 0.0.0.0 reaches loopback
SHARED_SPACE = ip_network("100.64.0.0/10")  # carrier-grade NAT; also Alibaba's metadata address
SITE_LOCAL = ip_network("fec0::/10")  # deprecated, still routed inside some networks
# IPv6 ranges whose last 32 bits are an IPv4 address the packet really goes to.
EMBEDDED_IPV4 = (
    ip_network("::/96"),  # IPv4-compatible (deprecated)
    ip_network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
    ip_network("64:ff9b::/96"),  # NAT64
    ip_network("64:ff9b:1::/48"),  # local-use NAT64
)

# Name lookups run here rather than in the event loop's default executor: asyncio.run() waits
# for that one at exit, so a resolver that hangs would outlast the deadline.
_RESOLVER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="newsletter-dns")


@dataclass(frozen=True)
class FetchResult:
    """A fetched document (None when the server said 304 Not Modified) and its validators."""

    content: bytes | None
    etag: str | None
    last_modified: str | None
    redirected_to: str | None = None  # where the last redirect went, when there was one


def fetch_source(
    url_or_path: str,
    *,
    etag: str | None,
    last_modified: str | None,
    settings: SourcesSettings,
) -> FetchResult:
    """Fetch an http(s) URL (conditional GET) or read a file, never more than max_bytes."""
    scheme = _scheme(url_or_path)
    if scheme in ("http", "https"):
        if not _usable_port(url_or_path):
            raise FeedFetchError(shown(url_or_path), "not a usable URL: its port is out of range")
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING}
        etag, last_modified = (
            _validator(etag, ETAG_MAX),
            _validator(last_modified, LAST_MODIFIED_MAX),
        )
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        # Each call runs its own event loop (ingest runs on worker threads), so the deadline
        # can cancel whatever the fetch is waiting on.
        return asyncio.run(_fetch_http(url_or_path, headers=headers, settings=settings))
    if is_file_source(url_or_path):
        return FetchResult(_read_file(url_or_path, settings.max_bytes), None, None)
    if scheme == "<invalid>":
        raise FeedFetchError(shown(url_or_path), "not a usable URL")
    raise FeedFetchError(url_or_path, f"unsupported scheme {scheme!r}: use http(s) or a file")


def is_file_source(url_or_path: str) -> bool:
    """True for a plain path or a file:// URL (a one-letter scheme is a Windows drive)."""
    scheme = _scheme(url_or_path)
    return scheme in ("", "file") or len(scheme) == 1


def _scheme(url_or_path: str) -> str:
    """The URL's scheme in lower case; "<invalid>" for text urllib cannot split ("http://[::1")."""
    try:
        return urlsplit(url_or_path).scheme.lower()
    except ValueError:
        return "<invalid>"


def file_path(url_or_path: str) -> Path:
    """The absolute path of a file:// URL or a plain path."""
    parts = urlsplit(url_or_path)
    if parts.scheme.lower() == "file":
        return Path(url2pathname(parts.path)).resolve()
    return Path(url_or_path).expanduser().resolve()


# --- the policy: pure functions ------------------------------------------------------------------


def address_kind(address: IPAddress) -> str | None:
    """The kind of a non-public address ("loopback", "private" …), or None for a public one."""
    if isinstance(address, IPv6Address):
        if address.is_loopback or address.is_unspecified:
            return "loopback" if address.is_loopback else "unspecified"
        inner = _embedded_ipv4(address)
        if inner is not None:
            return address_kind(inner)
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified or address in THIS_NETWORK:
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address.is_private or address in SHARED_SPACE or address in SITE_LOCAL:
        return "private"
    return None if address.is_global else "reserved"


def _embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4 …), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in EMBEDDED_IPV4):
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def allowed_kinds(source_addresses: list[IPAddress]) -> frozenset[str]:
    """The non-public kinds a source may redirect to: those of its own addresses."""
    return frozenset(kind for kind in map(address_kind, source_addresses) if kind)


def address_refusal(addresses: list[IPAddress], allowed: frozenset[str]) -> str | None:
    """Why connecting to these addresses is refused (one is of a kind not allowed), or None."""
    for address in addresses:
        kind = address_kind(address)
        if kind is not None and kind not in allowed:
            article = "an" if kind[0] in "aeiou" else "a"
            return f"it resolves to {address}, {article} {kind} address"
    return None


def redirect_refusal(current: str, target: str, *, hops: int) -> str | None:
    """Why following a redirect from `current` to `target` (hop number `hops`) is refused."""
    scheme = _scheme(target)
    if scheme not in ("http", "https"):
        return "only http(s) redirects are followed"
    if _scheme(current) == "https" and scheme == "http":
        return "it leaves https for plain http"
    if not urlsplit(target).hostname:
        return "it names no host"
    if not _usable_port(target):
        return "its port is not a number from 0 to 65535"
    if hops > MAX_REDIRECTS:
        return f"more than {MAX_REDIRECTS} redirects"
    return None


def _usable_port(url: str) -> bool:
    """False for a port urllib refuses ("99999"): httpx would pass it on to connect(), whose
    OverflowError escapes httpx's errors."""
    try:
        return (urlsplit(url).port or 0) >= 0
    except ValueError:
        return False


def shown(url: object) -> str:
    """A URL (or any remote text) as a short line for an error message."""
    return clean_text(str(url), max_length=SHOWN_MAX)


# --- the fetch -----------------------------------------------------------------------------------


async def _fetch_http(
    url: str, *, headers: dict[str, str], settings: SourcesSettings
) -> FetchResult:
    """Fetch `url` and its redirects, all within one deadline."""
    trail = [url]  # the URLs asked for, so a timeout can say where it was
    try:
        async with asyncio.timeout(settings.timeout_seconds):
            return await _follow(trail, headers=headers, settings=settings)
    except (TimeoutError, httpx.TimeoutException):
        raise FeedFetchError(
            url,
            f"no complete answer within timeout_seconds={settings.timeout_seconds:g}"
            + _where(trail),
        ) from None
    except httpx.HTTPError as e:
        raise FeedFetchError(url, f"{type(e).__name__}: {shown(e)}{_where(trail)}") from e
    except httpx.InvalidURL as e:  # the configured URL itself (a redirect's is checked apart)
        raise FeedFetchError(url, f"not a usable URL: {shown(e)}") from None
    except UnicodeError as e:
        # httpx decodes a redirect's host as it receives the response (Response.next_request),
        # before _redirect_target sees it; an invalid IDNA label ("xn--a") raises there.
        raise FeedFetchError(
            url, f"a redirect names an unusable host: {shown(e)}{_where(trail)}"
        ) from None


async def _follow(
    trail: list[str], *, headers: dict[str, str], settings: SourcesSettings
) -> FetchResult:
    """GET the last URL of `trail`; on a redirect, check it, append the target and go on."""
    source = trail[0]
    addresses = await _resolve(source, httpx.URL(source))
    allowed = allowed_kinds(addresses)
    async with _client(settings) as client:
        while True:
            response = await _send(client, httpx.URL(trail[-1]), addresses, headers)
            try:
                if response.status_code not in REDIRECT_STATUSES:
                    return await _result(trail, response, settings)
                target = _redirect_target(trail, response)
            finally:
                await response.aclose()
            trail.append(target)
            addresses = await _resolve(source, httpx.URL(target))
            refusal = address_refusal(addresses, allowed)
            if refusal:
                raise FeedFetchError(source, f"redirect to {shown(target)} refused: {refusal}")


def warm_up(settings: SourcesSettings) -> None:
    """Load what a process's first fetch loads on its way (httpx's transport, anyio's asyncio
    backend): under a busy sender that took 0.1-0.2 s of the way to the first urgent alert.

    The request goes to a port bound on loopback and never listening: refused at once.
    """
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/"

        async def touch() -> None:
            async with _client(settings) as client:
                with contextlib.suppress(httpx.HTTPError):
                    await client.get(url)

        asyncio.run(touch())


def _client(settings: SourcesSettings) -> httpx.AsyncClient:
    """A client that follows nothing itself, keeps no connection and ignores proxy variables."""
    return httpx.AsyncClient(
        # SSL_CERT_FILE / SSL_CERT_DIR still name the trusted CAs, as httpx does by default.
        verify=httpx.create_ssl_context(trust_env=True),
        trust_env=False,
        timeout=settings.timeout_seconds,
        follow_redirects=False,
        # No reuse: a kept connection was checked (and its certificate verified) for one host.
        limits=httpx.Limits(max_keepalive_connections=0),
    )


async def _resolve(source: str, url: httpx.URL) -> list[IPAddress]:
    """The addresses of the URL's host (a literal address is its own answer)."""
    host = url.raw_host.decode("ascii")  # IDNA (punycode) for a non-ASCII name
    try:
        return [ip_address(host)]
    except ValueError:
        pass
    lookup = functools.partial(socket.getaddrinfo, host, None, type=socket.SOCK_STREAM)
    try:
        infos = await asyncio.get_running_loop().run_in_executor(_RESOLVER, lookup)
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise FeedFetchError(source, f"cannot resolve {shown(host)}: {reason}") from None
    found = [ip_address(str(info[4][0]).partition("%")[0]) for info in infos]
    return list(dict.fromkeys(found))


async def _send(
    client: httpx.AsyncClient, url: httpx.URL, addresses: list[IPAddress], headers: dict[str, str]
) -> httpx.Response:
    """Send the GET to each checked address in turn until one connects; the name stays in Host."""
    error: httpx.TransportError | None = None
    for address in addresses:
        request = client.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers={**headers, "Host": url.netloc.decode("ascii")},
            extensions={"sni_hostname": url.raw_host.decode("ascii")},
        )
        try:
            return await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            error = e
    assert error is not None  # _resolve never returns an empty list
    raise error


def _redirect_target(trail: list[str], response: httpx.Response) -> str:
    """The absolute URL a redirect response points to, once checked by redirect_refusal."""
    source, current = trail[0], trail[-1]
    location = response.headers.get("location", "")
    if not location:
        raise FeedFetchError(
            source, f"HTTP {response.status_code} redirect without a Location{_where(trail)}"
        )
    try:
        target = str(httpx.URL(current).join(location))
    except httpx.InvalidURL:
        raise FeedFetchError(source, f"redirect to {shown(location)} refused: not a URL") from None
    refusal = redirect_refusal(current, target, hops=len(trail))
    if refusal:
        raise FeedFetchError(source, f"redirect to {shown(target)} refused: {refusal}")
    return target


async def _result(
    trail: list[str], response: httpx.Response, settings: SourcesSettings
) -> FetchResult:
    """The document of a final (non-redirect) response, or FeedFetchError."""
    source = trail[0]
    redirected = trail[-1] if len(trail) > 1 else None
    if response.status_code == 304:  # what we sent still holds
        sent = response.request.headers
        return FetchResult(
            None, sent.get("if-none-match"), sent.get("if-modified-since"), redirected
        )
    if not response.is_success:
        reason = clean_text(response.reason_phrase, max_length=100)
        raise FeedFetchError(source, f"HTTP {response.status_code} {reason}{_where(trail)}")
    body = await _read_capped(source, response, settings.max_bytes)
    etag = _validator(response.headers.get("etag"), ETAG_MAX)
    last_modified = _validator(response.headers.get("last-modified"), LAST_MODIFIED_MAX)
    return FetchResult(body, etag, last_modified, redirected)


def _validator(value: str | None, max_length: int) -> str | None:
    """A validator (ETag, Last-Modified) worth keeping and sending back, else None.

    httpx sends header values as ASCII and the columns have a length: a server's "é" or a
    thousand-character ETag would otherwise break every later fetch of the source, or its store.
    Dropping one only costs an unconditional GET.
    """
    if value and len(value) <= max_length and value.isascii() and value.isprintable():
        return value
    return None


def _where(trail: list[str]) -> str:
    """' (at URL, after N redirects)' when the fetch was redirected, else nothing."""
    if len(trail) < 2:
        return ""
    hops = len(trail) - 1
    return f" (at {shown(trail[-1])}, after {hops} redirect{'s' if hops > 1 else ''})"


async def _read_capped(source: str, response: httpx.Response, max_bytes: int) -> bytes:
    """Read and decode a streamed body, refusing it as soon as either size passes max_bytes."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FeedFetchError(source, f"feed is {declared} bytes, more than max_bytes={max_bytes}")
    decoder = _decoder(source, response.headers.get("content-encoding", ""))
    body, received = bytearray(), 0
    async for chunk in response.aiter_raw():
        received += len(chunk)
        if received > max_bytes:
            raise FeedFetchError(source, f"feed is larger than max_bytes={max_bytes}")
        body += decoder.decode(chunk, limit=max_bytes - len(body) + 1)
        if len(body) > max_bytes:
            raise FeedFetchError(
                source, f"feed is larger than max_bytes={max_bytes} once decompressed"
            )
    return bytes(body)


class _Identity:
    """The body as sent."""

    def decode(self, data: bytes, *, limit: int) -> bytes:
        return data


class _Inflater:
    """gzip or deflate, inflated at most `limit` bytes at a time (zlib's max_length)."""

    def __init__(self, source: str, encoding: str) -> None:
        self.source = source
        self.raw_fallback = encoding == "deflate"  # some servers send raw deflate, no header
        wbits = zlib.MAX_WBITS | (16 if encoding != "deflate" else 0)
        self.inflater = zlib.decompressobj(wbits)

    def decode(self, data: bytes, *, limit: int) -> bytes:
        # With max_length, zlib stops after `limit` bytes and keeps the rest of the input in
        # unconsumed_tail; the caller refuses the body then, so that tail is never inflated.
        if self.inflater.eof:
            return b""  # bytes after the end of the stream are counted as received, and dropped
        try:
            out = self.inflater.decompress(data, limit)
        except zlib.error:
            if not self.raw_fallback:
                raise FeedFetchError(self.source, "compressed body is corrupt") from None
        else:
            self.raw_fallback = False  # the header was fine: no second guess later
            return out
        self.raw_fallback = False
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        return self.decode(data, limit=limit)


def _decoder(source: str, header: str) -> _Identity | _Inflater:
    """The decoder for a Content-Encoding header; stacked or unknown encodings are refused."""
    codings = [c.strip().lower() for c in header.split(",") if c.strip().lower() != "identity"]
    codings = [c for c in codings if c]
    if not codings:
        return _Identity()
    if len(codings) > 1:
        raise FeedFetchError(source, f"stacked Content-Encoding {shown(header)!r} is refused")
    if codings[0] in ("gzip", "x-gzip", "deflate"):
        return _Inflater(source, "deflate" if codings[0] == "deflate" else "gzip")
    raise FeedFetchError(
        source, f"Content-Encoding {shown(codings[0])!r} is refused (only gzip or deflate)"
    )


def _read_file(url_or_path: str, max_bytes: int) -> bytes:
    """Read a local feed file, refusing one larger than max_bytes."""
    path = file_path(url_or_path)
    try:
        with path.open("rb") as f:
            body = f.read(max_bytes + 1)
    except OSError as e:
        raise FeedFetchError(str(path), f"cannot read file: {e.strerror or e}") from e
    if len(body) > max_bytes:
        raise FeedFetchError(str(path), f"feed file is larger than max_bytes={max_bytes}")
    return body
