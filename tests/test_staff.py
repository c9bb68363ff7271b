"""Staff accounts: the password policy, enrolment links, TOTP set-up, recovery codes, changes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import pyotp
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Event, Staff, StaffRecoveryCode
from newsletter.errors import PasswordPolicyError, SignInError, StaffError
from newsletter.staff import (
    active_staff_emails,
    add_staff,
    begin_enrolment,
    complete_enrolment,
    disable_staff,
    get_staff,
    list_staff,
    password_problem,
    reset_staff,
    set_role,
    set_training,
)
from tests.conftest import make_settings

PASSWORD = "correct horse battery staple 7"


@dataclass
class Enrolled:
    id: int
    email: str
    secret: str
    codes: list[str]


def settings_of(factory: sessionmaker[Session]) -> Settings:
    """Embedded defaults on the factory's database."""
    return make_settings(str(factory.kw["bind"].url.render_as_string(hide_password=False)))


def code_for(secret: str, clock: FrozenClock, steps: int = 0) -> str:
    """The TOTP code an authenticator app shows at the clock's time (plus `steps` x 30 s)."""
    return pyotp.TOTP(secret).at(clock.now() + timedelta(seconds=30 * steps))


def token_of(url: str) -> str:
    return url.rsplit("/enrol/", 1)[1]


