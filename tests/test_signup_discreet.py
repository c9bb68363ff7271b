"""Discreet from the first email: the signup form's box makes the confirmation itself discreet
(real listener, aiosmtpd; SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Subscriber
from newsletter.proof_of_work import solve
from tests.conftest import SmtpServer
from tests.test_signup import BITS, Signup, lists_synced, serve_public, signup_settings
from tests.test_signup import site as plain_site  # noqa: F401 (the fixture)
from tests.test_web import Site, add_person

NOTES = "https://notes.example.net"


@pytest.fixture
def site(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock, smtpd: SmtpServer
) -> Iterator[Signup]:
    """The signup pages with a neutral host set ([discreet] base_url): discreet mail offered."""
    lists_synced(factory)
    settings = signup_settings(database_url, smtpd)
    settings = replace(settings, discreet=replace(settings.discreet, base_url=NOTES))
    with (
        serve_public(settings, factory, clock) as (url, served),
        httpx.Client(timeout=30) as http,
    ):
        yield Signup(url, served, factory, clock, http)


def post(site: Signup, email: str, **extra: str) -> httpx.Response:
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


def discreet_of(site: Signup, email: str) -> str:
    with unit_of_work(site.factory) as session:
        return str(session.scalar(select(Subscriber.discreet).where(Subscriber.email == email)))


def test_the_box_makes_the_confirmation_discreet(site: Signup, smtpd: SmtpServer) -> None:
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


def test_a_stranger_cannot_change_a_members_choice(site: Signup) -> None:
    """Someone already receiving a list keeps their choice, whatever the form says."""
    add_person(site.factory, site.clock, "member@example.org")
    post(site, "member@example.org", discreet="envelope")
    assert discreet_of(site, "member@example.org") == "off"


def test_without_a_neutral_host_discreet_mail_is_not_offered(plain_site: Signup) -> None:  # noqa: F811
    """No [discreet] base_url: the links would name the portal's host, so neither the signup
    form nor the preferences page offers discreet mail, and a crafted post is ignored."""
    site = plain_site
    assert 'name="discreet"' not in site.http.get(f"{site.url}/subscribe").text
    post(site, "quiet@example.org", discreet="envelope")
    assert discreet_of(site, "quiet@example.org") == "off"
    sid = add_person(site.factory, site.clock, "member@example.org")
    pages = Site(site.url, site.settings, site.factory, site.clock)
    prefs = site.http.get(f"{site.url}/preferences/{pages.token('preferences', sid)}")
    assert prefs.status_code == 200 and 'name="on_key_problem"' in prefs.text
    assert 'name="discreet"' not in prefs.text
