"""Signing in: two steps, one answer for any wrong password, no replay, throttled not locked."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Event, RateLimit
from newsletter.errors import SignInError, ThrottledError
from newsletter.staff import add_staff, disable_staff
from newsletter.staff_auth import code_step, password_step, recovery_codes_left, verify_step_up
from tests.test_staff import PASSWORD, Enrolled, code_for, enrol, settings_of

CLIENT = "198.51.100.7"


def sign_in_password(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    email: str,
    password: str = PASSWORD,
    client: str = CLIENT,
) -> str:
    with unit_of_work(factory) as session:
        return password_step(
            session,
            email=email,
            password=password,
            client=client,
            now=clock.now(),
            settings=settings,
        )


def sign_in_code(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    pending: str,
    code: str,
    client: str = CLIENT,
) -> str:
    with unit_of_work(factory) as session:
        return code_step(
            session, pending=pending, code=code, client=client, now=clock.now(), settings=settings
        ).email


def actions(factory: sessionmaker[Session]) -> list[str]:
    with unit_of_work(factory) as session:
        return list(session.scalars(select(Event.action).order_by(Event.id)))


def test_sign_in_with_password_then_totp(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """The right password gives a pending token; the right code signs in and is audited."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    pending = sign_in_password(factory, settings, clock, "OLA@example.org")
    assert sign_in_code(factory, settings, clock, pending, code_for(who.secret, clock)) == who.email
    assert actions(factory)[-1] == "staff.signed_in"


@pytest.mark.parametrize(
    "case", ["wrong-password", "unknown", "disabled", "not-enrolled", "malformed"]
)
def test_every_refusal_gets_the_same_answer(
    factory: sessionmaker[Session], clock: FrozenClock, case: str
) -> None:
    """Unknown, disabled, not enrolled or wrong password: one message, one event, counted."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    email, password = who.email, PASSWORD
    with unit_of_work(factory) as session:
        if case == "wrong-password":
            password = PASSWORD + "x"
        elif case == "unknown":
            email = "nobody@example.org"
        elif case == "disabled":
            disable_staff(session, email=who.email, now=clock.now(), actor="cli:t")
        elif case == "not-enrolled":
            email = "new@example.org"
            add_staff(
                session,
                email=email,
                role="editor",
                name="",
                now=clock.now(),
                actor="t",
                settings=settings,
            )
        else:
            email = "not an address"
    # The caller's unit of work rolls back on the error: the count and the event must survive it.
    with pytest.raises(SignInError) as raised:
        sign_in_password(factory, settings, clock, email, password)
    assert str(raised.value) == "the email address or password is wrong"
    assert type(raised.value) is SignInError
    assert actions(factory)[-1] == "staff.signin_failed"
    with unit_of_work(factory) as session:
        event = session.scalars(select(Event).order_by(Event.id.desc())).first()
        assert event is not None and event.detail == {"client": CLIENT, "reason": "password"}
        assert PASSWORD not in str(event.detail) and email not in str(event.detail)
        # an existing account is named; what was typed for an unknown one may be a password
        assert event.actor == {"unknown": "unknown", "malformed": "unknown"}.get(case, email)
        # (account, client) and client per 15 minutes; (account, client) per day
        assert sorted(r.count for r in session.scalars(select(RateLimit))) == [1, 1, 1]


def test_unknown_account_takes_as_long_as_a_wrong_password(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """The unknown path verifies a dummy Argon2 hash: not much faster than a wrong password."""
    who = enrol(factory, clock)
    settings = replace(
        settings_of(factory),
        console=replace(
            settings_of(factory).console, failures_per_account_client=100, failures_per_client=100
        ),
    )

    def timed(email: str) -> float:
        start = time.perf_counter()
        with pytest.raises(SignInError):
            sign_in_password(factory, settings, clock, email, "wrong password here")
        return time.perf_counter() - start

    timed("warm-up@example.org")
    known = statistics.median(timed(who.email) for _ in range(5))
    unknown = statistics.median(timed("nobody@example.org") for _ in range(5))
    assert unknown > 0.5 * known, (unknown, known)


def test_totp_code_is_good_once(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """A code accepted once is refused after (replay), and so is an older step's code."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    code = code_for(who.secret, clock)
    sign_in_code(
        factory, settings, clock, sign_in_password(factory, settings, clock, who.email), code
    )
    older = code_for(who.secret, clock, -1)
    for replayed in (code, older):
        pending = sign_in_password(factory, settings, clock, who.email)
        with pytest.raises(SignInError, match="the code is wrong"):
            sign_in_code(factory, settings, clock, pending, replayed)
    clock.advance(seconds=30)
    pending = sign_in_password(factory, settings, clock, who.email)
    assert sign_in_code(factory, settings, clock, pending, code_for(who.secret, clock))


