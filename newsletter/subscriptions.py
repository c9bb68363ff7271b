"""A subscriber's life: subscribe, confirm, unsubscribe, preferences, forget.

Shared by the command line, the web pages and the inbound mail handler. Every function takes a
Session and never commits; the caller owns the transaction. Every change leaves an event naming
the subscriber by id, never by address. Each web page action is one step here (link_view,
unsubscribe_by_link, save_preferences, confirm_by_link), run in one transaction per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from newsletter.addresses import address_forms, lookup_forms
from newsletter.audit import record_event
from newsletter.config import LANGUAGES
from newsletter.db.models import (
    Delivery,
    DiscreetMode,
    KeyProblemChoice,
    MailingList,
    Subscriber,
    SubscriberStatus,
    Subscription,
    SubscriptionStatus,
)
from newsletter.db.queries import fold_letters
from newsletter.errors import AudienceError, KeptOutError, TokenError
from newsletter.readers import (
    forget_keys,
    key_view,
    parse_discreet,
    parse_key_problem,
    set_reading,
)
from newsletter.sanitize import control_character
from newsletter.suppression import (
    KEPT_OUT_STATUSES,
    lift_suppression,
    suppress,
    suppressed_forms,
)

LEFT = (SubscriptionStatus.UNSUBSCRIBED,)


@dataclass(frozen=True)
class SubscribeResult:
    subscriber_id: int
    active: tuple[str, ...]
    pending: tuple[str, ...]
    created: bool


@dataclass(frozen=True)
class Membership:
    list_id: int
    slug: str
    names: dict[str, str]
    kind: str
    status: str | None  # None: never subscribed

    def name(self, lang: str) -> str:
        """The list's name in a language, else in English, else its slug."""
        return self.names.get(lang) or self.names.get("en") or self.slug


@dataclass(frozen=True)
class LinkView:
    """What a page behind a signed link knows about the subscriber and list its token names."""

    subscriber_id: int
    language: str
    gone: bool  # forgotten, or never existed
    list_name: str
    lists: tuple[Membership, ...]

    def subscribed_to(self, list_id: int) -> bool:
        """Whether they are on a list, or waiting to confirm it."""
        status = next((m.status for m in self.lists if m.list_id == list_id), None)
        return status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.PENDING)

    @property
    def active(self) -> list[Membership]:
        """The lists they receive."""
        return [m for m in self.lists if m.status == SubscriptionStatus.ACTIVE]

    @property
    def waiting(self) -> list[Membership]:
        """The lists waiting for their confirmation."""
        return [m for m in self.lists if m.status == SubscriptionStatus.PENDING]


def _live_subscriber(session: Session, subscriber_id: int) -> Subscriber | None:
    """The subscriber with this id, or None when missing or forgotten (decided here only)."""
    sub = session.get(Subscriber, subscriber_id)
    return None if sub is None or sub.status == SubscriberStatus.FORGOTTEN else sub


def find_subscriber(session: Session, email: str) -> Subscriber:
    """The subscriber with this address (in any form it was stored under); the error does not
    repeat the address."""
    stmt = select(Subscriber).where(Subscriber.email.in_(lookup_forms(email))).limit(1)
    sub = session.scalar(stmt)
    if sub is None:
        raise AudienceError("no subscriber has that address")
    return sub


def subscriber_details(session: Session, email: str) -> dict[str, Any]:
    """One subscriber as `subscribers show` prints them: details, lists, emails sent so far."""
    sub = find_subscriber(session, email)
    sent = session.scalar(
        select(func.count()).where(Delivery.subscriber_id == sub.id, Delivery.sent_at.is_not(None))
    )
    return {
        "id": sub.id,
        "email": sub.email,
        "name": sub.name,
        "language": sub.language,
        "country": sub.country,
        "tags": sub.tags,
        "attributes": sub.attributes,
        "status": sub.status,
        "created_at": sub.created_at.isoformat(),
        "lists": {m.slug: m.status for m in memberships(session, sub.id) if m.status},
        "emails_sent": int(sent or 0),
        "discreet": sub.discreet,
        "on_key_problem": sub.on_key_problem,
        "key": _key_details(session, sub.id),
    }


def _key_details(session: Session, subscriber_id: int) -> dict[str, Any]:
    """The reader's keys as `subscribers show` tells them (JSON-ready)."""
    view = key_view(session, subscriber_id)
    expires = view.active_expires_at
    return {
        "active_fingerprint": view.active_fingerprint or None,
        "active_expires_at": expires.isoformat() if expires else None,
        "pending_fingerprint": view.pending_fingerprint or None,
        "removed_by_admin": view.removed,
        "revoked_fingerprint": view.revoked_fingerprint or None,
    }


