"""Readers at risk: the discreet envelope and OpenPGP keys, as a reader or an admin sets them.

The audit events name no key: a fingerprint leads to a name and an address on a keyserver, and
the audit trail outlives `subscribers forget` (it is append-only).

A key someone gives is pending until the reader follows the link that arrives encrypted to it
(so nobody can set a key for someone else and make their mail unreadable); `confirmed=True` is an
admin's word that the key was verified another way. An active key stays in use while a new one
waits. An admin's `--remove` marks the key removed (the reader's `on_key_problem` then decides);
a reader who removes their own key on the preferences page chose plain mail, and the key is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from newsletter.audit import record_event
from newsletter.db.models import (
    DiscreetMode,
    KeyNotice,
    KeyProblemChoice,
    KeyStatus,
    ReaderKey,
    Subscriber,
    SubscriberStatus,
)
from newsletter.db.queries import fold_letters
from newsletter.errors import AudienceError, TokenError
from newsletter.i18n import N_
from newsletter.openpgp import KeyInfo, KeyProblem, read_key

DISCREET_MODES = tuple(m.value for m in DiscreetMode)
KEY_PROBLEM_CHOICES = tuple(c.value for c in KeyProblemChoice)


@dataclass(frozen=True)
class KeyView:
    """What a reader's preferences page and `subscribers show` tell of their keys."""

    active_fingerprint: str = ""
    active_expires_at: datetime | None = None
    pending_fingerprint: str = ""
    removed: bool = False  # an admin took the active key off; nothing newer is active
    revoked_fingerprint: str = ""  # the reader gave us the active key's revocation


def _subscriber(session: Session, subscriber_id: int) -> Subscriber:
    """The reader, their row locked first for the rest of the transaction.

    Two changes to one reader's keys at once (a double click on "Save" or on the activation
    button, two tabs, the page and the CLI) each read the key rows and then replaced them: the
    second failed on the one row per (reader, status), or updated a row the first had deleted,
    and the reader got a 500. Locked, the second waits for the first and sees what it did. A
    write that changes nothing takes the lock on SQLite (which has no FOR UPDATE) and PostgreSQL.
    """
    session.execute(
        update(Subscriber)
        .where(Subscriber.id == subscriber_id)
        .values(discreet=Subscriber.discreet)
        .execution_options(synchronize_session=False)
    )
    sub = session.get(Subscriber, subscriber_id)
    if sub is None or sub.status == SubscriberStatus.FORGOTTEN:
        raise AudienceError("no such subscriber")
    return sub


def parse_discreet(value: str) -> str:
    """A discreet mode from outside text (CLI, CSV, form); a one-line refusal otherwise."""
    return _one_of(value, "discreet", DISCREET_MODES, DiscreetMode.OFF)


def parse_key_problem(value: str) -> str:
    """An on_key_problem choice from outside text; a one-line refusal otherwise."""
    return _one_of(value, "on_key_problem", KEY_PROBLEM_CHOICES, KeyProblemChoice.WITHHOLD)


def _one_of(value: str, name: str, allowed: tuple[str, ...], default: str) -> str:
    """One of the allowed words, case and spaces aside; empty means the default."""
    word = value.strip().lower() or str(default)
    if word not in allowed:
        raise AudienceError.of(
            N_("%(name)s must be one of %(allowed)s, not %(value)r"),
            name=name,
            allowed=", ".join(allowed),
            value=value[:40],
        )
    return word


def set_reading(
    session: Session,
    *,
    subscriber_id: int,
    discreet: str | None = None,
    on_key_problem: str | None = None,
    now: datetime,
    actor: str,
) -> bool:
    """Set a reader's discreet mode and/or key-problem choice; returns whether either changed."""
    sub = _subscriber(session, subscriber_id)
    changed = {}
    if discreet is not None and sub.discreet != (mode := parse_discreet(discreet)):
        sub.discreet = changed["discreet"] = mode
        if mode != DiscreetMode.OFF:  # nothing kept about them: their "I wrote", counted only
            fold_letters(session, sub.id)
    if on_key_problem is not None and sub.on_key_problem != (
        choice := parse_key_problem(on_key_problem)
    ):
        sub.on_key_problem = changed["on_key_problem"] = choice
    if changed:
        record_event(
            session, now=now, actor=actor, action="subscriber.reading", subscriber=sub.id, **changed
        )
        session.flush()
    return bool(changed)


