"""The service's own SMTP inbound: mail to the List-Unsubscribe address unsubscribes.

The handler only routes: each InboundRoute says which recipient addresses it takes and what to do
with a message to one of them::

    handler = InboundHandler([unsubscribe_route(...), bounce_route(...)])

Mail to the bounce address (plain, or VERP bounces+<delivery>-<signature>@) goes to
newsletter.bounces: a hard bounce marks its delivery failed and suppresses the address; a
feedback-loop report (a spam complaint) goes to newsletter.complaints, which unsubscribes and
suppresses the person and counts the complaint on its campaign.

A recipient no route takes is refused at RCPT. A message with a bad or unknown token, or a forged
VERP address, is accepted and dropped: answering differently would tell a stranger which are real.
A message that cannot be read (too deeply nested, undecodable) is answered 554 and logged in one
line; the session goes on. Any other failure (the database is away) is logged by its kind, never
its text (which may quote an address), and answered 451 so that the sender tries again.

The server bounds its connections, in total and per client address ([inbound] max_connections,
max_connections_per_client: one more is answered 421 and closed) and drops a connection that sends
no command for [inbound] idle_timeout_seconds.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.header import decode_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from newsletter.bounces import UnreadableMailError
from newsletter.clock import Clock
from newsletter.complaints import handle_return
from newsletter.config import InboundSettings, Settings
from newsletter.db import unit_of_work
from newsletter.errors import TokenError
from newsletter.subscriptions import unsubscribe
from newsletter.tokens import read_token

log = logging.getLogger(__name__)

# Linear: anchored (match), and each quantifier's class is disjoint from what follows it (\s from
# "u", the token's characters from \s and the end), so a failed attempt gives characters back at
# most once each; token_from_subject feeds it at most MAX_SUBJECT characters.
SUBJECT = re.compile(r"^\s*unsubscribe\s+([A-Za-z0-9_\-.]+)\s*$", re.IGNORECASE)
MAX_SUBJECT = 1000  # a token is about a hundred characters
MAX_HEADER_BYTES = 64 * 1024  # of a message, read for its headers
MAX_RECIPIENTS = 20  # per message: each is applied on its own (a bounce names one)
UNREADABLE = "554 5.6.0 Message could not be read; it was not applied"
TOO_MANY = b"421 4.7.0 Too many connections, try again later\r\n"


@dataclass(frozen=True)
class InboundMail:
    recipient: str
    sender: str
    message: Message  # the headers only; routes that need the body read raw
    raw: bytes = b""  # the message as received, for readers that parse it their own way


@dataclass(frozen=True)
class InboundRoute:
    name: str
    accepts: Callable[[str], bool]
    handle: Callable[[InboundMail], Awaitable[None]]


class InboundHandler:
    """An aiosmtpd handler that hands each message to the route that takes its recipient."""

    def __init__(self, routes: Sequence[InboundRoute]) -> None:
        self.routes = list(routes)

    def route_for(self, address: str) -> InboundRoute | None:
        """The first route that takes this recipient, if any."""
        return next((r for r in self.routes if r.accepts(address)), None)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Take only recipients some route handles, and a few per message."""
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        if self.route_for(address) is None:
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Read the headers once and give the message to the route of each recipient."""
        raw = envelope.original_content or b""
        try:
            message = read_headers(raw)
        except UnreadableMailError as e:
            log.warning("inbound message set aside, unreadable: %s", e.reason)
            return UNREADABLE
        answer = "250 OK"
        for rcpt in envelope.rcpt_tos:
            route = self.route_for(rcpt)
            if route is None:
                continue
            try:
                await route.handle(InboundMail(rcpt, str(envelope.mail_from or ""), message, raw))
            except UnreadableMailError as e:
                log.warning("inbound %s message set aside, unreadable: %s", route.name, e.reason)
                answer = UNREADABLE
            except Exception as e:  # the database is away: the sending server will try again
                log.error("inbound %s failed (%s); answered 451", route.name, describe(e))
                return "451 4.3.0 Try again later"
        return answer


def describe(error: BaseException) -> str:
    """An exception by its kind and its cause's kind only: their text may quote an address."""
    kinds = [type(error).__name__]
    cause = getattr(error, "orig", None) or error.__cause__
    if cause is not None:
        kinds.append(type(cause).__name__)
    return " from ".join(kinds)


def read_headers(raw: bytes) -> Message:
    """The header section of a message from outside (its first MAX_HEADER_BYTES at most)."""
    try:
        # compat32 and headers only: no nesting to recurse into, no structured header parser.
        return BytesHeaderParser(policy=compat32).parsebytes(raw[:MAX_HEADER_BYTES])
    except Exception as e:
        raise UnreadableMailError(f"the email package failed ({type(e).__name__})") from None


def token_from_subject(message: Message) -> str | None:
    """The token of an "unsubscribe TOKEN" subject, or None; UnreadableMailError if undecodable."""
    subject = _decoded(str(message.get("Subject", ""))[:MAX_SUBJECT])
    match = SUBJECT.match(subject[:MAX_SUBJECT])
    return match.group(1) if match else None


