"""Signing up on the web: the form's ticket, the checks a post must pass, and the signup itself.

The layers, in the order a post meets them (web.py runs them):

1. the Origin: our own pages, a mirror, or one of [web] signup_origins;
2. per client address at most [web] signups_per_hour signups (throttle.py, in the database),
   counting only posts that passed every other check with a fresh ticket;
3. a honeypot field people never see: filled, nothing is done (and the usual page is shown);
4. the ticket: signed (itsdangerous), dated, and good for one post (used_challenges);
5. the fill time: at least [web] signup_min_seconds after the form was served, or
   signup_noscript_seconds for a post without proof of work (a browser without script);
6. the proof of work (proof_of_work.py), when one is sent: a wrong answer is refused.

What passes is request_signup(): nothing is subscribed before the confirmation link is clicked,
and the poster learns nothing about the address (the answer is the same page for a new address,
a subscribed, unsubscribed, bounced or forgotten one). The confirmation email is not sent here but
queued (a pending subscription without confirm_sent_at) for notices.send_confirmations, so the
request takes the same time whatever the address; and one address gets at most one confirmation
per [web] confirm_resend_hours (confirmation_marks keeps a keyed hash of it that long, no more),
counted by inbox (inbox()): tagged and dotted forms of one mailbox, and a provider's other
domains (Yandex's), share that one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import and_, delete, exists, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from newsletter import throttle
from newsletter.addresses import address_forms
from newsletter.audit import record_event
from newsletter.config import Settings, WebSettings
from newsletter.db.models import (
    ConfirmationMark,
    Delivery,
    DiscreetMode,
    MailingList,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
    UsedChallenge,
)
from newsletter.errors import AudienceError
from newsletter.proof_of_work import is_solved
from newsletter.suppression import KEPT_OUT_STATUSES, suppressed_forms

# A form left open longer than this is served again (its ticket is remembered this long).
TICKET_MAX_AGE_SECONDS = 24 * 3600
THROTTLE_WINDOW_SECONDS = 3600
# Owed confirmations go in rounds this many seconds apart (least, most), drawn at random each
# time (`newsletter web` and `newsletter run` alike): never right after a post, which would tell
# whoever posted that the address was owed one, i.e. not subscribed; random, not periodic, so a
# post cannot be timed just before a round; a reader waits at most a minute for the email (under
# `newsletter run`, a round that starts while a large delivery round runs waits for its end).
CONFIRM_DELAY_SECONDS = (5.0, 60.0)
_SALT = "newsletter.signup-form"


class Verdict(StrEnum):
    """What the checks made of a post (web.py answers each in its own way)."""

    ACCEPTED = "accepted"
    HONEYPOT = "honeypot"
    NO_TICKET = "no-ticket"  # a plain form posted from the portal: shown again, prefilled
    BAD_TICKET = "bad-ticket"  # forged or altered
    EXPIRED = "expired"
    TOO_FAST = "too-fast"
    BAD_PROOF = "bad-proof"
    REUSED = "reused"
    THROTTLED = "throttled"


@dataclass(frozen=True)
class Ticket:
    issued_at: int
    challenge: str


def issue_ticket(*, secret: str, now: datetime) -> str:
    """A fresh signed ticket for one form: when it was served, and a random challenge."""
    serializer = URLSafeSerializer(secret, salt=_SALT)
    return str(serializer.dumps([int(now.timestamp()), secrets.token_hex(16)]))


def read_ticket(token: str, *, secret: str) -> Ticket | None:
    """The ticket a form carried, or None when it is not one we signed."""
    try:
        value = URLSafeSerializer(secret, salt=_SALT).loads(token)
    except BadSignature:
        return None
    if not (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], int)
        and isinstance(value[1], str)
        and len(value[1]) == 32
    ):
        return None
    return Ticket(value[0], value[1])


def judge_form(
    *, token: str, answer: str, honeypot: str, secret: str, web: WebSettings, now: datetime
) -> tuple[Verdict, Ticket | None]:
    """The checks that need no database: honeypot, ticket, fill time, proof of work."""
    if honeypot:
        return Verdict.HONEYPOT, None
    if not token:
        return Verdict.NO_TICKET, None
    ticket = read_ticket(token, secret=secret)
    if ticket is None:
        return Verdict.BAD_TICKET, None
    age = now.timestamp() - ticket.issued_at
    if age > TICKET_MAX_AGE_SECONDS or age < -60:  # a minute of clock skew between processes
        return Verdict.EXPIRED, ticket
    wait = web.signup_min_seconds if answer else web.signup_noscript_seconds
    if age < wait:
        return Verdict.TOO_FAST, ticket
    if answer and not is_solved(token, answer, web.signup_pow_bits):
        return Verdict.BAD_PROOF, ticket
    return Verdict.ACCEPTED, ticket


def claim_ticket(session: Session, ticket: Ticket) -> bool:
    """Mark a ticket used; False when it was used before (one insert, safe under races)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    expires = datetime.fromtimestamp(ticket.issued_at + TICKET_MAX_AGE_SECONDS + 120, UTC)
    stmt = (
        insert(UsedChallenge)
        .values(challenge=ticket.challenge, expires_at=expires)
        .on_conflict_do_nothing(index_elements=[UsedChallenge.challenge])
        .returning(UsedChallenge.challenge)
    )
    return session.execute(stmt).first() is not None