def subscribe(
    *,
    session: Session,
    email: str,
    lists: Sequence[MailingList],
    secret: str,
    now: datetime,
    actor: str,
    confirmed: bool = False,
    name: str = "",
    language: str = "",
    country: str = "",
    tags: Sequence[str] = (),
    discreet: str | None = None,
    on_key_problem: str | None = None,
) -> SubscribeResult:
    """Add someone to lists; double opt-in lists wait for their click unless --confirmed.

    Someone who left, bounced or was forgotten needs a fresh confirmation whatever the flags:
    an admin cannot quietly bring them back. `discreet` and `on_key_problem`, when given, are
    set (for someone known too); None keeps theirs, or the defaults for someone new.
    """
    forms = address_forms(email)  # refuses what can never be delivered, says why
    address = forms[0]
    if language and language not in LANGUAGES:
        raise AudienceError(f"language must be one of {', '.join(LANGUAGES)}")
    if char := control_character(name):  # as import refuses it: an escape would drive terminals
        raise AudienceError(f"the name holds a control character ({char})")
    # Checked before anything is written, so a bad value adds no one.
    mode = parse_discreet(discreet) if discreet is not None else None
    choice = parse_key_problem(on_key_problem) if on_key_problem is not None else None
    sub = session.scalar(select(Subscriber).where(Subscriber.email.in_(forms)).limit(1))
    fresh = bool(suppressed_forms(session, forms, secret=secret)) or (
        sub is not None and sub.status in KEPT_OUT_STATUSES
    )
    created = sub is None
    if sub is None:
        sub = Subscriber(
            email=address, created_at=now, status=SubscriberStatus.ACTIVE, tags=[], attributes={}
        )
        session.add(sub)
    sub.email = address  # one stored in an older form becomes deliverable
    sub.name = " ".join(name.split())[:200] or sub.name or ""
    sub.language = language or sub.language or "en"
    sub.country = country.upper()[:2] or sub.country or ""
    sub.tags = sorted(set(sub.tags or []) | set(tags))
    session.flush()
    if mode is not None or choice is not None:
        set_reading(
            session,
            subscriber_id=sub.id,
            discreet=mode,
            on_key_problem=choice,
            now=now,
            actor=actor,
        )
    active: list[str] = []
    pending: list[str] = []
    for ml in lists:
        state = _join(session, sub.id, ml, now, confirmed=confirmed, fresh=fresh)
        (active if state == SubscriptionStatus.ACTIVE else pending).append(ml.slug)
    record_event(
        session,
        now=now,
        actor=actor,
        action="subscriber.added",
        subscriber=sub.id,
        active=active,
        pending=pending,
    )
    return SubscribeResult(sub.id, tuple(active), tuple(pending), created)


def _join(
    session: Session,
    subscriber_id: int,
    ml: MailingList,
    now: datetime,
    *,
    confirmed: bool,
    fresh: bool,
) -> str:
    """Subscribe to one list; returns the subscription's status afterwards.

    `fresh`: the address left, bounced or was forgotten, so only their own click on a new
    confirmation link (never a flag, never a list without double opt-in) puts them back.
    """
    row = session.scalar(
        select(Subscription).where(
            Subscription.subscriber_id == subscriber_id, Subscription.list_id == ml.id
        )
    )
    if row is not None and row.status == SubscriptionStatus.ACTIVE and not fresh:
        return row.status
    left_before = row is not None and row.status in LEFT
    direct = (confirmed or not ml.double_opt_in) and not left_before and not fresh
    if row is None:
        row = Subscription(subscriber_id=subscriber_id, list_id=ml.id, created_at=now)
        session.add(row)
    row.status = SubscriptionStatus.ACTIVE if direct else SubscriptionStatus.PENDING
    row.confirmed_at = now if direct else None
    row.confirm_sent_at = None  # asked again: a new confirmation email goes out
    session.flush()
    return row.status


def memberships(session: Session, subscriber_id: int) -> list[Membership]:
    """Every list, with this subscriber's status on it (None where never subscribed)."""
    rows = session.execute(
        select(Subscription.list_id, Subscription.status).where(
            Subscription.subscriber_id == subscriber_id
        )
    )
    status = {list_id: value for list_id, value in rows}
    return [
        Membership(ml.id, ml.slug, dict(ml.names or {}), ml.kind, status.get(ml.id))
        for ml in session.scalars(select(MailingList).order_by(MailingList.kind, MailingList.slug))
    ]