def key_view(session: Session, subscriber_id: int) -> KeyView:
    """The reader's active, pending and removed keys, as the pages and the CLI show them."""
    rows = _keys_by_status(session, subscriber_id)
    active, pending = rows.get(KeyStatus.ACTIVE), rows.get(KeyStatus.PENDING)
    return KeyView(
        active_fingerprint=active.fingerprint if active else "",
        active_expires_at=active.expires_at if active else None,
        pending_fingerprint=pending.fingerprint if pending else "",
        removed=active is None and KeyStatus.REMOVED in rows,
        revoked_fingerprint=rows[KeyStatus.REVOKED].fingerprint
        if active is None and KeyStatus.REVOKED in rows
        else "",
    )


def _keys_by_status(session: Session, subscriber_id: int) -> dict[str, ReaderKey]:
    """A reader's key rows by status (at most one of each)."""
    rows = session.scalars(select(ReaderKey).where(ReaderKey.subscriber_id == subscriber_id))
    return {k.status: k for k in rows}


def set_key(
    session: Session,
    *,
    subscriber_id: int,
    data: bytes | str,
    now: datetime,
    actor: str,
    confirmed: bool = False,
) -> KeyInfo:
    """Check a public key for this reader and keep it: pending (owed a proof) or, confirmed, active.

    Raises openpgp.KeyProblem with a one-line reason when the key is refused. The reader's own
    key (active or pending) given again as revoked, or with no usable encryption subkey left, is
    not refused but learnt: that key is never used again (their on_key_problem applies), and
    the KeyInfo returned says `revoked`. Their active key given again in a newer form (a new
    subkey, a new expiry) replaces the stored one at once: the proof was for this key.
    """
    sub = _subscriber(session, subscriber_id)
    try:
        info = read_key(data, email=sub.email, now=now)
    except KeyProblem as problem:
        unusable = problem.code in ("revoked", "no_encryption")
        if unusable and _learn_revocation(session, sub.id, problem, now, actor):
            return KeyInfo(problem.fingerprint, None, (), problem.armored, revoked=True)
        raise
    active = _keys_by_status(session, sub.id).get(KeyStatus.ACTIVE)
    proven = now if confirmed else None
    if active is not None and active.fingerprint == info.fingerprint:
        confirmed, proven = True, active.confirmed_at or now  # the same key, newer: no new proof
    replaced = [KeyStatus.PENDING] + (list(SUPERSEDED) if confirmed else [])
    session.execute(
        delete(ReaderKey).where(ReaderKey.subscriber_id == sub.id, ReaderKey.status.in_(replaced))
    )
    session.add(key_row(sub.id, info, now=now, proven=proven))
    record_event(
        session,
        now=now,
        actor=actor,
        action="subscriber.key_set",
        subscriber=sub.id,
        confirmed=confirmed,
    )
    session.flush()
    return info


def key_row(
    subscriber_id: int, info: KeyInfo, *, now: datetime, proven: datetime | None
) -> ReaderKey:
    """A checked key as stored: active when proven (at `proven`), else pending its proof."""
    return ReaderKey(
        subscriber_id=subscriber_id,
        status=KeyStatus.ACTIVE if proven else KeyStatus.PENDING,
        fingerprint=info.fingerprint,
        armored=info.armored,
        expires_at=info.expires_at,
        recheck_at=info.recheck_at,
        created_at=now,
        confirmed_at=proven,
    )