# --- the client's limit ------------------------------------------------------------------------


def client_key(host: str) -> str:
    """What a client counts as: its address, an IPv6 one by its /64 (one line owns a /64)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _client_limit_key(client: str, settings: Settings) -> str:
    return throttle.limit_key("signup:client", client_key(client), secret=settings.security.secret)


def client_wait(session: Session, *, client: str, settings: Settings, now: datetime) -> int:
    """The seconds a client must wait before its next signup counts; 0 while under the limit."""
    return throttle.retry_after(
        session,
        key=_client_limit_key(client, settings),
        limit=settings.web.signups_per_hour,
        window_seconds=THROTTLE_WINDOW_SECONDS,
        now=now,
    )


def count_signup(session: Session, *, client: str, settings: Settings, now: datetime) -> None:
    """Count one signup against its client's hourly limit.

    Only a post that passed every check and used a fresh ticket is counted: junk posts (no
    ticket, a forged one, the honeypot, no proof of work) would otherwise use up the quota of an
    address many readers share (a Tor exit, a carrier's NAT) and lock them all out for an hour.
    """
    throttle.count_attempt(
        session,
        key=_client_limit_key(client, settings),
        window_seconds=THROTTLE_WINDOW_SECONDS,
        now=now,
    )


# --- the address and the signup ----------------------------------------------------------------


def parse_address(raw: str) -> str | None:
    """The address to mail, or None when it cannot be one (syntax only: no DNS from the web).

    CR, LF and every other control character are refused before email-validator sees the value
    (it would strip surrounding whitespace, newlines included); an IDN domain becomes its A-label.
    """
    if not raw or len(raw) > 320 or any(not c.isprintable() for c in raw):
        return None
    try:
        return address_forms(raw)[0]
    except AudienceError:
        return None


# Providers whose mailboxes ignore dots in the part before @ (and their other names).
_DOTLESS_DOMAINS = {"gmail.com": "gmail.com", "googlemail.com": "gmail.com"}
# Yandex: one mailbox under each of these names, and "-" in a login is the same as ".".
_YANDEX_DOMAINS = frozenset(
    {"yandex.ru", "ya.ru", "yandex.by", "yandex.com", "yandex.kz", "yandex.ua"}
)


def inbox(address: str) -> str:
    """The mailbox an address reaches, as far as confirmations are counted: without a +tag,
    without the dots a provider ignores, under one name for a provider's domains (so a+1@,
    a.b@gmail.com and a-b@ya.ru vs a.b@yandex.by are one person's inbox). Only for counting:
    mail still goes to the address as given."""
    local, _, domain = address.rpartition("@")
    local = local.split("+", 1)[0] or local
    if domain in _DOTLESS_DOMAINS:
        local, domain = local.replace(".", "") or local, _DOTLESS_DOMAINS[domain]
    elif domain in _YANDEX_DOMAINS:
        local, domain = local.replace("-", "."), "yandex.ru"
    return f"{local}@{domain}"


def mark_key(address: str, *, secret: str) -> str:
    """The keyed hash an address's inbox is remembered by in confirmation_marks."""
    message = f"confirmation-mark:{inbox(address)}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def request_signup(
    session: Session,
    *,
    address: str,
    language: str,
    list_slugs: Sequence[str],
    settings: Settings,
    now: datetime,
    discreet: bool = False,
) -> None:
    """Ask `address` to confirm the lists: pending subscriptions, the confirmation queued.

    The same steps run for every address, so the request takes comparable time whoever it names.
    Someone already on a list stays as they are (no second subscription, and a stranger cannot
    change their language); someone who left, bounced or was forgotten waits for a fresh click,
    as with `subscribers add`. At most one confirmation per address per confirm_resend_hours: a
    list added within that time waits for the link already sent, which confirms it too.
    `discreet` (asked for on the form) makes a discreet envelope the choice of someone on no list
    yet, so the confirmation itself names nothing; a stranger cannot change a member's choice.
    """
    secret = settings.security.require_secret()
    forms = address_forms(address)
    lists = list(session.scalars(select(MailingList).where(MailingList.slug.in_(list_slugs))))
    mark = session.get(ConfirmationMark, mark_key(forms[0], secret=secret))
    since = now - timedelta(hours=settings.web.confirm_resend_hours)
    recent = mark is not None and mark.sent_at > since
    sub = session.scalar(select(Subscriber).where(Subscriber.email.in_(forms)).limit(1))
    kept_out = bool(suppressed_forms(session, forms, secret=secret)) or (
        sub is not None and sub.status in KEPT_OUT_STATUSES
    )
    if sub is None:
        sub = Subscriber(
            email=forms[0],
            language=language,
            created_at=now,
            status=SubscriberStatus.ACTIVE,
            name="",
            country="",
            tags=[],
            attributes={},
        )
        session.add(sub)
        session.flush()
    if discreet and sub.discreet == DiscreetMode.OFF and not _on_any_list(session, sub.id):
        sub.discreet = DiscreetMode.ENVELOPE
    owed = False
    for ml in lists:
        owed = _ask(session, sub.id, ml.id, now, kept_out=kept_out, recent=recent) or owed
    if owed and not recent:
        if mark is None:
            session.add(ConfirmationMark(email_hash=mark_key(forms[0], secret=secret), sent_at=now))
        else:
            mark.sent_at = now
    record_event(
        session, now=now, actor="web", action="subscriber.signup", subscriber=sub.id, lists=owed
    )
    session.flush()


