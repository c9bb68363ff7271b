"""The web listener that `newsletter web` and `newsletter run` both serve with: uvicorn, bounded.

uvicorn alone closes a connection only after a reply has gone out and the keep-alive time has
passed: a client that connects and sends nothing, or sends its headers a byte at a time, holds a
file descriptor for ever, and about a thousand of them exhaust the open-files limit. The
protocol below adds, per listener ([web] settings):

- a cap on open connections in total and per client address (an IPv6 client by its /64);
  addresses in `trusted_proxies` count only in the total, since every reader comes through them;
- a deadline for the whole header block, counted from the moment a request is awaited (the
  connection, or the end of the previous reply), never renewed by a trickle of bytes;
- a deadline for the whole body, counted from the end of the headers;
- a cap on the body (a Content-Length above it is refused before any of it is read).

The header block's size is capped by h11 (`max_header_bytes`), idle keep-alive connections by
uvicorn (`keep_alive_seconds`). The console's listener takes [console] trusted_proxies (none by
default) and a body cap of its own instead of [web]'s (listener_web). Every reply, the canned
ones here included, carries the pages' security headers, and no `server` header.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import resource
from collections import Counter
from http import HTTPStatus
from typing import Any, ClassVar

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from newsletter.config import Settings, WebSettings
from newsletter.web import SECURITY_HEADERS, SecurityHeaders, body_limit

log = logging.getLogger("newsletter.web")
OPEN_FILES_TARGET = 65536  # what docs/deployment.md's units set as LimitNOFILE
OPEN_FILES_RESERVE = 256  # descriptors kept for the database, SMTP, inbound mail and logs


class Guard:
    """The connection counts shared by every connection of one listener."""

    def __init__(self, web: WebSettings, max_total: int) -> None:
        self.web = web
        self.max_total = max_total
        self.total = 0
        self.per_client: Counter[str] = Counter()
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in web.trusted_proxies]

    def client_key(self, client: tuple[str, int] | None) -> str:
        """What a connection counts against per client: "" for a trusted proxy or a local socket."""
        if client is None:
            return ""
        try:
            ip = ipaddress.ip_address(client[0])
        except ValueError:
            return client[0]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.trusted):
            return ""
        if isinstance(ip, ipaddress.IPv6Address):  # one subscriber line owns a whole /64
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def admit(self, key: str) -> bool:
        """Count a new connection, or refuse it when the listener or its client is full."""
        if self.total >= self.max_total:
            return False
        if key and self.per_client[key] >= self.web.max_connections_per_client:
            return False
        self.total += 1
        if key:
            self.per_client[key] += 1
        return True

    def release(self, key: str) -> None:
        """Forget a closed connection."""
        self.total -= 1
        if key:
            self.per_client[key] -= 1
            if self.per_client[key] <= 0:
                del self.per_client[key]


class _CountingConnection(h11.Connection):
    """h11's connection, measuring the header block and the body of the request being received.

    h11's own cap applies only to a header block still incomplete; one that arrives whole in a
    single read is parsed whatever its size, so it is measured here.
    """

    header_bytes = 0
    body_bytes = 0

    def next_event(self) -> Any:
        """The next event, as h11 gives it, with the header and body bytes added up."""
        event = super().next_event()
        if isinstance(event, h11.Request):
            self.body_bytes = 0
            self.header_bytes = len(event.target) + sum(
                len(n) + len(v) + 4 for n, v in event.headers
            )
        elif isinstance(event, h11.Data):
            self.body_bytes += len(event.data)
        return event


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with connection caps, header and body deadlines, a body cap."""

    guard: ClassVar[Guard]

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.counting = _CountingConnection(h11.SERVER, self.guard.web.max_header_bytes)
        self.conn = self.counting
        self.client_key = ""
        self.admitted = False
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Admit the connection within the caps (or answer 503) and start the header deadline."""
        super().connection_made(transport)
        self.client_key = self.guard.client_key(self.client)
        if not self.guard.admit(self.client_key):
            self.refuse(503)
            return
        self.admitted = True
        self.watch()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadlines and free the connection's place."""
        self.stop_timers()
        if self.admitted:
            self.admitted = False
            self.guard.release(self.client_key)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse as uvicorn does, then check the deadlines and the body cap."""
        super().data_received(data)
        self.watch()

    def on_response_complete(self) -> None:
        """After a reply, the next request's header deadline starts."""
        super().on_response_complete()
        self.watch()

    def send_400_response(self, msg: str) -> None:
        """A malformed request (or a header block over the cap) gets a canned reply and a close."""
        buffered = len(self.conn.trailing_data[0])
        self.refuse(431 if buffered > self.guard.web.max_header_bytes else 400)

    def watch(self) -> None:
        """Arm or stop the header and body deadlines for the state the request is in."""
        state = self.conn.their_state
        web = self.guard.web
        if self.transport.is_closing():
            self.stop_timers()
        elif self.counting.header_bytes > web.max_header_bytes:
            self.refuse(431)
        elif self.counting.body_bytes > self.body_cap() or (
            state is h11.SEND_BODY and self.declared_length() > self.body_cap()
        ):
            self.refuse(413)
        elif state is h11.IDLE:
            self.body_timer = _cancel(self.body_timer)
            if self.header_timer is None:  # total time, not renewed by each byte
                self.header_timer = self.loop.call_later(web.header_timeout_seconds, self.expire)
        elif state is h11.SEND_BODY:
            self.header_timer = _cancel(self.header_timer)
            if self.body_timer is None:
                self.body_timer = self.loop.call_later(web.body_timeout_seconds, self.expire)
        else:  # the request is in: the app answers in its own time
            self.stop_timers()

    def body_cap(self) -> int:
        """The cap on the body of the request being received (the preferences form's is larger)."""
        path = self.scope["path"] if self.scope is not None else ""
        return body_limit(path, self.guard.web)

    def declared_length(self) -> int:
        """The request's Content-Length, or 0 when it has none (chunked bodies are counted)."""
        for name, value in self.headers or []:
            if name == b"content-length" and value.isdigit():
                return int(value)
        return 0

    def expire(self) -> None:
        """A deadline passed: 408, and close."""
        self.header_timer = self.body_timer = None
        self.refuse(408)

    def refuse(self, status: int) -> None:
        """Answer with a short canned reply (unless the app's has begun) and close."""
        self.stop_timers()
        if self.transport.is_closing():
            return
        cycle = self.cycle  # the request's, or the previous one's on a kept-alive connection
        replying = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None:  # the app's late reply is dropped, its receive() ends
            cycle.disconnected = True
            cycle.message_event.set()
        if not replying:
            self.transport.write(canned_reply(status))
        if self.transport.get_write_buffer_size():  # a client that does not read
            self.transport.abort()
        else:
            self.transport.close()

    def stop_timers(self) -> None:
        """Cancel both deadlines."""
        self.header_timer = _cancel(self.header_timer)
        self.body_timer = _cancel(self.body_timer)


