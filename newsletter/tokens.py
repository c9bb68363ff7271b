"""Signed tokens for links that need no login: unsubscribe, preferences, confirm.

A token names the subscriber and the list and is signed (HMAC) with the configured secret and a
purpose-specific salt, so a token made for one purpose cannot be used for another. The pages
that read them live at one path per purpose (PAGE_PATHS): emails, notices and the web pages all
build their links with page_url / page_path.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Any, overload

from itsdangerous import BadSignature, URLSafeSerializer

from newsletter.errors import TokenError

PURPOSES = ("unsubscribe", "preferences", "confirm", "key", "key_update", "copy", "wrote")
# Where the web page for each purpose lives; the token follows.
PAGE_PATHS = {
    "unsubscribe": "/u/",
    "preferences": "/preferences/",
    "confirm": "/confirm/",
    "key": "/key/",  # the proof that a reader can decrypt mail sent to the key they gave
    "key_update": "/new-key/",  # a new key only: the link of the plaintext key-problem notice
    "copy": "/w/",  # a discreet reader's web copy of a campaign (no personal data in it)
    "wrote": "/wrote/",  # "I sent my letter" for an urgent-action case (counted once per reader)
}


@dataclass(frozen=True)
class TokenClaims:
    purpose: str
    subscriber_id: int
    list_id: int


@functools.lru_cache(maxsize=16)
def _serializer(secret: str, purpose: str) -> URLSafeSerializer:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown token purpose {purpose!r}")
    return URLSafeSerializer(secret, salt=f"newsletter.{purpose}")


@functools.lru_cache(maxsize=16)
def _signing_key(secret: str, purpose: str) -> bytes:
    return _serializer(secret, purpose).make_signer().derive_key()


# RFC 2104's padded keys, as the hmac module makes them.
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


class KeyedHash:
    """HMAC with one key, its two padded key blocks hashed once (the sender signs three or four
    things per message with the same few keys): a copy of each state per message, a third of
    the cost of hmac.digest, which hashes both blocks again every time. hmac.digest's value
    (tests/test_tokens.py compares them for keys and messages of every length)."""

    def __init__(self, key: bytes, name: str) -> None:
        inner, outer = hashlib.new(name), hashlib.new(name)
        if len(key) > inner.block_size:
            key = hashlib.new(name, key).digest()
        key = key.ljust(inner.block_size, b"\0")
        inner.update(key.translate(_IPAD))
        outer.update(key.translate(_OPAD))
        self._inner, self._outer = inner, outer

    def digest(self, message: bytes) -> bytes:
        """HMAC(key, message)."""
        inner, outer = self._inner.copy(), self._outer.copy()
        inner.update(message)
        outer.update(inner.digest())
        return outer.digest()


@functools.lru_cache(maxsize=32)
def keyed_hash(key: bytes | str, name: str) -> KeyedHash:
    """The KeyedHash of a key (a str is taken as UTF-8) for a hash name ("sha1", "sha256")."""
    return KeyedHash(key.encode() if isinstance(key, str) else key, name)


def _loads(token: str, *, secret: str, purpose: str) -> Any:
    """What a token signed for a purpose holds; TokenError unless it is exactly as we made it.

    itsdangerous reads base64 leniently (padding, bytes past the last full one, stray
    characters), so one token has many spellings; only the one it was made as is accepted.
    """
    serializer = _serializer(secret, purpose)
    try:
        value = serializer.loads(token)
    except BadSignature:
        raise TokenError("this link is not valid") from None
    if not hmac.compare_digest(str(serializer.dumps(value)).encode(), token.encode()):
        raise TokenError("this link is not valid")
    return value


def sign_ints(secret: str, purpose: str, values: tuple[int, ...]) -> str:
    """What URLSafeSerializer.dumps makes of a list of ints, at a tenth of its cost.

    The sender signs two or three links per message: itsdangerous derived its key, built two
    HMAC objects and tried zlib on every call. Here the key is derived once (by itsdangerous),
    the payload is its compact JSON uncompressed (which its loads reads as it reads its own),
    and the signature is its HMAC-SHA1 over the base64 payload (tests/test_tokens.py compares).
    """
    text = b"[%b]" % b",".join([b"%d" % int(v) for v in values])
    payload = base64.urlsafe_b64encode(text).rstrip(b"=")
    signature = keyed_hash(_signing_key(secret, purpose), "sha1").digest(payload)
    return (payload + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode("ascii")


def make_token(
    *,
    secret: str,
    purpose: str,
    subscriber_id: int,
    list_id: int,
    issued_at: datetime | None = None,
) -> str:
    """Sign (subscriber, list) for one purpose; with `issued_at`, the token can expire."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown token purpose {purpose!r}")
    payload: tuple[int, ...] = (subscriber_id, list_id)
    if issued_at is not None:  # from the injected clock, so tests can age a link
        payload += (int(issued_at.timestamp()),)
    return sign_ints(secret, purpose, payload)


@overload
def read_token(token: str, *, secret: str, purpose: str) -> TokenClaims: ...


@overload
def read_token(
    token: str, *, secret: str, purpose: str, max_age_seconds: int | None, now: datetime
) -> TokenClaims: ...