def recheck_key(
    session: Session,
    *,
    subscriber_id: int,
    fingerprint: str,
    armored: str,
    email: str,
    now: datetime,
) -> KeyProblem | None:
    """Judge a reader's active key again in full (its recheck_at has come) and store what it
    found, so that the sender's next message to them is checked by the stored expiry only.

    Good: its kept form, expiry and next recheck (None, or a later self-signature) replace the
    stored ones. Refused: it is stored as expired from now, with no recheck left; the problem is
    returned. Only a row still holding this very text changes: a key given meanwhile stands.
    """
    problem: KeyProblem | None = None
    try:
        info = read_key(armored, email=email, now=now)
        values = {
            "armored": info.armored,
            "expires_at": info.expires_at,
            "recheck_at": info.recheck_at,
        }
    except KeyProblem as refused:
        problem, values = refused, {"expires_at": now, "recheck_at": None}
    session.execute(
        update(ReaderKey)
        .where(
            ReaderKey.subscriber_id == subscriber_id,
            ReaderKey.status == KeyStatus.ACTIVE,
            ReaderKey.fingerprint == fingerprint,
            ReaderKey.armored == armored,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return problem


# What a newly active key replaces: at most one of these is kept per reader.
SUPERSEDED = (KeyStatus.ACTIVE, KeyStatus.REMOVED, KeyStatus.REVOKED)


def _learn_revocation(
    session: Session, subscriber_id: int, problem: KeyProblem, now: datetime, actor: str
) -> bool:
    """A revoked key that is this reader's own: mark it revoked; whether it was theirs."""
    rows = _keys_by_status(session, subscriber_id)
    pending, active = rows.get(KeyStatus.PENDING), rows.get(KeyStatus.ACTIVE)
    ours = [k for k in (pending, active) if k is not None and k.fingerprint == problem.fingerprint]
    if not ours:
        return False
    if pending in ours:
        session.delete(pending)
    if active in ours:
        session.execute(
            delete(ReaderKey).where(
                ReaderKey.subscriber_id == subscriber_id,
                ReaderKey.status.in_([KeyStatus.REMOVED, KeyStatus.REVOKED]),
            )
        )
        session.flush()
        active.status, active.armored = KeyStatus.REVOKED, problem.armored
    record_event(
        session,
        now=now,
        actor=actor,
        action="subscriber.key_revoked",
        subscriber=subscriber_id,
    )
    session.flush()
    return True


def confirm_key(session: Session, *, subscriber_id: int, fingerprint: str, now: datetime) -> None:
    """The reader decrypted the proof: their pending key with this fingerprint becomes active.

    A link to a key that is already active confirms nothing more and is no error (a second
    click); one to a key replaced or removed since is refused.
    """
    sub = _subscriber(session, subscriber_id)
    rows = _keys_by_status(session, sub.id)
    active, pending = rows.get(KeyStatus.ACTIVE), rows.get(KeyStatus.PENDING)
    if active is not None and active.fingerprint == fingerprint and pending is None:
        return
    if pending is None or pending.fingerprint != fingerprint:
        raise TokenError("this link is not valid")
    session.execute(
        delete(ReaderKey).where(ReaderKey.subscriber_id == sub.id, ReaderKey.status.in_(SUPERSEDED))
    )
    session.flush()
    pending.status, pending.confirmed_at = KeyStatus.ACTIVE, now
    record_event(
        session,
        now=now,
        actor="web",
        action="subscriber.key_confirmed",
        subscriber=sub.id,
    )
    session.flush()


def remove_key(
    session: Session, *, subscriber_id: int, now: datetime, actor: str, by_reader: bool
) -> bool:
    """Take a reader's keys off; returns whether there was one.

    By the reader: every key row goes (they chose plain mail). By an admin: a pending key goes,
    the active one is marked removed with its key material wiped, so `on_key_problem` applies.
    """
    sub = _subscriber(session, subscriber_id)
    rows = _keys_by_status(session, sub.id)
    if not rows or (not by_reader and not rows.keys() & {KeyStatus.ACTIVE, KeyStatus.PENDING}):
        return False  # a second admin removal keeps the mark: on_key_problem still applies
    mine = ReaderKey.subscriber_id == sub.id
    if by_reader:
        session.execute(delete(ReaderKey).where(mine))
    else:
        session.execute(delete(ReaderKey).where(mine, ReaderKey.status == KeyStatus.PENDING))
    if not by_reader and KeyStatus.ACTIVE in rows:  # the mark replaces older marks
        gone = [KeyStatus.REMOVED, KeyStatus.REVOKED]
        session.execute(delete(ReaderKey).where(mine, ReaderKey.status.in_(gone)))
        session.flush()
        session.execute(
            update(ReaderKey)
            .where(mine, ReaderKey.status == KeyStatus.ACTIVE)
            .values(status=KeyStatus.REMOVED, armored="")
        )
    record_event(session, now=now, actor=actor, action="subscriber.key_removed", subscriber=sub.id)
    session.flush()
    return True


def forget_keys(session: Session, subscriber_id: int) -> None:
    """Erase every key and key notice of a forgotten reader."""
    session.execute(delete(ReaderKey).where(ReaderKey.subscriber_id == subscriber_id))
    session.execute(delete(KeyNotice).where(KeyNotice.subscriber_id == subscriber_id))