def _cancel(timer: asyncio.TimerHandle | None) -> asyncio.TimerHandle | None:
    """Cancel a timer if there is one; None, to store in its place."""
    if timer is not None:
        timer.cancel()
    return None


def canned_reply(status: int) -> bytes:
    """A complete HTTP/1.1 reply that closes the connection, with the security headers."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n".encode()
    headers = {
        "content-type": "text/plain; charset=utf-8",
        "content-length": str(len(body)),
        "connection": "close",
        **({"retry-after": "10"} if status == 503 else {}),
        **SECURITY_HEADERS,
    }
    head = f"HTTP/1.1 {status} {phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


def guarded_protocol(web: WebSettings, max_total: int) -> type[GuardedH11Protocol]:
    """A protocol class bound to one listener's counts."""

    class ListenerProtocol(GuardedH11Protocol):
        guard = Guard(web, max_total)

    return ListenerProtocol


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (at most 65536); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_TARGET if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-files limit from %d: %s", soft, e)
    return soft


def listener_web(app: ASGIApp, settings: Settings) -> WebSettings:
    """The limits of the listener serving `app`: [web]'s, but the console (an app whose state
    says `console`) believes only [console] trusted_proxies and takes larger bodies."""
    if not getattr(getattr(app, "state", None), "console", False):
        return settings.web
    console = settings.console
    return dataclasses.replace(
        settings.web,
        trusted_proxies=console.trusted_proxies,
        # The console answers a body past its own cap with its page; twice that is dropped here.
        max_body_bytes=2 * console.max_body_bytes,
    )


def listener_config(app: ASGIApp, settings: Settings, *, host: str, port: int) -> uvicorn.Config:
    """The uvicorn settings of a listener, with its limits (listener_web); raises RLIMIT_NOFILE."""
    web = listener_web(app, settings)
    max_total = web.max_connections
    soft = raise_open_files_limit()
    if soft != resource.RLIM_INFINITY and max_total > soft - OPEN_FILES_RESERVE:
        max_total = max(soft - OPEN_FILES_RESERVE, 1)
        log.warning(
            "open-files limit %d: at most %d web connections (raise LimitNOFILE for %d)",
            soft,
            max_total,
            web.max_connections,
        )
    return uvicorn.Config(
        SecurityHeaders(app),  # outermost: Starlette's own 500 and 405 answers get them too
        host=host,
        port=port,
        http=guarded_protocol(web, max_total),
        ws="none",
        lifespan="off",
        log_level="warning",
        access_log=False,  # access logs would keep who opened which personal link
        server_header=False,
        proxy_headers=True,
        forwarded_allow_ips=list(web.trusted_proxies),
        timeout_keep_alive=web.keep_alive_seconds,
        h11_max_incomplete_event_size=web.max_header_bytes,
    )