def _decoded(subject: str) -> str:
    """A subject with its RFC 2047 encoded words decoded; unknown or unusable charsets (a codec
    that is no text encoding, or refuses errors="replace": idna, undefined) read as
    ASCII."""
    try:
        chunks = decode_header(subject)
    except Exception as e:  # a broken encoded word (bad base64)
        raise UnreadableMailError(f"subject not decodable ({type(e).__name__})") from None
    text = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            text.append(chunk)
            continue
        try:
            text.append(chunk.decode(charset or "ascii", "replace"))
        except (LookupError, UnicodeError):  # UnicodeError: idna's "Unsupported error handling"
            text.append(chunk.decode("ascii", "replace"))
    return "".join(text)


def unsubscribe_route(
    *, settings: Settings, factory: sessionmaker[DbSession], clock: Clock
) -> InboundRoute:
    """Mail to [mail] (or [discreet]) unsubscribe_address with "unsubscribe TOKEN" unsubscribes."""
    addresses = {settings.mail.unsubscribe_address.lower()}
    if settings.discreet.unsubscribe_address:
        addresses.add(settings.discreet.unsubscribe_address.lower())
    secret = settings.security.require_secret()

    def apply(token: str) -> None:
        try:
            claims = read_token(token, secret=secret, purpose="unsubscribe")
        except TokenError:
            return
        with unit_of_work(factory) as session:
            unsubscribe(
                session=session,
                subscriber_id=claims.subscriber_id,
                list_id=claims.list_id,
                now=clock.now(),
                actor="mailto",
            )

    async def handle(mail: InboundMail) -> None:
        token = token_from_subject(mail.message)
        if token:
            await asyncio.to_thread(apply, token)

    return InboundRoute("unsubscribe", lambda rcpt: rcpt.lower() in addresses, handle)


def bounce_route(
    *, settings: Settings, factory: sessionmaker[DbSession], clock: Clock
) -> InboundRoute:
    """Mail to [mail] or [discreet] bounce_address, plain or VERP: a bounce or a complaint."""
    ours = [
        a.lower().rpartition("@")[::2]
        for a in (settings.mail.bounce_address, settings.discreet.bounce_address)
    ]

    def accepts(rcpt: str) -> bool:
        # Forged VERP addresses are taken too, and dropped by handle_bounce: no oracle.
        rcpt_local, _, rcpt_domain = rcpt.lower().rpartition("@")
        return any(
            rcpt_domain == domain and (rcpt_local == local or rcpt_local.startswith(local + "+"))
            for local, domain in ours
        )

    def apply(mail: InboundMail) -> None:
        with unit_of_work(factory) as session:
            handle_return(
                session=session,
                raw=mail.raw,
                envelope_recipients=[mail.recipient],
                settings=settings,
                now=clock.now(),
            )

    async def handle(mail: InboundMail) -> None:
        await asyncio.to_thread(apply, mail)

    return InboundRoute("bounces", accepts, handle)


class ConnectionLimits:
    """Connections open now, in total and per client address; used on the server's loop only."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self.open: Counter[str] = Counter()

    def admit(self, client: str) -> bool:
        """Count one more connection from client, unless a bound is reached."""
        if self.open.total() >= self.total or self.open[client] >= self.per_client:
            return False
        self.open[client] += 1
        return True

    def release(self, client: str) -> None:
        """Count a closed connection."""
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]


class BoundedSMTP(SMTP):
    """aiosmtpd's SMTP that turns away connections over the limits and drops idle ones hard."""

    def __init__(self, handler: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.client: str | None = None  # set once admitted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection, or answer 421 and close it before aiosmtpd sees it."""
        if self.client is None:
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if peer else ""
            if not self.limits.admit(client):
                log.info("inbound: refused a connection from %s, too many open", client)
                if isinstance(transport, asyncio.WriteTransport):
                    transport.write(TOO_MANY)
                transport.close()
                return
            self.client = client
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Free the connection's place (a refused one never had one)."""
        if self.client is None:
            return
        self.limits.release(self.client)
        self.client = None
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        # aiosmtpd's idle timeout calls close(), which first waits to send the replies still
        # buffered, forever for a peer that reads none (half-open, or on purpose): abort instead.
        log.info("inbound: closed a connection from %s, idle too long", self.client)
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.abort()


class InboundController(Controller):
    """aiosmtpd's threaded Controller serving BoundedSMTP."""

    def __init__(self, handler: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        self.limits = limits
        super().__init__(handler, **kwargs)

    def factory(self) -> SMTP:
        """One BoundedSMTP per connection, all sharing the controller's limits."""
        return BoundedSMTP(self.handler, limits=self.limits, **self.SMTP_kwargs)


def start_inbound(*, routes: Sequence[InboundRoute], inbound: InboundSettings) -> Controller:
    """Start the inbound SMTP server in a background thread; .stop() ends it."""
    controller = InboundController(
        InboundHandler(routes),
        limits=ConnectionLimits(inbound.max_connections, inbound.max_connections_per_client),
        hostname=inbound.host,
        port=inbound.port,
        data_size_limit=inbound.max_message_bytes,
        timeout=inbound.idle_timeout_seconds,
        server_hostname="newsletter-inbound",
        ready_timeout=10,
    )
    controller.start()
    return controller


def inbound_for(settings: Settings, factory: sessionmaker[DbSession], clock: Clock) -> Any:
    """The inbound server the settings ask for, started, or None when [inbound] is off."""
    if not settings.inbound.enabled:
        return None
    return start_inbound(
        routes=[
            unsubscribe_route(settings=settings, factory=factory, clock=clock),
            bounce_route(settings=settings, factory=factory, clock=clock),
        ],
        inbound=settings.inbound,
    )
