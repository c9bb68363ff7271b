"""Discreet from the first email: the signup form's box makes the confirmation itself discreet
(real listener, aiosmtpd; SQLite and PostgreSQL)."""

from __future__ import annotations

import httpx
from sqlalchemy import select

from newsletter.db import unit_of_work
from newsletter.db.models import Subscriber
from newsletter.proof_of_work import solve
from tests.conftest import SmtpServer
from tests.test_signup import BITS, Signup, site  # noqa: F401 (the fixture)
from tests.test_web import add_person


def post(site: Signup, email: str, **extra: str) -> httpx.Response:  # noqa: F811
    """The form as its page posts it, with extra fields."""
    ticket = site.ticket()
    site.clock.advance(seconds=5)
    data = {
        "form_token": ticket,
        "pow": solve(ticket, BITS),
        "email": email,
        "language": "en",
        "lists": ["weekly-digest"],
        "website": "",
        **extra,
    }
    return site.http.post(f"{site.url}/subscribe", data=data)


def discreet_of(site: Signup, email: str) -> str:  # noqa: F811
    with unit_of_work(site.factory) as session:
        return str(session.scalar(select(Subscriber.discreet).where(Subscriber.email == email)))


def test_the_box_makes_the_confirmation_discreet(site: Signup, smtpd: SmtpServer) -> None:  # noqa: F811
    """Ticked: the new person is discreet and their confirmation names nothing outside; not
    ticked, or a crafted value: an ordinary confirmation. The page shows the box."""
    page = site.http.get(f"{site.url}/subscribe")
    assert 'name="discreet" value="envelope"' in page.text
    assert post(site, "quiet@example.org", discreet="envelope").status_code == 200
    assert post(site, "open@example.org").status_code == 200
    assert post(site, "odd@example.org", discreet="pointer; drop table").status_code == 200
    assert [discreet_of(site, e) for e in ("quiet@example.org", "open@example.org")] == [
        "envelope",
        "off",
    ]
    assert discreet_of(site, "odd@example.org") == "off"
    site.mail_confirmations()
    mail = {str(m["To"]): m for m in smtpd.messages()}
    quiet, plain = mail["quiet@example.org"], mail["open@example.org"]
    brand = site.settings.brand.name
    assert brand in str(plain["Subject"]) and brand in str(plain["From"])
    heads = "\n".join(f"{k}: {v}" for k, v in quiet.items() if k != "X-Delivered-To")
    assert brand not in heads and "Weekly digest" not in heads
    assert str(quiet["Subject"]) == site.settings.discreet.subject("en")
    assert site.settings.discreet.from_address in str(quiet["From"])
    text = quiet.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert brand not in text and "/confirm/" in text


def test_a_stranger_cannot_change_a_members_choice(site: Signup) -> None:  # noqa: F811
    """Someone already receiving a list keeps their choice, whatever the form says."""
    add_person(site.factory, site.clock, "member@example.org")
    post(site, "member@example.org", discreet="envelope")
    assert discreet_of(site, "member@example.org") == "off"
