"""Suppression: addresses that must not be mailed again, kept only as keyed hashes.

An address is suppressed when its mailbox refused mail for good (a 5xx reply or a hard bounce)
or when its owner was forgotten. The table holds an HMAC of the address, never the address, so
a suppression cannot be read back or joined to the subscribers; it is looked up by hashing the
address in every form it may be stored under (newsletter.addresses). Import, `subscribers add`
and subscribe consult it; the person's status (bounced, forgotten), set at the same time, is what
the sender checks again when it claims each delivery.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from datetime import datetime

from sqlalchemy.orm import Session

from newsletter.addresses import stored_forms
from newsletter.db.models import SubscriberStatus
from newsletter.db.queries import add_suppression, delete_suppressions, find_suppressions

# People in these states are never brought back by an import or an admin without a fresh
# confirmation from them (a suppressed address is held back the same way).
KEPT_OUT_STATUSES = (
    SubscriberStatus.UNSUBSCRIBED,
    SubscriberStatus.BOUNCED,
    SubscriberStatus.FORGOTTEN,
)


def hash_address(email: str, *, secret: str) -> str:
    """A keyed hash of an address, so suppressions keep no readable address."""
    return address_hasher(secret)(email)


def address_hasher(secret: str) -> Callable[[str], str]:
    """hash_address for one secret, for many addresses (an import's): the key and the prefix are
    hashed once, and each address continues a copy of that state."""
    keyed = hmac.new(secret.encode(), b"suppression:", hashlib.sha256)

    def hashed(email: str) -> str:
        digest = keyed.copy()
        digest.update(email.strip().lower().encode())
        return digest.hexdigest()

    return hashed


def _hashes(email: str, secret: str) -> list[str]:
    """The keyed hashes of an address in every form it may be stored under, each once."""
    return list(dict.fromkeys(hash_address(form, secret=secret) for form in stored_forms(email)))


def suppressed_forms(session: Session, forms: Iterable[str], *, secret: str) -> set[str]:
    """Which of these address forms are suppressed (one look-up for them all)."""
    hashed = address_hasher(secret)
    by_hash: dict[str, list[str]] = {}
    for form in forms:
        by_hash.setdefault(hashed(form), []).append(form)
    found = find_suppressions(session, list(by_hash))
    return {form for digest in found for form in by_hash[digest]}


def is_suppressed(session: Session, email: str, *, secret: str) -> bool:
    """Whether an address (in any form it may be stored under) must not be mailed again."""
    return bool(find_suppressions(session, _hashes(email, secret)))


def suppress(session: Session, email: str, *, secret: str, reason: str, now: datetime) -> bool:
    """Suppress an address in every form it may be stored under; returns whether any was new."""
    added = [
        add_suppression(session, email_hash=digest, reason=reason, now=now)
        for digest in _hashes(email, secret)
    ]
    return any(added)


def lift_suppression(session: Session, email: str, *, secret: str) -> None:
    """Lift an address's suppression in every form (the person asked again and confirmed)."""
    delete_suppressions(session, _hashes(email, secret))
