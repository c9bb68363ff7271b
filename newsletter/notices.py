"""Notices to one person: the double opt-in confirmation, the goodbye, and the key notices.

They and the web pages share the "web" gettext domain and its Jinja2 environment (i18n.py). The
HTML goes through render.py's compile_mjml and inline_css.

A discreet reader's notices are discreet too: the neutral identity ([discreet]) and subject, a
neutral name in the body, links on the neutral host. The key confirmation and the expiry
reminder are encrypted to the reader's key; the key problem notice is plain (the key is what
cannot be used), and says nothing of any campaign.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    MailingList,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
)
from newsletter.dkim import IdentitySigners
from newsletter.htmltext import wrap_text
from newsletter.i18n import gettext_for, web_environment
from newsletter.lock import acquire_lock, release_lock
from newsletter.message import POLICY, Identity, identity_for, plain_identity, set_subject
from newsletter.render import compile_mjml, inline_css, neutral_brand
from newsletter.smtp import Result, Transport
from newsletter.tokens import make_token, page_url

BATCH = 100
LEASE_NAME = "notices"


@dataclass(frozen=True)
class Notice:
    subject: str
    html: str
    text: str


KEY_KINDS = ("key_confirm", "key_problem", "key_expiry")


def render_notice(
    kind: str, *, lang: str, settings: Settings, discreet: bool = False, **context: Any
) -> Notice:
    """Render a notice (confirm, goodbye or a key notice) in one language: subject, HTML, text.

    With `discreet`, the neutral name stands for the brand and the neutral subject is used.
    """
    env = web_environment(lang)
    brand = neutral_brand(settings) if discreet else settings.brand
    values = {"lang": lang, "brand": brand, "kind": kind, **context}
    _ = gettext_for(lang)
    subjects = {
        "confirm": _("Please confirm your subscription"),
        "goodbye": _("You will not get any more emails from us"),
        "key_confirm": _("Turn on encrypted mail"),
        "key_problem": _("Your encryption key cannot be used"),
        "key_expiry": _("Your encryption key expires soon"),
    }
    if discreet:
        values["subject"] = settings.discreet.subject(lang)
    else:
        values["subject"] = f"{settings.brand.name}: {subjects[kind]}"
    template = "key_notice" if kind in KEY_KINDS else kind
    source = env.get_template(f"email/{template}.mjml.j2").render(values)
    # Wrapped here, not in each template, so no notice (or translation) can carry a long line.
    text = wrap_text(env.get_template(f"text/{template}.txt.j2").render(values))
    return Notice(values["subject"], inline_css(compile_mjml(source)), text)


def build_notice(
    notice: Notice,
    *,
    to: str,
    settings: Settings,
    now: datetime,
    identity: Identity | None = None,
) -> EmailMessage:
    """Wrap a notice for one address; marked auto-generated so auto-responders stay quiet."""
    identity = identity or plain_identity(settings)
    msg = EmailMessage(policy=POLICY)  # CRLF line ends; the raw Subject is never refolded
    msg["From"] = Address(identity.from_name, addr_spec=identity.from_address)
    msg["To"] = to
    set_subject(msg, notice.subject)  # folded as campaign subjects are, spaces kept
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=identity.domain)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(notice.text, subtype="plain", charset="utf-8")
    msg.add_alternative(notice.html, subtype="html", charset="utf-8")
    return msg


@dataclass(frozen=True)
class _Pending:
    subscriber_id: int
    email: str
    language: str
    list_ids: tuple[int, ...]
    list_names: tuple[str, ...]
    discreet: str = "off"


def _unsent_confirmations(session: Session, limit: int) -> list[_Pending]:
    """Subscribers with pending subscriptions whose confirmation email has not gone out."""
    owed = (
        Subscription.status == SubscriptionStatus.PENDING,
        Subscription.confirm_sent_at.is_(None),
        Subscriber.status != SubscriberStatus.FORGOTTEN,
    )
    # The batch's people are chosen in the database: reading every owed row for each batch of
    # `limit` made mailing N owed confirmations (a signup flood, an import) cost N * N rows.
    people_ids = (
        select(Subscriber.id)
        .join(Subscription, Subscription.subscriber_id == Subscriber.id)
        .where(*owed)
        .group_by(Subscriber.id)
        .order_by(Subscriber.id)
        .limit(limit)
    )
    rows = session.execute(
        select(
            Subscriber.id, Subscriber.email, Subscriber.language, Subscriber.discreet, MailingList
        )
        .join(Subscription, Subscription.subscriber_id == Subscriber.id)
        .join(MailingList, MailingList.id == Subscription.list_id)
        .where(*owed, Subscriber.id.in_(people_ids.scalar_subquery()))
        .order_by(Subscriber.id, MailingList.slug)
    ).all()
    people: dict[int, _Pending] = {}
    for sid, email, lang, discreet, ml in rows:
        if sid not in people and len(people) >= limit:
            break
        name = ml.names.get(lang) or ml.name
        was = people.get(sid) or _Pending(sid, email, lang, (), (), discreet)
        people[sid] = dataclasses.replace(
            was, list_ids=(*was.list_ids, ml.id), list_names=(*was.list_names, name)
        )
    return list(people.values())


def confirmation_message(pending: _Pending, *, settings: Settings, now: datetime) -> EmailMessage:
    """One confirmation email naming every list that waits for this person's click."""
    token = make_token(
        secret=settings.security.require_secret(),
        purpose="confirm",
        subscriber_id=pending.subscriber_id,
        list_id=pending.list_ids[0],
        issued_at=now,
    )
    identity = identity_for(settings, pending.discreet)
    url = page_url(identity.links_base, "confirm", token)
    discreet = identity.discreet is not None
    notice = render_notice(
        "confirm",
        lang=pending.language,
        settings=settings,
        discreet=discreet,
        lists=() if discreet else pending.list_names,  # list names say what the mail is about
        confirm_url=url,
        max_age_hours=settings.web.confirm_link_max_age_hours,
    )
    return build_notice(notice, to=pending.email, settings=settings, now=now, identity=identity)