def confirm(*, session: Session, subscriber_id: int, secret: str, now: datetime) -> list[str]:
    """Confirm every pending subscription of a subscriber; returns the lists now active.

    A fresh confirmation also lifts the address's suppression: the person asked again.
    """
    sub = _live_subscriber(session, subscriber_id)
    if sub is None:
        return []
    pending = list(
        session.scalars(
            select(Subscription).where(
                Subscription.subscriber_id == subscriber_id,
                Subscription.status == SubscriptionStatus.PENDING,
            )
        )
    )
    for row in pending:
        row.status, row.confirmed_at, row.unsubscribed_at = SubscriptionStatus.ACTIVE, now, None
    if pending:
        sub.status = SubscriberStatus.ACTIVE
        lift_suppression(session, sub.email, secret=secret)
        record_event(
            session,
            now=now,
            actor="web",
            action="subscriber.confirmed",
            subscriber=sub.id,
            lists=len(pending),
        )
    session.flush()
    return [m.slug for m in memberships(session, sub.id) if m.status == SubscriptionStatus.ACTIVE]


def unsubscribe(
    *, session: Session, subscriber_id: int, list_id: int | None, now: datetime, actor: str
) -> bool:
    """Leave one list (or, with list_id None, everything); repeating it is harmless.

    Returns whether anything changed. The sender re-checks at claim time, so this holds for
    every message not yet sent, including a campaign that is sending right now.
    """
    stmt = (
        update(Subscription)
        .where(
            Subscription.subscriber_id == subscriber_id,
            Subscription.status != SubscriptionStatus.UNSUBSCRIBED,
        )
        .values(status=SubscriptionStatus.UNSUBSCRIBED, unsubscribed_at=now)
        .execution_options(synchronize_session=False)
    )
    if list_id is not None:
        stmt = stmt.where(Subscription.list_id == list_id)
    changed = _rowcount(session.execute(stmt)) > 0
    if list_id is None:
        result = session.execute(
            update(Subscriber)
            .where(Subscriber.id == subscriber_id, Subscriber.status == SubscriberStatus.ACTIVE)
            .values(status=SubscriberStatus.UNSUBSCRIBED)
            .execution_options(synchronize_session=False)
        )
        changed = changed or _rowcount(result) > 0
    if changed:
        record_event(
            session,
            now=now,
            actor=actor,
            action="subscriber.unsubscribed",
            subscriber=subscriber_id,
            list=list_id,
        )
    session.expire_all()
    return changed


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


def set_preferences(
    *,
    session: Session,
    subscriber_id: int,
    list_ids: set[int],
    language: str,
    now: datetime,
    actor: str,
) -> bool:
    """Save what a subscriber chose: their lists and language. Returns whether anything changed.

    Ticking a list subscribes at once: the signed link came to their mailbox, which is the
    confirmation double opt-in asks for.
    """
    sub = _live_subscriber(session, subscriber_id)
    if sub is None:
        raise AudienceError("no such subscriber")
    if language not in LANGUAGES:
        raise AudienceError(f"language must be one of {', '.join(LANGUAGES)}")
    rejoining = [
        m
        for m in memberships(session, subscriber_id)
        if m.list_id in list_ids and m.status != SubscriptionStatus.ACTIVE
    ]
    if rejoining and sub.status == SubscriberStatus.BOUNCED:
        # Their mailbox refused our mail for good: an old link is no proof it takes mail again.
        raise KeptOutError("mail to this address bounced; sign up again to confirm it works")
    changed = sub.language != language
    sub.language = language
    known = memberships(session, subscriber_id)
    for m in known:
        wanted = m.list_id in list_ids
        if wanted and m.status != SubscriptionStatus.ACTIVE:
            _activate(session, subscriber_id, m.list_id, now)
            sub.status = SubscriberStatus.ACTIVE
            changed = True
        elif not wanted and m.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.PENDING):
            unsubscribe(
                session=session,
                subscriber_id=subscriber_id,
                list_id=m.list_id,
                now=now,
                actor=actor,
            )
            changed = True
    if changed:
        record_event(
            session,
            now=now,
            actor=actor,
            action="subscriber.preferences",
            subscriber=subscriber_id,
            # The lists that exist: a form's other numbers (any length) are not worth keeping.
            lists=sorted(m.list_id for m in known if m.list_id in list_ids),
            language=language,
        )
    session.flush()
    return changed