def test_a_code_one_step_early_or_late_is_accepted(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """valid_window 1: the phone's clock may be 30 seconds off either way; two steps is too far."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    with pytest.raises(SignInError):
        sign_in_code(
            factory,
            settings,
            clock,
            sign_in_password(factory, settings, clock, who.email),
            code_for(who.secret, clock, 2),
        )
    assert sign_in_code(
        factory,
        settings,
        clock,
        sign_in_password(factory, settings, clock, who.email),
        code_for(who.secret, clock, 1),
    )


def test_recovery_code_works_once_in_any_case(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A recovery code signs in, typed upper-case without dashes; the second time it is refused."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    typed = who.codes[3].replace("-", "").upper()
    sign_in_code(
        factory, settings, clock, sign_in_password(factory, settings, clock, who.email), typed
    )
    with pytest.raises(SignInError):
        sign_in_code(
            factory,
            settings,
            clock,
            sign_in_password(factory, settings, clock, who.email),
            who.codes[3],
        )
    with unit_of_work(factory) as session:
        assert recovery_codes_left(session, who.id) == 9


def test_pending_token_expires_and_cannot_be_forged(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """The code step needs a pending token from the last five minutes, signed by us."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    pending = sign_in_password(factory, settings, clock, who.email)
    clock.advance(minutes=5, seconds=1)
    for token in (pending, pending[:-2] + "xx", '[1, 0, ""]'):
        with pytest.raises(SignInError, match="start again"):
            sign_in_code(factory, settings, clock, token, code_for(who.secret, clock))


def test_guessing_one_account_from_one_client_is_throttled_not_the_owner(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Past the (account, client) limit that client waits, even with the right password;
    the owner from another address still signs in."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    limit = settings.console.failures_per_account_client
    for _ in range(limit):
        with pytest.raises(SignInError):
            sign_in_password(factory, settings, clock, who.email, "guess guess guess")
    with pytest.raises(ThrottledError) as raised:
        sign_in_password(
            factory, settings, clock, who.email, PASSWORD
        )  # checked after the wait only
    assert raised.value.retry_after == 15 * 60 - 30  # enrol() moved the clock 30 s on
    with pytest.raises(ThrottledError):
        sign_in_password(factory, settings, clock, who.email, PASSWORD)
    # one throttled event however many throttled tries
    assert actions(factory).count("staff.signin_throttled") == 1
    pending = sign_in_password(factory, settings, clock, who.email, client="203.0.113.99")
    assert sign_in_code(
        factory, settings, clock, pending, code_for(who.secret, clock), client="203.0.113.99"
    )
    clock.advance(minutes=15)
    assert sign_in_password(factory, settings, clock, who.email)


def test_spraying_many_accounts_from_one_client_is_throttled(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """The per-client limit stops one address trying many accounts, with the time to wait."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    for n in range(settings.console.failures_per_client):
        with pytest.raises(SignInError):
            sign_in_password(factory, settings, clock, f"user{n}@example.org", "spray spray spray")
    clock.advance(minutes=5)
    with pytest.raises(ThrottledError) as raised:
        sign_in_password(factory, settings, clock, who.email)
    assert raised.value.retry_after == 10 * 60 - 30  # the window ends at 09:15
    assert sign_in_password(factory, settings, clock, who.email, client="203.0.113.99")


def test_wrong_codes_are_throttled_per_account_and_client_not_the_owner(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A password-holder's wrong codes from one address throttle that address, even with the
    right code; the owner signs in from another."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    pending = sign_in_password(factory, settings, clock, who.email)
    for _ in range(settings.console.code_failures_per_account_client):
        with pytest.raises(SignInError, match="the code is wrong"):
            sign_in_code(factory, settings, clock, pending, "000000")
    with pytest.raises(ThrottledError):
        sign_in_code(factory, settings, clock, pending, code_for(who.secret, clock))
    owner = "203.0.113.99"
    pending = sign_in_password(factory, settings, clock, who.email, client=owner)
    code = code_for(who.secret, clock, steps=1)
    assert sign_in_code(factory, settings, clock, pending, code, client=owner) == who.email


def test_wrong_codes_from_many_addresses_reach_the_accounts_ceiling(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Past code_failures_per_account from every address together, every address waits."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    console = settings.console
    per_client = console.code_failures_per_account_client
    clients = [
        f"198.51.100.{n}" for n in range(-(-console.code_failures_per_account // per_client))
    ]
    for client in clients:
        pending = sign_in_password(factory, settings, clock, who.email, client=client)
        for _ in range(per_client):
            with pytest.raises(SignInError):
                sign_in_code(factory, settings, clock, pending, "000000", client=client)
    pending = sign_in_password(factory, settings, clock, who.email, client="203.0.113.99")
    with pytest.raises(ThrottledError):
        sign_in_code(
            factory, settings, clock, pending, code_for(who.secret, clock), client="203.0.113.99"
        )


def test_an_ipv6_client_is_counted_by_its_64(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Another address in the same /64 is the same client: it cannot dodge the limit."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    for n in range(settings.console.failures_per_account_client):
        with pytest.raises(SignInError):
            sign_in_password(factory, settings, clock, who.email, "guess guess", f"2001:db8::{n}")
    with pytest.raises(ThrottledError):
        sign_in_password(factory, settings, clock, who.email, client="2001:db8::ffff")
    assert sign_in_password(factory, settings, clock, who.email, client="2001:db8:1::1")


def test_wrong_passwords_stop_each_address_for_the_day_never_the_owner_elsewhere(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Per UTC day each address stops at its own limit; however many addresses guess, the owner
    elsewhere signs in (there is no ceiling per account on passwords)."""
    who = enrol(factory, clock)
    console = replace(
        settings_of(factory).console,
        failures_per_account_client=100,
        failures_per_client=100,
        failures_per_account_client_day=3,
    )
    settings = replace(settings_of(factory), console=console)

    def fail(client: str, times: int) -> None:
        for _ in range(times):
            with pytest.raises(SignInError) as raised:
                sign_in_password(factory, settings, clock, who.email, "guess guess", client)
            assert not isinstance(raised.value, ThrottledError)

    fail("198.51.100.1", 3)
    for _ in range(10):  # throttled, and never counted towards the account's ceiling
        with pytest.raises(ThrottledError):
            sign_in_password(factory, settings, clock, who.email, client="198.51.100.1")
    assert sign_in_password(factory, settings, clock, who.email, client="203.0.113.99")
    for n in range(2, 12):
        fail(f"198.51.100.{n}", 3)
    assert sign_in_password(factory, settings, clock, who.email, client="203.0.113.99")
    clock.advance(days=1)
    fail("198.51.100.1", 1)  # a new day: that address may guess again


def test_sign_in_code_failures_never_touch_an_approvers_step_up(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Step-up failures count per signed-in session: a password-holder's wrong codes at the
    sign-in page, or another session's, do not refuse the owner's right code."""
    who: Enrolled = enrol(factory, clock, role="approver")
    settings = settings_of(factory)
    pending = sign_in_password(factory, settings, clock, who.email)
    for _ in range(settings.console.code_failures_per_account + 1):
        with pytest.raises(SignInError):
            sign_in_code(factory, settings, clock, pending, "000000")

    def step_up(session_id: str, code: str) -> None:
        with unit_of_work(factory) as session:
            verify_step_up(
                session, staff_id=who.id, session_id=session_id, code=code,
                now=clock.now(), settings=settings, purpose="approve",
            )  # fmt: skip

    for _ in range(settings.console.step_up_failures_per_session):
        with pytest.raises(SignInError):
            step_up("another session", "000000")
    with pytest.raises(ThrottledError):
        step_up("another session", code_for(who.secret, clock))
    step_up("the owner's session", code_for(who.secret, clock, steps=1))


def test_step_up_needs_a_fresh_totp_code(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Step-up takes a TOTP code once, never a recovery code; both outcomes are audited."""
    who: Enrolled = enrol(factory, clock, role="approver")
    settings = settings_of(factory)
    code = code_for(who.secret, clock)
    with unit_of_work(factory) as session:
        verify_step_up(
            session,
            staff_id=who.id,
            session_id="s",
            code=code,
            now=clock.now(),
            settings=settings,
            purpose="approve",
        )
    for wrong in (code, who.codes[0]):
        with pytest.raises(SignInError), unit_of_work(factory) as session:
            verify_step_up(
                session,
                staff_id=who.id,
                session_id="s",
                code=wrong,
                now=clock.now(),
                settings=settings,
                purpose="approve",
            )
    assert actions(factory)[-3:] == [
        "staff.step_up",
        "staff.step_up_failed",
        "staff.step_up_failed",
    ]