@dataclass
class NoticeLease:
    """The "notices" lease: one process at a time mails confirmations and key messages.

    Each process (a second `newsletter run`, `newsletter web`, a `subscribers add`) reads what
    is owed, sends it, then marks it: two at once would both send all of it. The lease is
    renewed before each message once a third of it has gone, and lasts long enough for one
    message however slow the relay, so it never runs out while its holder is mid-send; if the
    holder dies, another process takes over once it runs out.
    """

    factory: sessionmaker[Session]
    clock: Clock
    seconds: int
    holder: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    )
    _renewed: float = -1.0  # time.monotonic() of the last renewal; < 0: not held

    @classmethod
    def for_settings(
        cls, factory: sessionmaker[Session], settings: Settings, clock: Clock
    ) -> NoticeLease:
        """A lease longer than the slowest message (each of its SMTP replies may time out)."""
        per_message = int(settings.smtp.timeout_seconds * 10)
        return cls(factory, clock, max(settings.schedule.lock_seconds, per_message))

    def hold(self) -> bool:
        """Take or renew the lease; False when another process holds it."""
        if self._renewed >= 0 and time.monotonic() - self._renewed < self.seconds / 3:
            return True
        with unit_of_work(self.factory) as session:
            held = acquire_lock(
                session,
                name=LEASE_NAME,
                holder=self.holder,
                now=self.clock.now(),
                seconds=self.seconds,
            )
        self._renewed = time.monotonic() if held else -1.0
        return held

    def release(self) -> None:
        """Give the lease back, so that the next round of any process goes ahead at once."""
        if self._renewed >= 0:
            with unit_of_work(self.factory) as session:
                release_lock(session, name=LEASE_NAME, holder=self.holder)
            self._renewed = -1.0


