"""The mail a reader's encryption key calls for: its proof, its problems, its coming expiry.

- A pending key gets one message encrypted to it with the activation link: only someone who can
  decrypt it can turn encryption on (nobody can make another person's mail unreadable).
- A key problem found at send time (key_notices rows, one per reader, key and problem) gets one
  neutral plaintext notice, never one per campaign. Whoever reads it in transit or in the
  mailbox holds its link, so the link is not the preferences page (where plain mail, no key or
  no discreet envelope can be chosen) but its own /new-key/ page, which only takes a new key
  (pending its proof) and works for tokens.KEY_UPDATE_MAX_AGE_DAYS.
- An active key that expires within [openpgp] expiry_reminder_days gets one encrypted reminder.

Each is owed in the database until the SMTP server accepts it or refuses it for good, so a
temporary failure leaves it for the next run and a crash never sends one twice in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    KeyNotice,
    KeyProblemChoice,
    KeyStatus,
    ReaderKey,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
)
from newsletter.dkim import IdentitySigners
from newsletter.errors import PermanentDeliveryError
from newsletter.i18n import N_, gettext_for
from newsletter.message import identity_for
from newsletter.notices import build_notice, render_notice
from newsletter.openpgp import (
    OBSCURED_SUBJECT,
    KeyProblem,
    Signer,
    encrypt_message,
    load_signing_key,
)
from newsletter.smtp import Result, Transport
from newsletter.tokens import (
    KEY_UPDATE_MAX_AGE_DAYS,
    make_key_token,
    make_key_update_token,
    make_token,
    page_url,
)

log = logging.getLogger("newsletter.key_notices")

BATCH = 100
# What a problem code means to the reader, in their language (the web domain).
PROBLEMS = {
    "expired": N_("Your encryption key has expired."),
    "revoked": N_("Your encryption key has been revoked."),
    "removed": N_("Your encryption key was removed."),
    "no_encryption": N_("Your encryption key has no part that can encrypt any more."),
    "wrong_address": N_("Your encryption key is not for this email address."),
}
UNUSABLE = N_("Your encryption key cannot be used any more.")


@dataclass(frozen=True)
class Owed:
    """One key message owed to one reader."""

    kind: str  # key_confirm | key_problem | key_expiry
    row_id: int  # the ReaderKey (confirm, expiry) or KeyNotice (problem) it answers
    subscriber_id: int
    email: str
    language: str
    discreet: str
    armored: str  # the key to encrypt to ("" for a problem notice: sent plain)
    fingerprint: str
    problem: str = ""
    withheld: bool = True
    expires_at: datetime | None = None


_READER = (Subscriber.id, Subscriber.email, Subscriber.language, Subscriber.discreet)


def owed_key_messages(session: Session, *, now: datetime, days: int, limit: int) -> list[Owed]:
    """Up to `limit` key messages still owed: proofs, problem notices, expiry reminders."""
    # Only someone who still gets a list gets key mail: after leaving every list, nothing.
    receiving = (
        select(Subscription.id)
        .where(
            Subscription.subscriber_id == Subscriber.id,
            Subscription.status == SubscriptionStatus.ACTIVE,
        )
        .exists()
    )
    live = (Subscriber.status == SubscriberStatus.ACTIVE) & receiving
    out: list[Owed] = []
    proofs = session.execute(
        select(ReaderKey, *_READER)
        .join(Subscriber, Subscriber.id == ReaderKey.subscriber_id)
        .where(ReaderKey.status == KeyStatus.PENDING, ReaderKey.confirm_sent_at.is_(None), live)
        .order_by(ReaderKey.id)
        .limit(limit)
    ).all()
    for key, sid, email, lang, discreet in proofs:
        out.append(
            Owed("key_confirm", key.id, sid, email, lang, discreet, key.armored, key.fingerprint)
        )
    problems = session.execute(
        select(KeyNotice, Subscriber.on_key_problem, *_READER)
        .join(Subscriber, Subscriber.id == KeyNotice.subscriber_id)
        .where(KeyNotice.sent_at.is_(None), live)
        .order_by(KeyNotice.id)
        .limit(limit)
    ).all()
    for notice, choice, sid, email, lang, discreet in problems:
        withheld = choice != KeyProblemChoice.PLAIN
        out.append(
            Owed(
                "key_problem",
                notice.id,
                sid,
                email,
                lang,
                discreet,
                "",
                notice.fingerprint,
                notice.problem,
                withheld,
            )
        )
    if days > 0:
        soon = session.execute(
            select(ReaderKey, *_READER)
            .join(Subscriber, Subscriber.id == ReaderKey.subscriber_id)
            .where(
                ReaderKey.status == KeyStatus.ACTIVE,
                ReaderKey.reminded_at.is_(None),
                ReaderKey.expires_at.is_not(None),
                ReaderKey.expires_at > now,
                ReaderKey.expires_at <= now + timedelta(days=days),
                live,
            )
            .order_by(ReaderKey.id)
            .limit(limit)
        ).all()
        for key, sid, email, lang, discreet in soon:
            out.append(
                Owed(
                    "key_expiry",
                    key.id,
                    sid,
                    email,
                    lang,
                    discreet,
                    key.armored,
                    key.fingerprint,
                    expires_at=key.expires_at,
                )
            )
    return out


def _preferences_url(session: Session, owed: Owed, base: str, secret: str) -> str:
    """The reader's preferences page (a token names a list: their first one). Only for a message
    encrypted to their key: this link can turn encryption and the discreet envelope off."""
    list_id = session.scalar(
        select(Subscription.list_id)
        .where(Subscription.subscriber_id == owed.subscriber_id)
        .order_by(Subscription.list_id)
        .limit(1)
    )
    token = make_token(
        secret=secret, purpose="preferences", subscriber_id=owed.subscriber_id, list_id=list_id or 0
    )
    return page_url(base, "preferences", token)


def key_message(
    session: Session, owed: Owed, *, settings: Settings, signer: Signer | None, now: datetime
) -> bytes:
    """The message for one owed key notice, encrypted to the key when it is a proof or reminder."""
    identity = identity_for(settings, owed.discreet)
    secret = settings.security.require_secret()
    discreet = identity.discreet is not None
    lang = owed.language
    if owed.kind == "key_confirm":
        token = make_key_token(
            secret=secret,
            subscriber_id=owed.subscriber_id,
            fingerprint=owed.fingerprint,
            issued_at=now,
        )
        context = {
            "url": page_url(identity.links_base, "key", token),
            "fingerprint": owed.fingerprint,
            "max_age_hours": settings.web.confirm_link_max_age_hours,
        }
    elif owed.kind == "key_problem":  # plain: a link that takes a new key and nothing else
        _ = gettext_for(lang)
        token = make_key_update_token(
            secret=secret,
            subscriber_id=owed.subscriber_id,
            fingerprint=owed.fingerprint,
            issued_at=now,
        )
        context = {
            "url": page_url(identity.links_base, "key_update", token),
            "problem": _(PROBLEMS.get(owed.problem, UNUSABLE)),
            "withheld": owed.withheld,
            "max_age_days": KEY_UPDATE_MAX_AGE_DAYS,
        }
    else:
        expires = owed.expires_at or now
        context = {
            "url": _preferences_url(session, owed, identity.links_base, secret),
            "expires_on": expires.date().isoformat(),
        }
    notice = render_notice(owed.kind, lang=lang, settings=settings, discreet=discreet, **context)
    message = build_notice(
        notice, to=owed.email, settings=settings, now=now, identity=identity
    ).as_bytes()
    if not owed.armored:
        return message
    return encrypt_message(
        message,
        armored_key=owed.armored,
        signer=signer,
        outer_subject=identity.subject(OBSCURED_SUBJECT, lang),
        autocrypt=not discreet,
    )


def _mark(session: Session, owed: list[Owed], now: datetime) -> None:
    """Owed messages answered (sent, or refused for good): not sent again."""
    for kind, table, column in (
        ("key_confirm", ReaderKey, "confirm_sent_at"),
        ("key_expiry", ReaderKey, "reminded_at"),
        ("key_problem", KeyNotice, "sent_at"),
    ):
        ids = [o.row_id for o in owed if o.kind == kind]
        if ids:
            session.execute(update(table).where(table.id.in_(ids)).values({column: now}))


async def send_key_notices(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    transport: Transport,
    clock: Clock,
    hold: Callable[[], bool] = lambda: True,
) -> tuple[int, int]:
    """Send every key message owed, in batches; returns (sent, not sent yet or refused).

    `hold` renews the notices lease (notices.NoticeLease) before each message: once it says
    another process holds it, nothing more is sent here.
    """
    signer = load_signing_key(settings.openpgp.signing_key_file)
    dkim = IdentitySigners.load(settings)
    days = settings.openpgp.expiry_reminder_days
    sent = failed = 0
    while True:
        now = clock.now()
        with unit_of_work(factory) as session:
            batch = owed_key_messages(session, now=now, days=days, limit=BATCH)
            messages = [_build(session, owed, settings, signer, now) for owed in batch]
        done: list[Owed] = []
        lost = False
        for owed, message in zip(batch, messages, strict=True):
            if not hold():  # another process took over: what it reads, it sends
                lost = True
                break
            if message is None:  # cannot be built (the key broke meanwhile): not owed any more
                done.append(owed)
                continue
            identity = identity_for(settings, owed.discreet)
            message = dkim.sign(message, discreet=identity.discreet is not None)
            outcome = await transport.send(
                message, sender=identity.from_address, recipient=owed.email
            )
            sent += outcome.result is Result.SENT
            failed += outcome.result is not Result.SENT
            if outcome.result is not Result.TEMPORARY:
                done.append(owed)
        with unit_of_work(factory) as session:
            _mark(session, done, clock.now())
        if lost or len(done) < len(batch) or not batch:
            return sent, failed


def _build(
    session: Session, owed: Owed, settings: Settings, signer: Signer | None, now: datetime
) -> bytes | None:
    try:
        return key_message(session, owed, settings=settings, signer=signer, now=now)
    except (KeyProblem, PermanentDeliveryError) as error:  # e.g. a key expired before its proof
        # Only what this reader's message cannot be (it is then owed no more); our own setup's
        # errors (a signing key that cannot sign, ConfigError) go up, and the message stays owed.
        # The code, not the message: a key's refusal may name the reader's address.
        why = error.code if isinstance(error, KeyProblem) else type(error).__name__
        log.warning(
            "key message %s for subscriber %d not sent: %s", owed.kind, owed.subscriber_id, why
        )
        return None