def _activate(session: Session, subscriber_id: int, list_id: int, now: datetime) -> None:
    row = session.scalar(
        select(Subscription).where(
            Subscription.subscriber_id == subscriber_id, Subscription.list_id == list_id
        )
    )
    if row is None:
        row = Subscription(subscriber_id=subscriber_id, list_id=list_id, created_at=now)
        session.add(row)
    row.status, row.confirmed_at, row.unsubscribed_at = SubscriptionStatus.ACTIVE, now, None
    session.flush()


# --- the web pages: one step per page action ------------------------------------------------


def link_view(
    session: Session, *, subscriber_id: int, list_id: int, allow_gone: bool = False
) -> LinkView:
    """The subscriber and list a link names; a link to someone gone is invalid unless allowed.

    A list that no longer exists makes the link invalid (TokenError) in every case.
    """
    ml = session.get(MailingList, list_id)
    if ml is None:
        raise TokenError("this link is not valid")
    sub = _live_subscriber(session, subscriber_id)
    if sub is None:
        if not allow_gone:
            raise TokenError("this link is not valid")
        return LinkView(subscriber_id, "en", True, ml.name, ())
    lang = sub.language if sub.language in LANGUAGES else "en"
    name = (ml.names or {}).get(lang) or ml.name
    return LinkView(sub.id, lang, False, name, tuple(memberships(session, sub.id)))


def unsubscribe_by_link(
    session: Session, *, subscriber_id: int, list_id: int, now: datetime
) -> LinkView:
    """Leave the list an unsubscribe link names (nothing to do for someone gone)."""
    view = link_view(session, subscriber_id=subscriber_id, list_id=list_id, allow_gone=True)
    if not view.gone:
        unsubscribe(
            session=session, subscriber_id=subscriber_id, list_id=list_id, now=now, actor="web"
        )
    return view


def save_preferences(
    session: Session,
    *,
    subscriber_id: int,
    list_ids: set[int],
    language: str,
    leave: bool,
    now: datetime,
) -> None:
    """Save the preferences form: the lists and language chosen, or leaving everything."""
    if _live_subscriber(session, subscriber_id) is None:
        raise TokenError("this link is not valid")
    if leave:
        unsubscribe(
            session=session, subscriber_id=subscriber_id, list_id=None, now=now, actor="web"
        )
        return
    set_preferences(
        session=session,
        subscriber_id=subscriber_id,
        list_ids=list_ids,
        language=language,
        now=now,
        actor="web",
    )


def confirm_by_link(
    session: Session, *, subscriber_id: int, list_id: int, secret: str, now: datetime
) -> LinkView:
    """Confirm every list waiting for the subscriber a confirmation link names."""
    confirm(session=session, subscriber_id=subscriber_id, secret=secret, now=now)
    return link_view(session, subscriber_id=subscriber_id, list_id=list_id)


def forget(*, session: Session, email: str, secret: str, now: datetime, actor: str) -> bool:
    """Erase a person and keep only a keyed hash of the address, so nothing reaches them again.

    The subscriber row stays as an empty tombstone (status forgotten, no address, name, tags,
    attributes, keys, key notices, reading choices, subscriptions or delivery history) so that
    its id, which links already sent name, is never given to someone else. Returns whether the
    person was in the database; the hash is kept either way.
    """
    forms = lookup_forms(email)  # also someone stored in a form no longer accepted
    suppress(session, email, secret=secret, reason="forgotten", now=now)
    # Locked first: a reader's "I wrote" click in flight (cases.record_wrote) waits, or is seen.
    found = select(Subscriber).where(Subscriber.email.in_(forms)).limit(1)
    sub = session.scalar(found.with_for_update())
    if sub is not None:
        session.execute(delete(Subscription).where(Subscription.subscriber_id == sub.id))
        session.execute(delete(Delivery).where(Delivery.subscriber_id == sub.id))
        fold_letters(session, sub.id)  # "I wrote" of a case: counted, no longer theirs
        sub.email = f"{sub.id}@forgotten.invalid"
        sub.name, sub.country, sub.language = "", "", "en"
        sub.tags, sub.attributes = [], {}
        forget_keys(session, sub.id)
        sub.discreet, sub.on_key_problem = DiscreetMode.OFF, KeyProblemChoice.WITHHOLD
        sub.status = SubscriberStatus.FORGOTTEN
    record_event(
        session,
        now=now,
        actor=actor,
        action="subscriber.forgotten",
        subscriber=sub.id if sub else None,
    )
    session.flush()
    return sub is not None