def _on_any_list(session: Session, subscriber_id: int) -> bool:
    """Whether someone receives any list now (their choices are then theirs to change)."""
    found = session.scalar(
        select(Subscription.id)
        .where(
            Subscription.subscriber_id == subscriber_id,
            Subscription.status == SubscriptionStatus.ACTIVE,
        )
        .limit(1)
    )
    return found is not None


def _ask(
    session: Session,
    subscriber_id: int,
    list_id: int,
    now: datetime,
    *,
    kept_out: bool,
    recent: bool,
) -> bool:
    """Make one list wait for the person's click; False when they are on it already."""
    row = session.scalar(
        select(Subscription).where(
            Subscription.subscriber_id == subscriber_id, Subscription.list_id == list_id
        )
    )
    if row is not None and row.status == SubscriptionStatus.ACTIVE and not kept_out:
        return False
    if row is None:
        row = Subscription(subscriber_id=subscriber_id, list_id=list_id, created_at=now)
        session.add(row)
    if row.status != SubscriptionStatus.PENDING:
        row.status, row.confirmed_at = SubscriptionStatus.PENDING, None
    # None: a confirmation is owed. Within confirm_resend_hours of the last one none is sent.
    row.confirm_sent_at = (row.confirm_sent_at or now) if recent else None
    return True


def purge_signups(session: Session, *, now: datetime, settings: Settings) -> int:
    """Forget what web signups leave behind once it is of no use; returns the people erased.

    Marks older than confirm_resend_hours and tickets past their age go. Someone who never
    confirmed (only pending lists, never mailed a campaign) is deleted once their link has
    expired (confirm_link_max_age_hours), so no address stays for a person who did not ask.
    """
    web = settings.web
    session.execute(
        delete(ConfirmationMark).where(
            ConfirmationMark.sent_at < now - timedelta(hours=web.confirm_resend_hours)
        )
    )
    session.execute(delete(UsedChallenge).where(UsedChallenge.expires_at < now))
    cutoff = now - timedelta(hours=web.confirm_link_max_age_hours)
    mine = Subscription.subscriber_id == Subscriber.id
    fresh = or_(Subscription.confirm_sent_at.is_(None), Subscription.confirm_sent_at >= cutoff)
    ids = list(
        session.scalars(
            select(Subscriber.id).where(
                Subscriber.status == SubscriberStatus.ACTIVE,
                Subscriber.created_at < cutoff,
                exists().where(mine),
                ~exists().where(mine, Subscription.status != SubscriptionStatus.PENDING),
                ~exists().where(and_(mine, Subscription.created_at >= cutoff)),
                ~exists().where(mine, fresh),
                ~exists().where(Delivery.subscriber_id == Subscriber.id),
            )
        )
    )
    if ids:
        session.execute(delete(Subscription).where(Subscription.subscriber_id.in_(ids)))
        session.execute(delete(Subscriber).where(Subscriber.id.in_(ids)))
        record_event(
            session, now=now, actor="web", action="subscriber.signup_expired", count=len(ids)
        )
    return len(ids)
