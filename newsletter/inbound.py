"""The service's own SMTP inbound: mail to the List-Unsubscribe address unsubscribes.

The handler only routes: each InboundRoute says which recipient addresses it takes and what to do
with a message to one of them::

    handler = InboundHandler([unsubscribe_route(...), bounce_route(...)])

Mail to the bounce address (plain, or VERP bounces+<delivery>-<signature>@) goes to
newsletter.bounces: a hard bounce marks its delivery failed and suppresses the address.

A recipient no route takes is refused at RCPT. A message with a bad or unknown token, or a forged
VERP address, is accepted and dropped: answering differently would tell a stranger which are real.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from newsletter.bounces import handle_bounce
from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.errors import TokenError
from newsletter.subscriptions import unsubscribe
from newsletter.tokens import read_token

SUBJECT = re.compile(r"^\s*unsubscribe\s+([A-Za-z0-9_\-.]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class InboundMail:
    recipient: str
    sender: str
    message: EmailMessage
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
        """Take only recipients some route handles."""
        if self.route_for(address) is None:
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Parse the message once and give it to the route of each recipient."""
        raw = envelope.original_content or b""
        message = message_from_bytes(raw, policy=policy.default)
        assert isinstance(message, EmailMessage)
        try:
            for rcpt in envelope.rcpt_tos:
                route = self.route_for(rcpt)
                if route is not None:
                    mail = InboundMail(rcpt, str(envelope.mail_from or ""), message, raw)
                    await route.handle(mail)
        except Exception:  # the database is away: the sending server will try again
            return "451 4.3.0 Try again later"
        return "250 OK"


def token_from_subject(message: EmailMessage) -> str | None:
    """The token of an "unsubscribe TOKEN" subject, or None."""
    match = SUBJECT.match(str(message.get("Subject", "")))
    return match.group(1) if match else None


def unsubscribe_route(
    *, settings: Settings, factory: sessionmaker[DbSession], clock: Clock
) -> InboundRoute:
    """Mail to [mail] unsubscribe_address with "unsubscribe TOKEN" unsubscribes that token."""
    address = settings.mail.unsubscribe_address.lower()
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

    return InboundRoute("unsubscribe", lambda rcpt: rcpt.lower() == address, handle)


def bounce_route(
    *, settings: Settings, factory: sessionmaker[DbSession], clock: Clock
) -> InboundRoute:
    """Mail to [mail] bounce_address, plain or VERP, is read as a bounce and applied."""
    local, _, domain = settings.mail.bounce_address.lower().rpartition("@")

    def accepts(rcpt: str) -> bool:
        # Forged VERP addresses are taken too, and dropped by handle_bounce: no oracle.
        rcpt_local, _, rcpt_domain = rcpt.lower().rpartition("@")
        return rcpt_domain == domain and (rcpt_local == local or rcpt_local.startswith(local + "+"))

    def apply(mail: InboundMail) -> None:
        with unit_of_work(factory) as session:
            handle_bounce(
                session=session,
                raw=mail.raw or mail.message.as_bytes(),
                envelope_recipients=[mail.recipient],
                settings=settings,
                now=clock.now(),
            )

    async def handle(mail: InboundMail) -> None:
        await asyncio.to_thread(apply, mail)

    return InboundRoute("bounces", accepts, handle)


def start_inbound(
    *, routes: Sequence[InboundRoute], host: str, port: int, max_message_bytes: int
) -> Controller:
    """Start the inbound SMTP server in a background thread; .stop() ends it."""
    controller = Controller(
        InboundHandler(routes),
        hostname=host,
        port=port,
        data_size_limit=max_message_bytes,
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
        host=settings.inbound.host,
        port=settings.inbound.port,
        max_message_bytes=settings.inbound.max_message_bytes,
    )
