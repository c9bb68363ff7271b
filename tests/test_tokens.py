"""Signed tokens: an expiring one is aged by the injected clock, never by the wall clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from newsletter.errors import TokenError
from newsletter.tokens import make_token, read_token
from tests.conftest import SECRET

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
