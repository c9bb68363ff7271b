"""Signed tokens (an expiring one aged by the injected clock) and the one URL builder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from itsdangerous import URLSafeSerializer
from sqlalchemy.orm import sessionmaker
from starlette.routing import Match

from newsletter.clock import FrozenClock
from newsletter.errors import TokenError
from newsletter.tokens import (
    PURPOSES,
    TokenClaims,
    make_token,
    page_path,
    page_url,
    read_token,
    sign_ints,
)
from newsletter.web import create_app
from tests.conftest import SECRET, make_settings

ISSUED = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)  # years from the wall clock, either way


def confirm_token() -> str:
    return make_token(
        secret=SECRET, purpose="confirm", subscriber_id=7, list_id=2, issued_at=ISSUED
    )


@pytest.mark.parametrize(
    ("age", "valid"),
    [
        pytest.param(timedelta(hours=47), True, id="within"),
        pytest.param(timedelta(hours=49), False, id="past"),
    ],
)
def test_an_expiring_token_is_aged_by_the_given_clock(age: timedelta, valid: bool) -> None:
    """48 hours after issue by the clock passed in, whatever the wall clock says."""
    token, now = confirm_token(), ISSUED + age
    if valid:
        claims = read_token(
            token, secret=SECRET, purpose="confirm", max_age_seconds=172800, now=now
        )
        assert claims.subscriber_id == 7
    else:
        with pytest.raises(TokenError, match="expired"):
            read_token(token, secret=SECRET, purpose="confirm", max_age_seconds=172800, now=now)


def test_an_expiring_token_without_a_clock_reading_is_a_bug_not_a_wall_clock_guess() -> None:
    """max_age_seconds without now= raises TypeError instead of reading datetime.now."""
    with pytest.raises(TypeError, match="now="):
        read_token(confirm_token(), secret=SECRET, purpose="confirm", max_age_seconds=3600)  # type: ignore[call-overload]


def test_a_token_that_does_not_expire_needs_no_clock() -> None:
    """Unsubscribe links never expire: no clock reading is asked for."""
    token = make_token(secret=SECRET, purpose="unsubscribe", subscriber_id=3, list_id=1)
    assert read_token(token, secret=SECRET, purpose="unsubscribe").list_id == 1


DAY = 24 * 3600


def test_a_token_round_trips_for_each_purpose() -> None:
    """What make_token signs, read_token gives back, for every purpose."""
    for purpose in PURPOSES:
        token = make_token(secret=SECRET, purpose=purpose, subscriber_id=7, list_id=2)
        assert read_token(token, secret=SECRET, purpose=purpose) == TokenClaims(purpose, 7, 2)


@pytest.mark.parametrize("purpose", PURPOSES)
@pytest.mark.parametrize(
    "payload", [(1, 2), (987654321, 3), (12, 4, 1893456000), (1111111111, 1111111111, 1111111111)]
)
def test_the_fast_signer_makes_what_itsdangerous_makes_and_reads(
    purpose: str, payload: tuple[int, ...]
) -> None:
    """The sender's signer equals URLSafeSerializer.dumps where that does not compress, and
    itsdangerous itself reads every token it makes (compressible payloads included)."""
    serializer = URLSafeSerializer(SECRET, salt=f"newsletter.{purpose}")
    token = sign_ints(SECRET, purpose, payload)
    assert serializer.loads(token) == list(payload)
    reference = serializer.dumps(list(payload))
    if not reference.startswith("."):  # "." = itsdangerous chose zlib; we never do
        assert token == reference
    assert (
        URLSafeSerializer("another secret", salt=f"newsletter.{purpose}").loads_unsafe(token)[0]
        is False
    )


def test_a_token_for_one_purpose_opens_no_other() -> None:
    """An unsubscribe token is not a preferences or confirmation token."""
    token = make_token(secret=SECRET, purpose="unsubscribe", subscriber_id=7, list_id=2)
    for purpose in ("preferences", "confirm"):
        with pytest.raises(TokenError, match="not valid"):
            read_token(token, secret=SECRET, purpose=purpose)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), id="signature"),
        pytest.param(lambda t: "WzgsMl0" + t[t.index(".") :], id="payload"),
        pytest.param(lambda t: t + "x", id="appended"),
        pytest.param(lambda t: "", id="empty"),
    ],
)
def test_a_tampered_token_is_refused(tamper: object) -> None:
    """Any change to a token, or another secret, makes it invalid with the same one line."""
    token = make_token(secret=SECRET, purpose="preferences", subscriber_id=7, list_id=2)
    with pytest.raises(TokenError, match="this link is not valid"):
        read_token(tamper(token), secret=SECRET, purpose="preferences")  # type: ignore[operator]
    with pytest.raises(TokenError, match="this link is not valid"):
        read_token(token, secret=SECRET + "-other", purpose="preferences")


def test_an_expiring_token_is_aged_by_the_injected_clock() -> None:
    """Issued at the clock's time, valid to the second of its max age, expired after."""
    clock = FrozenClock(datetime(2031, 5, 4, 12, 0, tzinfo=UTC))  # years from the wall clock
    token = make_token(
        secret=SECRET, purpose="confirm", subscriber_id=7, list_id=2, issued_at=clock.now()
    )
    clock.advance(seconds=DAY)
    claims = read_token(
        token, secret=SECRET, purpose="confirm", max_age_seconds=DAY, now=clock.now()
    )
    assert claims.subscriber_id == 7
    clock.advance(seconds=1)
    with pytest.raises(TokenError, match="expired"):
        read_token(token, secret=SECRET, purpose="confirm", max_age_seconds=DAY, now=clock.now())


