"""Signed tokens for links that need no login: unsubscribe, preferences, confirm.

A token names the subscriber and the list and is signed (HMAC) with the configured secret and a
purpose-specific salt, so a token made for one purpose cannot be used for another.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from newsletter.errors import TokenError

PURPOSES = ("unsubscribe", "preferences", "confirm")


@dataclass(frozen=True)
class TokenClaims:
    purpose: str
    subscriber_id: int
    list_id: int


def _serializer(secret: str, purpose: str) -> URLSafeTimedSerializer:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown token purpose {purpose!r}")
    return URLSafeTimedSerializer(secret, salt=f"newsletter.{purpose}")


def make_token(*, secret: str, purpose: str, subscriber_id: int, list_id: int) -> str:
    """Sign (subscriber, list) for one purpose."""
    return str(_serializer(secret, purpose).dumps([subscriber_id, list_id]))


def read_token(
    token: str, *, secret: str, purpose: str, max_age_seconds: int | None = None
) -> TokenClaims:
    """Verify a token and return what it names; a forged, altered or expired one is refused."""
    try:
        value = _serializer(secret, purpose).loads(token, max_age=max_age_seconds)
    except SignatureExpired:
        raise TokenError("this link has expired") from None
    except BadSignature:
        raise TokenError("this link is not valid") from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TokenError("this link is not valid")
    return TokenClaims(purpose=purpose, subscriber_id=value[0], list_id=value[1])


def hash_address(email: str, *, secret: str) -> str:
    """A keyed hash of an address, so suppressions keep no readable address."""
    key = secret.encode()
    return hmac.new(
        key, b"suppression:" + email.strip().lower().encode(), hashlib.sha256
    ).hexdigest()
