"""Fixes from an adversarial probe of the public pages: no redirect built from the Host header,
junk signup posts that use up no one's quota, cross-site signups refused, preferences posts that
say what was wrong. Real uvicorn on loopback, real databases."""

from __future__ import annotations

import html
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock, SystemClock
from newsletter.db import unit_of_work
from newsletter.db.models import Subscriber, Subscription, SubscriptionStatus
from newsletter.proof_of_work import solve
from tests.conftest import SmtpServer, make_settings
from tests.test_public_browser import portal
from tests.test_signup import (
    BITS,
    TICKET,
    Signup,
    lists_synced,
    serve_public,
    signup_settings,
    site,
)
from tests.test_web import Site, add_person, form_token
from tests.test_web_hardening import APPS, AppMaker, listening, sqlite_factory
from tests.webserver import serve_pages

__all__ = ["portal", "site", "sqlite_factory"]  # fixtures, imported for pytest


@pytest.mark.parametrize("make", APPS)
@pytest.mark.parametrize("path", ["/archive/", "/subscribe/", "/u/WzEsMV0.abcdefghijk/"])
def test_a_trailing_slash_is_no_redirect_to_the_host_header(
    make: AppMaker,
    path: str,
    sqlite_factory: sessionmaker[Session],
    sqlite_url: str,
    clock: FrozenClock,
) -> None:
    """Starlette's slash redirect would write Location from Host: a forged Host, a token leak."""
    with listening(make, sqlite_factory, clock, sqlite_url) as site:
        reply = httpx.get(site.url + path, headers={"Host": "evil.example"})
    assert reply.status_code == 404
    assert "location" not in reply.headers
    assert "evil.example" not in reply.text


def test_junk_posts_leave_a_shared_address_its_signups(site: Signup) -> None:
    """Junk posts (no ticket, forged, honeypot, no proof of work, too fast) from an address many
    readers share use none of its hourly signups: a real reader behind it still signs up."""
    shared = "198.51.100.7"  # a Tor exit, a carrier's NAT
    limit = site.settings.web.signups_per_hour
    for n in range(limit * 2):
        raw = site.http.post(
            f"{site.url}/subscribe",
            content=b"",
            headers={
                "x-forwarded-for": shared,
                "content-type": "application/x-www-form-urlencoded",
            },
        )
        assert raw.status_code == 200  # no ticket: the form again
        forged = site.post(f"f{n}@example.org", ticket="forged", client=shared)
        assert forged.status_code == 400
        site.post(f"h{n}@example.org", honeypot="x", client=shared)
        assert site.post(f"w{n}@example.org", answer="nope", client=shared).status_code == 400
        assert site.post(f"s{n}@example.org", wait=0.1, client=shared).status_code == 400
    assert site.people() == {}
    assert site.post("reader@example.org", client=shared).status_code == 200
    assert list(site.people()) == ["reader@example.org"]
    # Real signups still count: the limit holds for them.
    codes = [site.post(f"r{n}@example.org", client=shared).status_code for n in range(limit)]
    assert codes.count(200) == limit - 1 and codes[-1] == 429


def owed(factory: sessionmaker[Session], email: str) -> list[bool]:
    """For each of an address's subscriptions, whether its confirmation is still owed."""
    with unit_of_work(factory) as session:
        rows = session.scalars(
            select(Subscription.confirm_sent_at)
            .join(Subscriber, Subscriber.id == Subscription.subscriber_id)
            .where(Subscriber.email == email)
        ).all()
    return [sent is None for sent in rows]


def mail_to(smtpd: SmtpServer) -> list[str]:
    return [str(m["To"]) for m in smtpd.messages()]