def test_a_token_without_a_date_cannot_pass_as_an_expiring_one() -> None:
    """A link that must expire but names no issue time is refused, whatever the clock says."""
    token = make_token(secret=SECRET, purpose="confirm", subscriber_id=7, list_id=2)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(TokenError, match="not valid"):
        read_token(token, secret=SECRET, purpose="confirm", max_age_seconds=DAY, now=now)


@pytest.mark.parametrize(
    ("purpose", "path"),
    [
        pytest.param("unsubscribe", "/u/TOKEN", id="unsubscribe"),
        pytest.param("preferences", "/preferences/TOKEN", id="preferences"),
        pytest.param("confirm", "/confirm/TOKEN", id="confirm"),
    ],
)
def test_the_url_builder_gives_each_page_its_path(purpose: str, path: str) -> None:
    """One builder for every page link, with or without a slash ending base_url."""
    assert page_path(purpose, "TOKEN") == path
    assert (
        page_url("https://news.example.org", purpose, "TOKEN") == f"https://news.example.org{path}"
    )
    assert (
        page_url("https://news.example.org/", purpose, "TOKEN") == f"https://news.example.org{path}"
    )


def test_every_built_link_is_a_page_the_web_app_serves(sqlite_url: str, clock: FrozenClock) -> None:
    """The web app routes the paths the builder writes into emails and notices, GET and POST
    (a discreet reader's web copy, /w/, is read only: GET)."""
    app = create_app(make_settings(sqlite_url), sessionmaker(), clock)
    for purpose in PURPOSES:
        token = make_token(secret=SECRET, purpose=purpose, subscriber_id=7, list_id=2)
        for method in ("GET",) if purpose == "copy" else ("GET", "POST"):
            scope = {"type": "http", "path": page_path(purpose, token), "method": method}
            matches = [route.matches(scope)[0] for route in app.routes]
            assert Match.FULL in matches, (purpose, method)


@pytest.mark.parametrize("name", ["sha1", "sha256"])
def test_the_keyed_hash_is_hmac_for_keys_and_messages_of_every_length(name: str) -> None:
    """Keys shorter than, as long as and longer than the hash's block (hashed first), as bytes
    and as text; messages from empty to several blocks."""
    import hmac
    import random

    from newsletter.tokens import KeyedHash, keyed_hash

    rng = random.Random(7)
    for key_length in [0, 1, 19, 20, 32, 63, 64, 65, 127, 128, 129, 300]:
        key = rng.randbytes(key_length)
        mac = KeyedHash(key, name)
        for message_length in [0, 1, 10, 55, 56, 63, 64, 65, 200, 1000]:
            message = rng.randbytes(message_length)
            assert mac.digest(message) == hmac.digest(key, message, name)
            assert mac.digest(message) == hmac.digest(key, message, name)  # states not used up
    text = "пароль-" * 20  # a secret as configured: text, UTF-8
    assert keyed_hash(text, name).digest(b"m") == hmac.digest(text.encode(), b"m", name)