def enrol(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    email: str = "ola@example.org",
    role: str = "editor",
    password: str = PASSWORD,
) -> Enrolled:
    """Add an account and enrol it as the console would; the clock moves one TOTP step on."""
    settings = settings_of(factory)
    with unit_of_work(factory) as session:
        url = add_staff(
            session,
            email=email,
            role=role,
            name="Ola",
            now=clock.now(),
            actor="cli:test",
            settings=settings,
        )
    with unit_of_work(factory) as session:
        secret = begin_enrolment(
            session, token=token_of(url), now=clock.now(), settings=settings
        ).totp_secret
    with unit_of_work(factory) as session:
        codes = complete_enrolment(
            session,
            token=token_of(url),
            password=password,
            password_again=password,
            code=code_for(secret, clock),
            now=clock.now(),
            client="192.0.2.1",
        )
        staff_id = session.scalars(select(Staff.id).where(Staff.email == email)).one()
    clock.advance(seconds=30)  # the enrolment code's step is used up
    return Enrolled(staff_id, email, secret, codes)


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        pytest.param("short pass", "at least 12", id="short"),
        pytest.param("Password1234", "most common", id="common-any-case"),
        pytest.param("iloveyou2014", None, id="not-in-list"),
        pytest.param("QwErTy123456", "most common", id="common-upper"),
        pytest.param("my-ola.k@example.org", "email", id="the-address"),
        pytest.param("xx-OLA.K-2026-yy", "email", id="contains-local-part"),
        pytest.param("a long enough passphrase", None, id="fine"),
    ],
)
def test_password_policy(password: str, problem: str | None) -> None:
    """At least 12 characters, not a common password (any case), not the address or its name."""
    found = password_problem(password, "ola.k@example.org")
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_enrolment_sets_password_totp_and_ten_single_use_codes(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Enrolment stores only hashes; the recovery codes are ten distinct, well-formed codes."""
    who = enrol(factory, clock)
    assert len(set(who.codes)) == 10
    assert all(
        re.fullmatch(r"[a-km-np-z2-9]{4}-[a-km-np-z2-9]{4}-[a-km-np-z2-9]{4}", c) for c in who.codes
    )
    with unit_of_work(factory) as session:
        staff = session.get(Staff, who.id)
        assert staff is not None and staff.password_hash.startswith("$argon2id$")
        assert staff.enrol_token_hash is None and staff.enrolled_at is not None
        stored = session.scalars(select(StaffRecoveryCode.code_hash)).all()
        assert len(stored) == 10 and not set(stored) & set(who.codes)
        events = session.scalars(select(Event.action)).all()
        assert events == ["staff.added", "staff.enrolled"]
        assert get_staff(session, who.id).enrolled


def test_link_page_shows_the_same_secret_on_reload_and_a_qr_code(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A reload of the enrolment page shows the same secret; the QR code is inline SVG."""
    settings = settings_of(factory)
    with unit_of_work(factory) as session:
        url = add_staff(
            session,
            email="Ana@Example.org",
            role="admin",
            name="",
            now=clock.now(),
            actor="cli:t",
            settings=settings,
        )
    assert url.startswith(settings.console.base_url + "/enrol/")
    with unit_of_work(factory) as session:
        first = begin_enrolment(session, token=token_of(url), now=clock.now(), settings=settings)
    with unit_of_work(factory) as session:
        again = begin_enrolment(session, token=token_of(url), now=clock.now(), settings=settings)
    assert first.totp_secret == again.totp_secret and first.staff.email == "ana@example.org"
    assert (
        first.otpauth_uri.startswith("otpauth://totp/") and first.totp_secret in first.otpauth_uri
    )
    assert first.qr_svg.startswith("<svg") and "<?xml" not in first.qr_svg
    assert "script" not in first.qr_svg.lower()


def test_expired_used_and_forged_links_are_refused(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A link past enrol_hours, a used one and a made-up one get the same refusal."""
    settings = settings_of(factory)
    with unit_of_work(factory) as session:
        late = add_staff(
            session,
            email="late@example.org",
            role="editor",
            name="",
            now=clock.now(),
            actor="t",
            settings=settings,
        )
    clock.advance(hours=settings.console.enrol_hours)
    who = enrol(factory, clock)
    with unit_of_work(factory) as session:
        for token in (token_of(late), "made-up-token"):
            with pytest.raises(SignInError, match="not valid or has expired"):
                begin_enrolment(session, token=token, now=clock.now(), settings=settings)
        used = session.scalars(select(Event).where(Event.action == "staff.added")).all()
        assert len(used) == 2
    # reusing the link that enrolled `who`: it was consumed
    with unit_of_work(factory) as session:
        staff = session.get(Staff, who.id)
        assert staff is not None and staff.enrol_token_hash is None


def test_used_link_cannot_enrol_again(factory: sessionmaker[Session], clock: FrozenClock) -> None:
    """The same link a second time is refused: nobody can re-enrol an account with it."""
    settings = settings_of(factory)
    with unit_of_work(factory) as session:
        url = add_staff(
            session,
            email="b@example.org",
            role="editor",
            name="",
            now=clock.now(),
            actor="t",
            settings=settings,
        )
    with unit_of_work(factory) as session:
        secret = begin_enrolment(
            session, token=token_of(url), now=clock.now(), settings=settings
        ).totp_secret
    with unit_of_work(factory) as session:
        complete_enrolment(
            session,
            token=token_of(url),
            password=PASSWORD,
            password_again=PASSWORD,
            code=code_for(secret, clock),
            now=clock.now(),
            client="c",
        )
    clock.advance(seconds=30)
    with unit_of_work(factory) as session, pytest.raises(SignInError, match="not valid"):
        complete_enrolment(
            session,
            token=token_of(url),
            password=PASSWORD + "x",
            password_again=PASSWORD + "x",
            code=code_for(secret, clock),
            now=clock.now(),
            client="c",
        )


@pytest.mark.parametrize(
    ("password", "again", "code_ok", "error"),
    [
        pytest.param(PASSWORD, PASSWORD, False, SignInError, id="wrong-code"),
        pytest.param(PASSWORD, PASSWORD + "!", True, PasswordPolicyError, id="not-the-same"),
        pytest.param("1Q2W3E4R5T6Y", "1Q2W3E4R5T6Y", True, PasswordPolicyError, id="common"),
        pytest.param("short", "short", True, PasswordPolicyError, id="short"),
    ],
)
def test_enrolment_refusals_leave_the_link_usable(
    factory: sessionmaker[Session],
    clock: FrozenClock,
    password: str,
    again: str,
    code_ok: bool,
    error: type[Exception],
) -> None:
    """A wrong code or a refused password changes nothing: the link still works afterwards."""
    settings = settings_of(factory)
    with unit_of_work(factory) as session:
        url = add_staff(
            session,
            email="c@example.org",
            role="editor",
            name="",
            now=clock.now(),
            actor="t",
            settings=settings,
        )
    with unit_of_work(factory) as session:
        secret = begin_enrolment(
            session, token=token_of(url), now=clock.now(), settings=settings
        ).totp_secret
    good = code_for(secret, clock)
    code = good if code_ok else f"{(int(good) + 1) % 1_000_000:06d}"
    with pytest.raises(error), unit_of_work(factory) as session:
        complete_enrolment(
            session,
            token=token_of(url),
            password=password,
            password_again=again,
            code=code,
            now=clock.now(),
            client="c",
        )
    with unit_of_work(factory) as session:
        codes = complete_enrolment(
            session,
            token=token_of(url),
            password=PASSWORD,
            password_again=PASSWORD,
            code=good,
            now=clock.now(),
            client="c",
        )
    assert len(codes) == 10


def test_account_changes_are_audited_and_listed(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Role, training and disable change the account and are each one audit event."""
    who = enrol(factory, clock, role="editor")
    enrol(factory, clock, email="appr@example.org", role="approver")
    with unit_of_work(factory) as session:
        assert set_role(
            session, email=who.email, role="approver", now=clock.now(), actor="cli:t"
        ).may_approve()
        assert set_training(
            session, email=who.email, training=True, now=clock.now(), actor="cli:t"
        ).training
        with pytest.raises(StaffError, match="unknown role"):
            set_role(session, email=who.email, role="root", now=clock.now(), actor="cli:t")
        with pytest.raises(StaffError, match="no staff account"):
            disable_staff(session, email="nobody@example.org", now=clock.now(), actor="cli:t")
        assert active_staff_emails(session, roles=("approver",)) == ["appr@example.org", who.email]
        view = disable_staff(session, email=who.email, now=clock.now(), actor="cli:t")
        assert view.disabled and not view.is_admin()
        assert active_staff_emails(session) == ["appr@example.org"]
        assert [s.email for s in list_staff(session)] == ["appr@example.org", who.email]
        actions = session.scalars(select(Event.action).where(Event.actor == "cli:t")).all()
        assert actions == ["staff.role_changed", "staff.training_changed", "staff.disabled"]
    with unit_of_work(factory) as session, pytest.raises(StaffError, match="already has"):
        add_staff(
            session,
            email=who.email.upper(),
            role="editor",
            name="",
            now=clock.now(),
            actor="t",
            settings=settings_of(factory),
        )


def test_reset_clears_the_secrets_and_gives_a_new_link(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """After a reset the old TOTP secret and codes are gone; the new link enrols afresh."""
    who = enrol(factory, clock)
    settings = settings_of(factory)
    with unit_of_work(factory) as session:
        url = reset_staff(
            session, email=who.email, now=clock.now(), actor="cli:t", settings=settings
        )
        assert not get_staff(session, who.id).enrolled
        assert session.scalars(select(StaffRecoveryCode)).all() == []
    with unit_of_work(factory) as session:
        secret = begin_enrolment(
            session, token=token_of(url), now=clock.now(), settings=settings
        ).totp_secret
    assert secret != who.secret