async def send_confirmations(
    *, factory: sessionmaker[Session], settings: Settings, transport: Transport, clock: Clock
) -> tuple[int, int]:
    """Send every confirmation email and key message still owed; returns (sent, not sent yet).

    A confirmation is marked sent once the SMTP server accepts it or refuses it for good; a
    temporary failure leaves it owed, for the next run. While another process mails notices
    (it holds the lease), this one sends nothing: (0, 0).
    """
    lease = NoticeLease.for_settings(factory, settings, clock)
    if not await asyncio.to_thread(lease.hold):
        return 0, 0
    try:
        sent, failed = await _send_confirmations(
            factory=factory, settings=settings, transport=transport, clock=clock, hold=lease.hold
        )
        # Imported here: key_notices builds its messages with this module's render/build_notice.
        from newsletter.key_notices import send_key_notices

        key_sent, key_failed = await send_key_notices(
            factory=factory, settings=settings, transport=transport, clock=clock, hold=lease.hold
        )
    finally:
        await asyncio.to_thread(lease.release)
    return sent + key_sent, failed + key_failed


async def _send_confirmations(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    transport: Transport,
    clock: Clock,
    hold: Callable[[], bool],
) -> tuple[int, int]:
    """The confirmations, in batches, while the lease holds.

    The database, the rendering (MJML, premailer) and the DKIM signature run in a worker thread:
    on the event loop that serves the pages they would slow the requests next to a signup that
    owed a confirmation, and tell a stranger that the address was new.
    """
    sent = failed = 0
    dkim = await asyncio.to_thread(IdentitySigners.load, settings)

    def read() -> list[_Pending]:
        with unit_of_work(factory) as session:
            return _unsent_confirmations(session, BATCH)

    def prepare(pending: _Pending) -> tuple[bytes, str] | None:
        """The signed message and its envelope sender; None when the lease was lost."""
        if not hold():  # another process took over: what it reads, it sends
            return None
        msg = confirmation_message(pending, settings=settings, now=clock.now())
        identity = identity_for(settings, pending.discreet)
        return dkim.sign(
            msg.as_bytes(), discreet=identity.discreet is not None
        ), identity.from_address

    def mark(done: list[int]) -> None:
        with unit_of_work(factory) as session:
            _mark_sent(session, done, clock.now())

    while True:
        batch = await asyncio.to_thread(read)
        done: list[int] = []
        lost = False
        for pending in batch:
            prepared = await asyncio.to_thread(prepare, pending)
            if prepared is None:
                lost = True
                break
            message, sender = prepared
            outcome = await transport.send(message, sender=sender, recipient=pending.email)
            if outcome.result is Result.SENT:
                sent += 1
            else:
                failed += 1
            if outcome.result is not Result.TEMPORARY:
                done.append(pending.subscriber_id)
        await asyncio.to_thread(mark, done)
        if lost or len(done) < len(batch) or not batch:
            return sent, failed


def _mark_sent(session: Session, subscriber_ids: list[int], now: datetime) -> None:
    if subscriber_ids:
        session.execute(
            update(Subscription)
            .where(
                Subscription.subscriber_id.in_(subscriber_ids),
                Subscription.status == SubscriptionStatus.PENDING,
                Subscription.confirm_sent_at.is_(None),
            )
            .values(confirm_sent_at=now)
        )


async def send_goodbye(
    *,
    email: str,
    lang: str,
    reason: str,
    settings: Settings,
    transport: Transport,
    now: datetime,
    discreet: str = "off",
) -> bool:
    """Tell someone they will get nothing more ("unsubscribed") or were erased ("forgotten").

    A discreet reader gets no goodbye, whatever the caller asked: a last email naming us is the
    one thing their inbox must not show.
    """
    if discreet not in ("", "off"):
        return False
    notice = render_notice("goodbye", lang=lang, settings=settings, reason=reason)
    msg = build_notice(notice, to=email, settings=settings, now=now)
    message = IdentitySigners.load(settings).sign(msg.as_bytes(), discreet=False)
    outcome = await transport.send(message, sender=settings.mail.from_address, recipient=email)
    return outcome.result is Result.SENT