def test_a_signup_is_answered_before_its_confirmation_which_goes_once_in_a_later_round(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    """`newsletter web`: a post wakes no sender (mail right after a post would say the address was
    new); the confirmation goes in the next random round, within its bound, and only once."""
    lists_synced(factory)
    settings = signup_settings(database_url, smtpd)
    with (
        serve_public(settings, factory, clock, send_confirmations=True, confirm_delay=(2, 3)) as (
            url,
            settings,
        ),
        httpx.Client(timeout=30) as http,
    ):
        site = Signup(url, settings, factory, clock, http)
        started = time.monotonic()  # the form's GET starts the sender
        assert site.post("new@example.org").status_code == 200
        assert mail_to(smtpd) == [] and owed(factory, "new@example.org") == [True]
        time.sleep(max(0.0, started + 1.5 - time.monotonic()))
        assert mail_to(smtpd) == []  # no round before the least delay
        deadline = started + 3 + 5  # the most delay, and time for the round itself
        while not smtpd.messages() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mail_to(smtpd) == ["new@example.org"]
        time.sleep(3.5)  # at least one more round: nothing sent again
    assert mail_to(smtpd) == ["new@example.org"]
    assert owed(factory, "new@example.org") == [False]


def test_a_confirmation_owed_at_a_stop_is_sent_by_the_next_process(
    factory: sessionmaker[Session], database_url: str, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    """What is owed lives in the database, not in the process: stopped before its round, the
    confirmation is sent once by the next `newsletter web`."""
    lists_synced(factory)
    settings = signup_settings(database_url, smtpd)
    with (
        serve_public(
            settings, factory, clock, send_confirmations=True, confirm_delay=(600, 600)
        ) as (url, settings),
        httpx.Client(timeout=30) as http,
    ):
        assert (
            Signup(url, settings, factory, clock, http).post("kept@example.org").status_code == 200
        )
    assert mail_to(smtpd) == [] and owed(factory, "kept@example.org") == [True]
    with (
        serve_public(settings, factory, clock, send_confirmations=True) as (url, _),
        httpx.Client(timeout=30) as http,
    ):
        assert http.get(f"{url}/healthz").status_code == 200  # starts the sender
        deadline = time.monotonic() + 10
        while not smtpd.messages() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # a few more rounds
    assert mail_to(smtpd) == ["kept@example.org"]
    assert owed(factory, "kept@example.org") == [False]


@pytest.mark.parametrize(
    ("fetch_site", "status"),
    [
        pytest.param("cross-site", 403, id="cross-site"),
        pytest.param("same-site", 403, id="same-site"),
        pytest.param("same-origin", 200, id="our-page"),
        pytest.param(None, 200, id="old-browser"),
    ],
)
def test_a_signup_posted_by_another_site_is_refused(
    site: Signup, fetch_site: str | None, status: int
) -> None:
    """Origin null (a no-referrer page) is ours or anyone's: Sec-Fetch-Site tells them apart."""
    headers = {"origin": "null"}
    if fetch_site:
        headers["sec-fetch-site"] = fetch_site
    reply = site.post("victim@example.org", headers=headers)
    assert reply.status_code == status
    assert list(site.people()) == (["victim@example.org"] if status == 200 else [])
    if status == 403:
        assert "Open the sign-up page and try again." in reply.text
        assert reply.headers["cache-control"] == "no-store"


def test_the_portals_plain_form_still_opens_ours_filled_in(site: Signup) -> None:
    """A cross-site post without a ticket signs up no one: it only shows our form, prefilled."""
    data = {"email": "p@example.org", "language": "ru", "lists": ["urgent-actions"]}
    headers = {"origin": "http://127.0.0.1:9", "sec-fetch-site": "cross-site"}
    reply = site.http.post(f"{site.url}/subscribe", data=data, headers=headers)
    assert reply.status_code == 200 and 'value="p@example.org"' in reply.text
    assert site.people() == {}


def people_in(factory: sessionmaker[Session]) -> list[str]:
    with unit_of_work(factory) as session:
        return sorted(session.scalars(select(Subscriber.email)))


def test_a_cross_site_page_cannot_sign_up_its_visitors_victims(
    factory: sessionmaker[Session],
    database_url: str,
    smtpd: SmtpServer,
    browser: Any,
    portal: tuple[str, dict[str, bytes]],
) -> None:
    """In chromium: another origin's no-referrer page auto-posts a solved ticket for a victim
    (refused, 403); our own page's form, in the same browser, signs up."""
    evil_url, pages = portal
    lists_synced(factory)
    clock = SystemClock()
    settings = signup_settings(database_url, smtpd, signup_min_seconds=0)
    with serve_public(settings, factory, clock) as (url, settings):  # type: ignore[arg-type]
        found = TICKET.search(httpx.get(f"{url}/subscribe").text)
        assert found is not None
        ticket = found.group(1)
        fields = {
            "form_token": ticket,
            "pow": solve(ticket, BITS),
            "email": "victim@example.org",
            "lists": "urgent-actions",
            "language": "en",
            "website": "",
        }
        inputs = "".join(f'<input name="{k}" value="{html.escape(v)}">' for k, v in fields.items())
        pages["/"] = (
            '<!DOCTYPE html><html><head><meta name="referrer" content="no-referrer"></head><body>'
            f'<form id="f" method="post" action="{url}/subscribe">{inputs}</form>'
            '<script>document.getElementById("f").submit()</script></body></html>'
        ).encode()
        page = browser.new_page()
        try:
            with page.expect_navigation(url=f"{url}/subscribe") as landed:
                page.goto(evil_url + "/")
            response = landed.value
            assert response is not None and response.status == 403
            assert "Open the sign-up page and try again." in page.content()
            assert people_in(factory) == []
            page.goto(f"{url}/subscribe?lang=en")
            page.locator("#email").fill("reader@example.org")
            page.locator("input[value=weekly-digest]").check()
            page.locator("button[type=submit]").click()
            page.locator("h1", has_text="Check your inbox").wait_for(timeout=20000)
        finally:
            page.close()
    assert people_in(factory) == ["reader@example.org"]


@pytest.fixture
def prefs(factory: sessionmaker[Session], database_url: str, clock: FrozenClock) -> Iterator[Site]:
    """The declared lists, and the supporters' pages on a free loopback port."""
    lists_synced(factory)
    with serve_pages(make_settings(database_url), factory, clock) as (url, settings):
        yield Site(url, settings, factory, clock)


@pytest.mark.parametrize(
    ("body", "said"),
    [
        pytest.param(b"language=xx&lists=1", "The language sent", id="language"),
        pytest.param(b"language=en&lists=abc", "The lists sent", id="list-id"),
        pytest.param(b"language=en&lists=" + b"9" * 5000, "The lists sent", id="list-id-huge"),
        pytest.param(b"language=en&lists=1&discreet=%3Cb%3E", "discreet emails", id="discreet"),
        pytest.param(b"language=en&on_key_problem=shout", "a key that cannot", id="key-choice"),
        pytest.param(b"language=%FF&lists=1", "is not text", id="not-utf8"),
    ],
)
def test_a_crafted_preferences_post_says_what_was_wrong(
    prefs: Site, body: bytes, said: str
) -> None:
    """400 naming the field, in the browser's language, no-store; nothing saved."""
    sid = add_person(prefs.factory, prefs.clock, "reader@example.org")
    url = f"{prefs.url}/preferences/{prefs.token('preferences', sid)}"
    token = form_token(httpx.get(url).text).encode()
    headers = {"content-type": "application/x-www-form-urlencoded"}
    reply = httpx.post(url, content=b"form_token=" + token + b"&" + body, headers=headers)
    assert reply.status_code == 400
    assert said in reply.text and "There is nothing here" not in reply.text
    assert reply.headers["cache-control"] == "no-store"
    assert prefs.status(sid) == SubscriptionStatus.ACTIVE
    russian = httpx.post(
        url,
        content=b"form_token=" + token + b"&" + body,
        headers={**headers, "accept-language": "ru"},
    )
    assert "Эту форму не удалось сохранить" in russian.text


def test_yandexs_domains_and_dashes_are_one_inbox(site: Signup, smtpd: SmtpServer) -> None:
    """ya.ru, yandex.by, yandex.com... are one Yandex mailbox, and "-" in a login is ".": one
    confirmation for them all; it goes to the address as first written, never a rewritten one."""
    forms = [
        "ivan-petrov@ya.ru",
        "ivan.petrov@yandex.ru",
        "ivan-petrov@yandex.by",
        "ivan.petrov+x@yandex.com",
        "Ivan-Petrov@yandex.kz",
        "ivan.petrov@yandex.ua",
        "ivan-petrov@example.org",  # not Yandex: its own inbox
    ]
    for n, address in enumerate(forms):
        assert site.post(address, client=f"10.8.{n}.1").status_code == 200
    site.mail_confirmations()
    assert mail_to(smtpd) == ["ivan-petrov@ya.ru", "ivan-petrov@example.org"]