def read_token(
    token: str,
    *,
    secret: str,
    purpose: str,
    max_age_seconds: int | None = None,
    now: datetime | None = None,
) -> TokenClaims:
    """Verify a token and return what it names; a forged, altered or expired one is refused.

    An expiring token (`max_age_seconds`) is aged against `now`, the injected clock's reading:
    required then, so tests can age a link and no code reads the wall clock by accident.
    """
    if max_age_seconds is not None and now is None:
        raise TypeError("read_token: max_age_seconds needs now= (from the injected clock)")
    value = _loads(token, secret=secret, purpose=purpose)
    if (
        not isinstance(value, list)
        or len(value) not in (2, 3)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TokenError("this link is not valid")
    if max_age_seconds is not None and now is not None:  # now is there: checked above
        if len(value) != 3:  # a link that must expire but names no time
            raise TokenError("this link is not valid")
        if now.timestamp() - value[2] > max_age_seconds:
            raise TokenError("this link has expired")
    return TokenClaims(purpose=purpose, subscriber_id=value[0], list_id=value[1])


def page_path(purpose: str, token: str) -> str:
    """The path of the page a token of this purpose opens, e.g. /u/TOKEN."""
    return PAGE_PATHS[purpose] + token


def page_url(base_url: str, purpose: str, token: str) -> str:
    """The full link to that page under [web] base_url."""
    return base_url.rstrip("/") + page_path(purpose, token)


# --- tokens that name something other than (subscriber, list) -------------------------------


@dataclass(frozen=True)
class KeyClaims:
    subscriber_id: int
    fingerprint: str


# How long the link of a plaintext key-problem notice works. The notice travels in the clear, so
# whoever reads it (a mail provider, a relay, a seized phone) holds the link: two weeks lets a
# reader who checks their mail weekly or is away a while still use it, and a notice left lying
# in a mailbox stops working after that. Later, any earlier encrypted email's settings link
# does the same (an expired or revoked key still decrypts what was sent to it).
KEY_UPDATE_MAX_AGE_DAYS = 14


def make_key_token(
    *, secret: str, subscriber_id: int, fingerprint: str, issued_at: datetime
) -> str:
    """Sign (subscriber, key fingerprint): the link that arrives encrypted to that key."""
    payload = [subscriber_id, fingerprint, int(issued_at.timestamp())]
    return str(_serializer(secret, "key").dumps(payload))


def read_key_token(token: str, *, secret: str, max_age_seconds: int, now: datetime) -> KeyClaims:
    """Verify a key confirmation token; a forged, altered or expired one is refused."""
    return _key_claims(
        token, secret=secret, purpose="key", max_age_seconds=max_age_seconds, now=now
    )


def make_key_update_token(
    *, secret: str, subscriber_id: int, fingerprint: str, issued_at: datetime
) -> str:
    """Sign (subscriber, broken key's fingerprint): the plaintext key-problem notice's link, which
    opens a page that takes a new key and nothing else."""
    payload = [subscriber_id, fingerprint, int(issued_at.timestamp())]
    return str(_serializer(secret, "key_update").dumps(payload))


def read_key_update_token(token: str, *, secret: str, now: datetime) -> KeyClaims:
    """Verify a key update token; a forged, altered, other-purpose or expired one is refused."""
    max_age = KEY_UPDATE_MAX_AGE_DAYS * 24 * 3600
    return _key_claims(token, secret=secret, purpose="key_update", max_age_seconds=max_age, now=now)


def _key_claims(
    token: str, *, secret: str, purpose: str, max_age_seconds: int, now: datetime
) -> KeyClaims:
    """What a signed (subscriber, fingerprint, time) token of this purpose names, if not expired."""
    value = _loads(token, secret=secret, purpose=purpose)
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not isinstance(value[0], int)
        or isinstance(value[0], bool)
        or not isinstance(value[1], str)
        or not isinstance(value[2], int)
    ):
        raise TokenError("this link is not valid")
    if now.timestamp() - value[2] > max_age_seconds:
        raise TokenError("this link has expired")
    return KeyClaims(subscriber_id=value[0], fingerprint=value[1])


def make_copy_token(*, secret: str, campaign_id: int, lang: str) -> str:
    """Sign (campaign, language): the same link for every reader, so it tells nobody apart."""
    return str(_serializer(secret, "copy").dumps([campaign_id, lang]))


def read_copy_token(token: str, *, secret: str) -> tuple[int, str]:
    """The (campaign, language) a web copy link names; a forged one is refused."""
    value = _loads(token, secret=secret, purpose="copy")
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], int)
        or isinstance(value[0], bool)
        or not isinstance(value[1], str)
    ):
        raise TokenError("this link is not valid")
    return value[0], value[1]


def make_wrote_token(*, secret: str, subscriber_id: int, case_id: int) -> str:
    """Sign (subscriber, case): a reader's "I sent my letter" link in a case's first message."""
    return sign_ints(secret, "wrote", (subscriber_id, case_id))


def read_wrote_token(token: str, *, secret: str) -> tuple[int, int]:
    """The (subscriber, case) an "I sent my letter" link names; a forged one is refused."""
    value = _loads(token, secret=secret, purpose="wrote")
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TokenError("this link is not valid")
    return value[0], value[1]
